"""Prefect deployments, served by one long-running process (`mms deploy`) or registered with a
work pool whose workers run them (`mms deploy --work-pool NAME`, then `prefect worker start --pool
NAME` on as many machines as wanted).

Two deployments of the `training-pipeline` flow: `digits-nightly` on a cron schedule with the
parameters of examples/digits.yaml, and `manual` (no schedule) for runs started from the UI or
`prefect deployment run`; `batch-predict/manual` for batch prediction on demand; and
`retention/daily` (cron, the MMS_RETENTION_* policy of the serving process) with
`retention/manual`, a dry run by default (untick dry_run in the UI form to delete); and
`tuning/manual` with the study of examples/digits-tune.yaml; `monitoring/hourly` (cron) and
`monitoring/manual` (drift and health of a served model, retraining on drift).
Serving needs a real Prefect server (`mms stack up`): against
Prefect's temporary server the schedules and runs would vanish with the process.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefect.deployments.runner import EntrypointType

from flows.batch_predict import batch_predict
from flows.monitoring import monitoring
from flows.retention import retention
from flows.serving_rollout import serving_rollout
from flows.training_pipeline import training_pipeline
from flows.tuning import tuning
from mms_core.errors import MMSError, SpecError
from mms_core.spec import PipelineSpec, load_spec

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

DEFAULT_SPEC = Path(__file__).resolve().parents[1] / "examples" / "digits.yaml"
TUNE_SPEC = DEFAULT_SPEC.with_name("digits-tune.yaml")
NIGHTLY = "digits-nightly"
MANUAL = "manual"
DAILY = "daily"
HOURLY = "hourly"
MONITORING_CRON = "15 * * * *"  # hourly at a quarter past
RETENTION_CRON = "30 3 * * *"  # after the nightly training has registered its version
TAGS = ["mms"]


def deployments(*, spec_path: Path | None = None, cron: str = "0 2 * * *") -> list[RunnerDeployment]:
    """Build the training pipeline's deployments (nothing is sent to a server yet).

    Args:
        spec_path: PipelineSpec YAML the nightly runs use; default examples/digits.yaml
            (the built-in defaults when that file is not there, e.g. a non-editable install).
        cron: Cron expression of the nightly schedule (server time zone, UTC by default).

    Returns:
        `[training-pipeline/digits-nightly, training-pipeline/manual, batch-predict/manual,
        serving-rollout/manual, retention/daily, retention/manual, tuning/manual,
        monitoring/hourly, monitoring/manual]`: the first scheduled with
        `cron` and the spec's parameters, retention/daily on `RETENTION_CRON`, monitoring/hourly
        on `MONITORING_CRON` (the flow's defaults: digits-classifier@champion on 127.0.0.1:8000 and
        its stream statistics; no retraining until fresh_data_uri is set), the others unscheduled.

    Raises:
        SpecError: The spec file is unreadable or invalid, or carries credentials (a deployment
            stores its parameters with secrets masked).
    """
    path = spec_path if spec_path is not None else (DEFAULT_SPEC if DEFAULT_SPEC.exists() else None)
    spec = _without_secrets(load_spec(path), path=path)
    # A module path, not a file path relative to the serving process's cwd: the flow runs in a
    # subprocess that imports it, and `flows` is an installed package.
    common = dict(tags=TAGS, entrypoint_type=EntrypointType.MODULE_PATH)
    nightly = training_pipeline.to_deployment(
        NIGHTLY,
        cron=cron,
        # JSON-ready values: the server stores parameters as JSON and checks them against the
        # flow's schema (built from PipelineSpec, which is also what the UI's form shows).
        parameters={"spec": spec.model_dump(mode="json")},
        description=f"Nightly training run ({cron}) of {path or 'the default spec'}.",
        **common,
    )
    manual = training_pipeline.to_deployment(
        MANUAL,
        description="On-demand training run; set the spec in the UI form or with --params.",
        **common,
    )
    predict = batch_predict.to_deployment(
        MANUAL,
        description="Batch prediction on Dask: a registered model (NAME@ALIAS) over a table (fsspec URI).",
        **common,
    )
    rollout = serving_rollout.to_deployment(
        MANUAL,
        description="Canary rollout of a registered version to a running `mms serve`: promote or roll back.",
        **common,
    )
    cleanup = retention.to_deployment(
        DAILY,
        cron=RETENTION_CRON,
        description="Daily retention (MMS_RETENTION_* policy): old shards, checkpoints, weights, versions.",
        **common,
    )
    cleanup_manual = retention.to_deployment(
        MANUAL,
        parameters={"policy": {"dry_run": True}},
        description="On-demand retention; a dry run (lists what would go) unless dry_run is unticked.",
        **common,
    )
    study = tuning.to_deployment(
        MANUAL,
        parameters=_tuning_parameters(),
        description="On-demand tuning study (Optuna trials on Dask), then the best configuration "
        "retrained and registered; edit the spec and the search space in the UI form.",
        **common,
    )
    watch = monitoring.to_deployment(
        HOURLY,
        cron=MONITORING_CRON,
        description="Hourly drift and health check of digits-classifier@champion served on "
        "127.0.0.1:8000 (and its stream statistics); set fresh_data_uri to retrain on drift.",
        **common,
    )
    watch_manual = monitoring.to_deployment(
        MANUAL, description="On-demand drift and health check of a served model.", **common
    )
    return [nightly, manual, predict, rollout, cleanup, cleanup_manual, study, watch, watch_manual]


def _tuning_parameters() -> dict:
    """examples/digits-tune.yaml as the tuning form's defaults (the flow's own when absent)."""
    if not TUNE_SPEC.exists():
        return {}
    from mms_core.tuning.space import load_tuning

    spec, tune = load_tuning(TUNE_SPEC)
    spec = _without_secrets(spec, path=TUNE_SPEC)
    return {"spec": spec.model_dump(mode="json"), "tune": tune.model_dump(mode="json")}


def _without_secrets(spec: PipelineSpec, *, path: Path | None) -> PipelineSpec:
    """``spec``, refused if it carries a credential: the server stores a deployment's parameters,
    where MMS writes secrets masked, so every scheduled run would get the mask, not the credential.

    Raises:
        SpecError: the spec has credentials (storage options, a password in data.source).
    """
    masked = spec.masked_fields()
    if masked:
        raise SpecError(
            f"spec {path or '(defaults)'} carries credentials ({', '.join(masked)}), which a deployment "
            "would store masked: remove them from the spec and give them to the process that runs the "
            "flows (the worker's environment, e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for s3://)"
        )
    return spec


def serve_deployments(
    *, spec_path: Path | None = None, cron: str = "0 2 * * *", limit: int | None = None
) -> None:
    """Register the deployments and execute their runs until interrupted (blocks).

    Stop this process before the Prefect server it talks to: once the server is gone it no
    longer reacts to SIGTERM (design brief, section 2).

    Args:
        spec_path: PipelineSpec YAML for the nightly deployment (see `deployments`).
        cron: Cron expression of the nightly schedule.
        limit: Most flow runs executed at the same time; None for no limit.

    Raises:
        MMSError: No Prefect server is configured (PREFECT_API_URL unset).
        SpecError: The spec file is unreadable or invalid.
    """
    from prefect import serve

    _require_server("serving deployments")
    serve(*deployments(spec_path=spec_path, cron=cron), limit=limit)


def register_deployments(
    *, work_pool: str, spec_path: Path | None = None, cron: str = "0 2 * * *"
) -> list[str]:
    """Register the deployments with ``work_pool`` (a ``process`` pool, created if missing) and
    return their FLOW/DEPLOYMENT names; runs are then executed by that pool's workers
    (``prefect worker start --pool NAME``) wherever they run, not by this process.

    A worker runs a flow in a subprocess that imports it by module path (``flows.…``), so the
    worker's environment needs MMS installed (the image has it) and the same MMS_* settings.

    Raises:
        MMSError: No Prefect server is configured, or ``work_pool`` exists with another type.
        SpecError: The spec file is unreadable or invalid.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.asyncutils import run_coro_as_sync

    _require_server("registering deployments with a work pool")

    async def ensure_pool() -> str:
        async with get_client() as client:
            try:
                return (await client.read_work_pool(work_pool)).type
            except ObjectNotFound:
                await client.create_work_pool(WorkPoolCreate(name=work_pool, type="process"))
                return "process"

    pool_type = run_coro_as_sync(ensure_pool())
    if pool_type != "process":
        raise MMSError(
            f"work pool {work_pool!r} has type {pool_type!r}; MMS registers its flows with a 'process' "
            "pool (the worker's environment has MMS installed): name another pool or delete this one"
        )
    built = deployments(spec_path=spec_path, cron=cron)
    for d in built:
        d.apply(work_pool_name=work_pool)
    return [f"{d.flow_name}/{d.name}" for d in built]


def _require_server(what: str) -> None:
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise MMSError(
            f"{what} needs a running Prefect server, but PREFECT_API_URL is not set: "
            "start the local stack with `mms stack up` (or point PREFECT_API_URL at a server)"
        )
