"""One monitoring check, in steps the flow's tasks call: gather live statistics, compare and log
the report to MLflow, and build the retraining spec when drift calls for it."""

from __future__ import annotations

import json

from pydantic import BaseModel, SecretStr

from mms_core import registry, storage
from mms_core.errors import MonitoringError
from mms_core.monitoring.drift import DriftReport, DriftThresholds, compare
from mms_core.monitoring.live import fetch_server, model_name, read_stream
from mms_core.monitoring.report import Health, drift_png, health_from_metrics, markdown
from mms_core.monitoring.stats import StatsSnapshot, merge
from mms_core.secrets import MASK, redact_url
from mms_core.spec import PipelineSpec

EXPERIMENT = "mms-monitoring"


class LiveStats(BaseModel):
    stats: StatsSnapshot
    health: Health | None
    sources: list[str]


class CheckResult(BaseModel):
    report: DriftReport
    health: Health | None
    markdown: str
    run_id: str


def check_request(*, server_url: str | None, stream_stats_uri: str | None, deployment: str) -> None:
    """Refuse a monitoring request that cannot work, before anything runs (thresholds are checked
    where :class:`DriftThresholds` is built).

    Raises:
        MonitoringError: no live source, a server URL that is not http(s), a deployment name that is
            not FLOW/DEPLOYMENT.
    """
    if not server_url and not stream_stats_uri:
        raise MonitoringError(
            "nothing to monitor: give server_url (a running `mms serve`, e.g. http://127.0.0.1:8000) "
            "and/or stream_stats_uri (the directory `mms stream --stats-dir` writes)"
        )
    if server_url and not server_url.startswith(("http://", "https://")):
        raise MonitoringError(f"server_url {server_url!r} must start with http:// or https://")
    flow_name, sep, name = deployment.partition("/")
    if not (sep and flow_name and name) or "/" in name:
        raise MonitoringError(
            f"retrain deployment {deployment!r} must look like FLOW/DEPLOYMENT, e.g. training-pipeline/manual"
        )


def gather_live(
    *, model: str, version: str, server_url: str | None, stream_stats_uri: str | None,
    api_key: SecretStr | None,
) -> LiveStats:  # fmt: skip
    """Merge the server's statistics of ``version`` and the stream consumers' files of it.

    Raises:
        MonitoringError: no source has seen a row of ``version``, or the server refuses.
    """
    parts: list[StatsSnapshot] = []
    sources: list[str] = []
    health = None
    if server_url:
        stats, metrics = fetch_server(url=server_url, model=model, version=version, api_key=api_key)
        parts.append(stats)
        sources.append(redact_url(server_url))  # sources go to MLflow params and logs
        health = health_from_metrics(metrics)
    if stream_stats_uri:
        stream = read_stream(stream_stats_uri, version=version)
        parts += stream
        sources += [f"{stream_stats_uri} ({len(stream)} consumer files)"] if stream else []
    if not parts or not sum(p.rows for p in parts):
        raise MonitoringError(
            f"no live rows of {model} (version {version}) yet: give server_url of a `mms serve` that "
            f"serves it and/or stream_stats_uri of `mms stream --stats-dir` "
            f"(looked at: {redact_url(server_url or '-')}, {stream_stats_uri or '-'})"
        )
    return LiveStats(stats=merge(parts), health=health, sources=sources)


def check_and_log(
    *, tracking_uri: str, artifact_root: str | None, model: str, version: str, reference: StatsSnapshot,
    live: LiveStats, thresholds: DriftThresholds,
) -> CheckResult:  # fmt: skip
    """Compare, then log one MLflow run (experiment ``mms-monitoring``): metrics, report, plot."""
    report = compare(reference=reference, live=live.stats, thresholds=thresholds)
    text = markdown(model=f"{model} (v{version})", report=report, health=live.health)
    exp = registry.ensure_experiment(tracking_uri=tracking_uri, name=EXPERIMENT, artifact_root=artifact_root)
    name = model_name(model)
    run_id = registry.start_run(
        tracking_uri=tracking_uri, experiment_id=exp, run_name=f"drift-{name}-v{version}",
        tags={"mms.model": name, "mms.version": version, "mms.drifted": str(report.drifted).lower()},
        params={"model": model, "thresholds": thresholds.model_dump_json(), "live": "; ".join(live.sources)},
    )  # fmt: skip
    metrics = {
        "live_rows": report.live_rows, "max_psi": report.max_psi, "drifted": float(report.drifted),
        "drifted_features": len(report.drifted_features),
    }  # fmt: skip
    if report.class_psi is not None:
        metrics["class_psi"] = report.class_psi
    if live.health is not None:
        metrics |= {"error_rate": live.health.error_rate, "queue_depth": live.health.queue_depth}
        if live.health.latency_p95_ms is not None:
            metrics["latency_p95_ms"] = live.health.latency_p95_ms
    registry.log_metrics(tracking_uri=tracking_uri, run_id=run_id, metrics=metrics)
    for artifact, data in (
        ("drift_report.md", text.encode()),
        ("drift_report.json", report.model_dump_json(indent=1).encode()),
        ("drift.png", drift_png(model=model, report=report, reference=reference, live=live.stats)),
    ):
        registry.log_artifact_bytes(tracking_uri=tracking_uri, run_id=run_id, name=artifact, data=data)
    registry.end_run(tracking_uri=tracking_uri, run_id=run_id)
    return CheckResult(report=report, health=live.health, markdown=text, run_id=run_id)


def note_retraining(*, tracking_uri: str, run_id: str, note: str, flow_run_id: str | None) -> None:
    """Record on the check's MLflow run what was done about the drift."""
    c = registry.client(tracking_uri=tracking_uri)
    c.set_tag(run_id, "mms.retraining", note[:5000])
    if flow_run_id:
        c.set_tag(run_id, "mms.retraining_flow_run_id", flow_run_id)


def retrain_spec(*, tracking_uri: str, run_id: str, fresh_data_uri: str) -> PipelineSpec:
    """The spec that trained run ``run_id``, reading its data from ``fresh_data_uri`` instead.

    The run's params hold its storage credentials masked: they are left out, and the retraining
    reads ``fresh_data_uri`` with the credentials of the process that runs it (its environment,
    e.g. AWS_ACCESS_KEY_ID); non-secret options (endpoint_url) are kept.

    Raises:
        MonitoringError: the run has no spec (not made by the training pipeline), or the URI is unsafe.
    """
    params = registry.client(tracking_uri=tracking_uri).get_run(run_id).data.params
    if "spec" not in params:
        raise MonitoringError(f"run {run_id} has no 'spec' parameter: it was not made by training-pipeline")
    storage.fs_and_path(fresh_data_uri)  # an unknown protocol fails here, not in the training run
    raw = json.loads(params["spec"])
    raw["data"]["source"] = fresh_data_uri
    options = raw["data"].get("storage_options") or {}
    raw["data"]["storage_options"] = {k: v for k, v in options.items() if v != MASK}
    return PipelineSpec.model_validate(raw)
