"""Tasks of the monitoring flow: the training statistics, the live ones, the check, the retraining."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel, SecretStr

from mms_core.errors import MonitoringError
from mms_core.monitoring.check import (
    CheckResult,
    LiveStats,
    check_and_log,
    gather_live,
    note_retraining,
    retrain_spec,
)
from mms_core.monitoring.drift import DriftThresholds
from mms_core.monitoring.reference import load_reference
from mms_core.monitoring.stats import StatsSnapshot
from tasks.common import transient

RETRAIN_TAG = "drift-retrain"  # marks the training runs this flow starts (one at a time)
_ACTIVE = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]


class Retraining(BaseModel):
    """What was done about a drift: the training flow run started, or why none was."""

    flow_run_id: str | None
    note: str


@task(name="check-retrain-deployment", cache_policy=NONE)
def check_deployment(*, name: str) -> str:
    """The deployment's id; a missing one fails here, before anything else runs."""
    with get_client(sync_client=True) as client:
        try:
            return str(client.read_deployment_by_name(name).id)
        except ObjectNotFound:
            raise MonitoringError(
                f"deployment {name!r} does not exist on this Prefect server: start `mms deploy` "
                "(it serves training-pipeline/manual), or set retrain_deployment / retrain=false"
            ) from None


@task(
    name="reference-statistics",
    cache_policy=NONE,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=transient,
)
def reference(*, tracking_uri: str, model: str) -> tuple[StatsSnapshot, str, str]:
    stats, version, run_id = load_reference(tracking_uri=tracking_uri, model=model)
    get_run_logger().info("%s is version %s; trained on %d rows", model, version, stats.rows)
    return stats, version, run_id


@task(
    name="live-statistics", cache_policy=NONE, retries=2, retry_delay_seconds=2, retry_condition_fn=transient
)
def live(
    *, model: str, version: str, server_url: str | None, stream_stats_uri: str | None,
    api_key: SecretStr | None,
) -> LiveStats:  # fmt: skip
    result = gather_live(
        model=model, version=version, server_url=server_url, stream_stats_uri=stream_stats_uri,
        api_key=api_key,
    )  # fmt: skip
    get_run_logger().info("%d live rows from %s", result.stats.rows, ", ".join(result.sources))
    return result


@task(name="check-drift", cache_policy=NONE)
def check(
    *, tracking_uri: str, artifact_root: str | None, model: str, version: str, reference: StatsSnapshot,
    live: LiveStats, thresholds: DriftThresholds,
) -> CheckResult:  # fmt: skip
    result = check_and_log(
        tracking_uri=tracking_uri, artifact_root=artifact_root, model=model, version=version,
        reference=reference, live=live, thresholds=thresholds,
    )  # fmt: skip
    r = result.report
    log = get_run_logger().warning if r.drifted else get_run_logger().info
    log("drift %s: max PSI %.3f, drifted features %s", "found" if r.drifted else "not found", r.max_psi,
        r.drifted_features[:10] or "none")  # fmt: skip
    return result


@task(name="trigger-retraining", cache_policy=NONE)
def trigger_retraining(
    *, tracking_uri: str, run_id: str, check_run_id: str, fresh_data_uri: str, deployment: str,
    deployment_id: str,
) -> Retraining:  # fmt: skip
    """Start a run of the training deployment on the fresh data, unless one this flow started is
    still scheduled or running (an hourly check must not queue a retraining every hour)."""
    from prefect.deployments import run_deployment

    spec = retrain_spec(tracking_uri=tracking_uri, run_id=run_id, fresh_data_uri=fresh_data_uri)
    with get_client(sync_client=True) as client:
        active = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[RETRAIN_TAG]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=_ACTIVE)),
            ),
            limit=1,
        )
    if active:
        outcome = Retraining(
            flow_run_id=None,
            note=f"not started: flow run {active[0].id} of {deployment} (started on an earlier drift) "
            f"is still {active[0].state_name}",
        )
    else:
        run = run_deployment(
            name=deployment, parameters={"spec": spec.model_dump(mode="json")}, timeout=0,
            tags=["mms", RETRAIN_TAG],
        )  # fmt: skip
        outcome = Retraining(
            flow_run_id=str(run.id), note=f"started {deployment} flow run {run.id} on {fresh_data_uri}"
        )
    note_retraining(
        tracking_uri=tracking_uri, run_id=check_run_id, note=outcome.note, flow_run_id=outcome.flow_run_id
    )
    get_run_logger().warning("drift: retraining %s", outcome.note)
    return outcome
