"""What every task module shares: the transient-fault retry rule, lineage helpers, and the task
that ends a flow's MLflow run (with the helper a flow's ``except`` block calls)."""

from __future__ import annotations

import subprocess
from typing import Any

from mlflow.exceptions import MlflowException
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from mms_core import registry
from mms_core.errors import MMSError

_TRANSPORT = (OSError, ConnectionError, TimeoutError)
# MLflow's codes for "try again later": a locked or unreachable SQL store, a rate limit.
_MLFLOW_TRANSIENT = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry storage/network faults only; bad input (MMSError) fails at once.

    MLflow reports a transport fault as an MlflowException: a locked SQLite store as
    TEMPORARILY_UNAVAILABLE, a refused connection or a 5xx that outlasted its own HTTP retries
    as one raised while handling the requests error (an OSError).
    """
    try:
        state.result(raise_on_failure=True)
    except MMSError:
        return False
    except _TRANSPORT:
        return True
    except MlflowException as exc:
        return exc.error_code in _MLFLOW_TRANSIENT or isinstance(exc.__cause__ or exc.__context__, _TRANSPORT)
    except Exception:
        return False
    return False


# Idempotent (setting a run's status twice leaves it set), so safe to retry.
@task(name="end-run", cache_policy=NONE, retries=3, retry_delay_seconds=2, retry_condition_fn=transient)
def end_run(*, tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    registry.end_run(tracking_uri=tracking_uri, run_id=run_id, status=status)
    get_run_logger().info("MLflow run %s ended %s", run_id, status)


def end_run_failed(*, tracking_uri: str, run_id: str) -> None:
    """Mark ``run_id`` FAILED from a flow's ``except`` block, through the end-run task (retried).

    Never raises an Exception: if the run cannot be marked, that is logged and the flow goes on
    to re-raise its own error, the one worth reporting.
    """
    try:
        end_run(tracking_uri=tracking_uri, run_id=run_id, status="FAILED")
    except Exception:
        get_run_logger().exception(
            "could not mark MLflow run %s FAILED (it may stay RUNNING); the flow's own error follows", run_id
        )


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "none")
