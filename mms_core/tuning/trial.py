"""One tuning trial on a Dask worker: a short one-worker training run that reports each epoch's
score to the study (in the caller's process) and stops when the study prunes it."""

from __future__ import annotations

from typing import Any

from distributed import Variable, get_worker

from mms_core.errors import TrainingError
from mms_core.training.loop import train_rank
from mms_core.training.spec import RankResult, TrainJob

DECISION_TIMEOUT_S = 60.0  # the study's answer to a report; without one the trial goes on


class TrialPruned(TrainingError):
    """The study stopped this trial: its intermediate score was worse than its peers'."""


def decision_name(*, topic: str, number: int, epoch: int) -> str:
    """Name of the Dask Variable that carries the prune decision for one report."""
    return f"{topic}-t{number}-e{epoch}"


def run_trial(job: TrainJob, *, topic: str, number: int, ask_prune: bool) -> RankResult:
    """Train ``job`` on this worker (one rank); after each epoch send its metrics to ``topic``
    and, with ``ask_prune``, wait for the study's prune decision (the caller sets a Variable).

    Raises:
        TrialPruned: the study pruned the trial after an epoch.
    """
    worker = get_worker()

    def emit(ev: dict[str, Any]) -> None:
        if ev.get("kind") != "epoch":
            return
        worker.log_event(topic, {**ev, "trial": number})
        if not ask_prune:
            return
        answer = Variable(decision_name(topic=topic, number=number, epoch=ev["epoch"]))
        try:
            prune = bool(answer.get(timeout=DECISION_TIMEOUT_S))
        except TimeoutError:
            prune = False
        answer.delete()
        if prune:
            raise TrialPruned(f"trial {number} pruned after epoch {ev['epoch']}")

    return train_rank(job=job, rank=0, world_size=1, emit=emit)
