"""One entry point for every training strategy: the flow never needs to know which one runs.

Each strategy is a function ``(*, client, job, on_event) -> list[RankResult]`` in its own module
(ddp.py, fedavg.py, ...), selected by ``training.strategy`` in the spec; rank 0's result carries
the history and the final weights' URI.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distributed import Client

from mms_core.training.checkpoint import clear_checkpoints
from mms_core.training.ddp import run_ddp
from mms_core.training.fedavg import run_fedavg
from mms_core.training.fsdp import run_fsdp
from mms_core.training.hierarchical import run_hierarchical
from mms_core.training.param_server import run_param_server
from mms_core.training.spec import RankResult, TrainJob, TrainSpec

Strategy = Callable[..., list[RankResult]]
STRATEGIES: dict[str, Strategy] = {
    "ddp": run_ddp,
    "fsdp": run_fsdp,
    "hierarchical": run_hierarchical,
    "param_server": run_param_server,
    "fedavg": run_fedavg,
}


def run_strategy(
    *, client: Client, job: TrainJob, on_event: Callable[[dict[str, Any]], None] | None = None
) -> list[RankResult]:
    """Train ``job`` with the strategy its spec names (``job.train.strategy``).

    ``training.resume=false`` means "do not resume from an earlier run": the checkpoints under
    the job's key are deleted first, and the run then resumes from its own checkpoints only, so a
    fail-over restart after a lost worker continues this run instead of starting it over.
    """
    if not job.train.resume:
        clear_checkpoints(job.checkpoint_uri)
        job = job.model_copy(update={"train": job.train.model_copy(update={"resume": True})})
    return STRATEGIES[job.train.strategy](client=client, job=job, on_event=on_event)


def progress_units(train: TrainSpec) -> int:
    """How many epochs (DDP) or rounds (federated) a run reports: the progress bar's length."""
    return train.fedavg.rounds if train.strategy == "fedavg" else train.epochs
