"""serving-rollout: move a running online server to a new model version through a canary."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from mms_core.config import Settings
from mms_core.serving.rollout import RolloutDecision, RolloutSpec
from tasks import rollout


@flow(name="serving-rollout", log_prints=True)
def serving_rollout(spec: RolloutSpec | None = None) -> RolloutDecision:
    """Canary ``spec.candidate`` on ``spec.server_url``; promote it or roll it back by the gate."""
    spec = spec or RolloutSpec()
    settings = Settings()
    version = rollout.resolve_candidate(tracking_uri=settings.tracking_uri, spec=spec)
    previous = rollout.start_canary(spec=spec, version=version)  # undoes itself if it fails
    try:
        canary, current = rollout.observe(spec=spec, version=version, previous=previous)
        decision = rollout.decide(
            spec=spec, tracking_uri=settings.tracking_uri, version=version, previous=previous,
            canary=canary, current=current,
        )  # fmt: skip
    except Exception:
        # Never leave a canary taking traffic nobody watches. The flow fails with its own error:
        # the abort's outcome, even its failure, is only logged.
        undo = rollout.abort_canary(
            spec=spec, tracking_uri=settings.tracking_uri, version=version, previous=previous,
            return_state=True,
        )  # fmt: skip
        if undo.is_failed():
            get_run_logger().error("could not undo the rollout of v%s: %s", version, undo.message)
        raise
    run_id = rollout.log_decision(
        tracking_uri=settings.tracking_uri, artifact_root=settings.artifact_root, decision=decision
    )
    create_markdown_artifact(
        key="serving-rollout",
        markdown=_report(decision, run_id),
        description=f"{spec.model} v{version}: {decision.decision}",
    )
    return decision


def _report(d: RolloutDecision, run_id: str) -> str:
    rows = [("canary v" + d.new_version, d.canary)] + ([("current", d.current)] if d.current else [])
    table = "\n".join(
        f"| {name} | {s.requests} | {s.error_rate:.4f} | {s.p50_ms:.2f} | {s.p95_ms:.2f} |"
        for name, s in rows
    )
    return (
        f"## {d.model} v{d.new_version}: **{d.decision}**\n\n"
        f"| traffic | requests | error rate | p50 ms | p95 ms |\n|---|---|---|---|---|\n{table}\n\n"
        f"Reasons: {'; '.join(d.reasons) or 'gate passed'}. MLflow run `{run_id}`.\n"
    )
