"""retention: delete old shards, checkpoints, model weights and model versions, never protected ones."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from mms_core.config import Settings
from mms_core.retention import RetentionPlan, RetentionPolicy, RetentionResult
from tasks import retention as t


@flow(name="retention", log_prints=True)
def retention(policy: RetentionPolicy | None = None) -> RetentionResult:
    """Apply ``policy`` (default: MMS_RETENTION_* settings) to storage and the model registry.

    A policy that names a protected version fails in the planning task, before anything is deleted.
    """
    policy = policy or RetentionPolicy()
    settings = Settings()
    plan = t.plan(
        policy=policy,
        tracking_uri=settings.tracking_uri,
        storage_root=settings.storage_root,
        home=settings.home,
    )
    result = t.apply(plan=plan, tracking_uri=settings.tracking_uri)
    create_markdown_artifact(
        key="retention",
        markdown=report(plan, result),
        description=f"retention: {len(result.deleted)} deleted, {len(plan.protected)} protected"
        + (" (dry run)" if policy.dry_run else ""),
    )
    return result


def report(plan: RetentionPlan, result: RetentionResult) -> str:
    """Markdown table of every item: deleted / would delete / already gone / protected, with the reason."""
    done = {i.target for i in result.deleted}
    gone = {i.target for i in result.already_gone}

    def action(target: str) -> str:
        if plan.policy.dry_run:
            return "would delete"
        return "deleted" if target in done else "already gone" if target in gone else "kept"

    rows = [(action(i.target), i) for i in plan.delete] + [("protected", i) for i in plan.protected]
    table = "\n".join(
        f"| {what} | {i.kind} | `{i.target}` | {i.age_days:.1f} | {_size(i.bytes)} | {i.reason} |"
        for what, i in rows
    )
    p = plan.policy
    head = (
        f"## Retention{' (dry run)' if p.dry_run else ''}: older than {p.max_age_days:g} days, "
        f"last {p.keep_last_versions} versions kept, kinds {', '.join(p.kinds)}\n\n"
    )
    if not rows:
        return head + "Nothing old enough to delete.\n"
    return (
        head
        + f"| action | kind | target | age (days) | size | reason |\n|---|---|---|---|---|---|\n{table}\n"
    )


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"
