"""Tasks of the serving-rollout flow: each one step of mms_core.serving.rollout, logged."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from mms_core.secrets import redact_url
from mms_core.serving import rollout
from mms_core.serving.rollout import RolloutDecision, RolloutSpec, VersionStats
from tasks.common import transient


@task(name="resolve-candidate", cache_policy=NONE)
def resolve_candidate(*, tracking_uri: str, spec: RolloutSpec) -> str:
    version = rollout.resolve_candidate(tracking_uri=tracking_uri, spec=spec)
    get_run_logger().info(
        "rolling out %s v%s (%s) to %s", spec.model, version, spec.candidate, redact_url(spec.server_url)
    )
    return version


@task(name="start-canary", cache_policy=NONE)
def start_canary(*, spec: RolloutSpec, version: str) -> list[str]:
    previous = rollout.start_canary(spec=spec, version=version)
    get_run_logger().info(
        "v%s loaded beside %s with %.0f%% of traffic", version, previous, 100 * spec.canary_share
    )
    return previous


@task(name="observe-canary", cache_policy=NONE)
def observe(
    *, spec: RolloutSpec, version: str, previous: list[str]
) -> tuple[VersionStats, VersionStats | None]:
    canary, current = rollout.observe(spec=spec, version=version, previous=previous)
    get_run_logger().info(
        "canary v%s: %s; current: %s", version, canary.model_dump(), current and current.model_dump()
    )
    return canary, current


# Idempotent (judging the same stats again, a removed canary or a moved alias stays so): retried
# when MLflow's store has a transient fault while the alias moves.
@task(name="decide", cache_policy=NONE, retries=2, retry_delay_seconds=2, retry_condition_fn=transient)
def decide(
    *, spec: RolloutSpec, tracking_uri: str, version: str, previous: list[str],
    canary: VersionStats, current: VersionStats | None,
) -> RolloutDecision:  # fmt: skip
    reasons = rollout.judge(spec=spec, canary=canary, current=current)
    if reasons:
        rollout.roll_back(spec=spec, version=version)
    else:
        rollout.promote(spec=spec, tracking_uri=tracking_uri, version=version, previous=previous)
    decision = RolloutDecision(
        decision="rolled_back" if reasons else "promoted", model=spec.model, new_version=version,
        previous_versions=previous, canary=canary, current=current, reasons=reasons,
    )  # fmt: skip
    log = get_run_logger()
    (log.warning if reasons else log.info)("v%s %s: %s", version, decision.decision, reasons or "gate passed")
    return decision


@task(name="abort-canary", cache_policy=NONE, retries=2, retry_delay_seconds=2, retry_condition_fn=transient)
def abort_canary(*, spec: RolloutSpec, tracking_uri: str, version: str, previous: list[str]) -> str:
    """After a failed observe or decide: undo the rollout (rollout.abort), log what was done."""
    done = rollout.abort(spec=spec, tracking_uri=tracking_uri, version=version, previous=previous)
    get_run_logger().warning("rollout of v%s failed; %s", version, done)
    return done


# A retry logs a fresh run; log_decision marks a run it could not complete FAILED.
@task(name="log-decision", cache_policy=NONE, retries=2, retry_delay_seconds=2, retry_condition_fn=transient)
def log_decision(*, tracking_uri: str, artifact_root: str | None, decision: RolloutDecision) -> str:
    run_id = rollout.log_decision(tracking_uri=tracking_uri, artifact_root=artifact_root, decision=decision)
    get_run_logger().info("decision logged to MLflow run %s", run_id)
    return run_id
