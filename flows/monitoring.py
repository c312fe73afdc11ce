"""monitoring: live inputs and predictions vs the training data (PSI / KS), serving health, and a
retraining run of the training deployment when drift passes the threshold."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, SecretStr

from mms_core.config import Settings
from mms_core.monitoring.check import check_request
from mms_core.monitoring.drift import DriftThresholds
from mms_core.monitoring.live import model_name, stream_stats_uri
from tasks import monitoring as t


class MonitoringResult(BaseModel):
    """The verdict in brief; the full report is the MLflow run and the Prefect artifact."""

    model: str
    version: str
    live_rows: int
    enough_data: bool
    drifted: bool
    drifted_features: list[str]
    max_psi: float
    class_psi: float | None
    mlflow_run_id: str
    retraining_flow_run_id: str | None
    retraining: str


@flow(name="monitoring", log_prints=True)
def monitoring(
    model: str = "digits-classifier@champion",
    server_url: str | None = "http://127.0.0.1:8000",
    stream_stats: str | None = None,
    api_key: SecretStr | None = None,
    thresholds: DriftThresholds = DriftThresholds(),  # noqa: B008 - Prefect form default
    retrain: bool = True,
    fresh_data_uri: str | None = None,
    retrain_deployment: str = "training-pipeline/manual",
) -> MonitoringResult:
    """Compare ``model``'s live traffic with the statistics of its training data; report drift and
    the server's health; on drift, retrain on ``fresh_data_uri`` through ``retrain_deployment``.

    Args:
        model: Registered model, NAME@ALIAS or NAME/VERSION; its version's live statistics are used.
        server_url: A running `mms serve` (statistics, /metrics); None for stream statistics only.
        stream_stats: Directory the stream consumers write statistics to; default
            <storage>/monitoring/NAME/stream (where `mms stream` writes them).
        api_key: Key for a server that requires one. Pass a SecretStr: Prefect stores a flow run's
            parameters as the caller gave them, and a SecretStr as "**********" (a plain string,
            or a value typed into a deployment's form, is stored as it is).
        thresholds: PSI, KS p-value and minimum live rows; out of range fails before anything runs.
        retrain: Start a training run on drift (needs ``fresh_data_uri``).
        fresh_data_uri: Data the retraining reads (the registered run's spec with data.source replaced).
        retrain_deployment: FLOW/DEPLOYMENT of the training pipeline; checked before anything runs.
    """
    settings = Settings()
    tracking = settings.tracking_uri
    stream_uri = stream_stats or stream_stats_uri(storage_root=settings.storage_root, model=model)
    check_request(server_url=server_url, stream_stats_uri=stream_uri, deployment=retrain_deployment)
    retraining = retrain and fresh_data_uri is not None
    deployment_id = t.check_deployment(name=retrain_deployment) if retraining else None
    ref, version, run_id = t.reference(tracking_uri=tracking, model=model)
    live = t.live(
        model=model, version=version, server_url=server_url, stream_stats_uri=stream_uri, api_key=api_key
    )
    result = t.check(
        tracking_uri=tracking, artifact_root=settings.artifact_root, model=model, version=version,
        reference=ref, live=live, thresholds=thresholds,
    )  # fmt: skip
    report, flow_run_id = result.report, None
    if not report.drifted:
        note = "not needed (no drift)" if report.enough_data else "no verdict yet (too few live rows)"
    elif not retraining:
        note = (
            "off (retrain=false)" if not retrain else "not started: give fresh_data_uri to retrain on drift"
        )
        get_run_logger().warning("drift found; retraining %s", note)
    else:
        outcome = t.trigger_retraining(
            tracking_uri=tracking, run_id=run_id, check_run_id=result.run_id, fresh_data_uri=fresh_data_uri,
            deployment=retrain_deployment, deployment_id=deployment_id,
        )  # fmt: skip
        note, flow_run_id = outcome.note, outcome.flow_run_id
    create_markdown_artifact(
        key=f"monitoring-{model_name(model)}".lower().replace("_", "-").replace(".", "-"),
        markdown=f"{result.markdown}\nRetraining: {note}. MLflow run `{result.run_id}`.\n",
        description=f"drift and health of {model} v{version}: {'DRIFT' if report.drifted else 'ok'}",
    )
    return MonitoringResult(
        model=model, version=version, live_rows=report.live_rows, enough_data=report.enough_data,
        drifted=report.drifted, drifted_features=report.drifted_features, max_psi=report.max_psi,
        class_psi=report.class_psi, mlflow_run_id=result.run_id, retraining_flow_run_id=flow_run_id,
        retraining=note,
    )  # fmt: skip
