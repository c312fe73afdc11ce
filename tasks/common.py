"""What every task module shares: the transient-fault retry rule and lineage helpers."""

from __future__ import annotations

import subprocess
from typing import Any

from mms_core.errors import MMSError


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry storage/network faults only; bad input (MMSError) fails at once."""
    try:
        state.result(raise_on_failure=True)
    except MMSError:
        return False
    except (OSError, ConnectionError, TimeoutError):
        return True
    except Exception:
        return False
    return False


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
