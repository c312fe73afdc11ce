"""Tasks of the retention flow: plan (decides, deletes nothing), apply (deletes, logging each)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from mms_core.retention import (
    RetentionPlan,
    RetentionPolicy,
    RetentionResult,
    apply_retention,
    plan_retention,
)


@task(name="plan-retention", cache_policy=NONE)
def plan(*, policy: RetentionPolicy, tracking_uri: str, storage_root: str, home: Path) -> RetentionPlan:
    result = plan_retention(policy=policy, tracking_uri=tracking_uri, storage_root=storage_root, home=home)
    logger = get_run_logger()
    for item in result.protected:
        logger.info("keeping %s %s: %s", item.kind, item.target, item.reason)
    logger.info(
        "%s %d item(s); %d old item(s) protected",
        "would delete" if policy.dry_run else "deleting",
        len(result.delete),
        len(result.protected),
    )
    return result


# No retries: a partial delete is resumed by the next scheduled run, which plans afresh.
@task(name="apply-retention", cache_policy=NONE)
def apply(*, plan: RetentionPlan, tracking_uri: str) -> RetentionResult:
    logger = get_run_logger()
    if plan.policy.dry_run:
        for item in plan.delete:
            logger.info("dry run: would delete %s %s (%s)", item.kind, item.target, item.reason)

    def deleted(item) -> None:
        logger.info("deleted %s %s (%s)", item.kind, item.target, item.reason)

    return apply_retention(plan=plan, tracking_uri=tracking_uri, on_delete=deleted)
