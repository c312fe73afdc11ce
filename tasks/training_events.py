"""What the train task does with the events a strategy streams back: MLflow metrics per epoch,
Prefect log lines (with progress), and notes on resumes and restarts."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from mms_core import registry
from mms_core.training.spec import RankResult

EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "samples_per_s", "lr")
LM_METRICS = ("tokens_per_s", "mfu")


@dataclass
class TrainingEvents:
    """Callable handed to ``run_strategy`` as ``on_event``; runs in the flow's thread."""

    tracking_uri: str
    run_id: str
    logger: logging.Logger | logging.LoggerAdapter
    logged: set[int] = field(default_factory=set)

    def __call__(self, ev: dict[str, Any]) -> None:
        kind = ev.get("kind")
        if kind == "epoch":
            self.epoch(ev)
        elif kind == "resume":
            self.logger.info("resuming from the checkpoint at step %d (epoch %d)", ev["step"], ev["epoch"])
        elif kind == "restart":
            self.logger.warning(
                "restart %d from the last checkpoint (%s); the run had reached step %d",
                ev["attempt"],
                ev["reason"],
                ev["last_step"],
            )
            self._metrics({"restarts": ev["attempt"]}, step=ev["last_step"])
        elif kind == "staleness":  # param_server: how many versions old the applied gradients were
            counts = {int(k): n for k, n in ev["histogram"].items()}
            total = max(sum(counts.values()), 1)
            self._metrics(
                {
                    "staleness_max": max(counts, default=0),
                    "staleness_mean": sum(k * n for k, n in counts.items()) / total,
                },
                step=ev["epoch"],
            )

    def epoch(self, ev: dict[str, Any]) -> None:
        """One epoch (or federated round): metrics to MLflow, a log line with progress."""
        metrics = {k: ev[k] for k in EPOCH_METRICS} | {k: ev[k] for k in LM_METRICS if ev.get(k) is not None}
        self._metrics(metrics, step=ev["epoch"])
        self.logged.add(ev["epoch"])
        self.logger.info(
            "epoch %d/%d loss %.4f val_acc %.4f %.0f samples/s",
            ev["epoch"],
            ev["epochs"],
            ev["train_loss"],
            ev["val_accuracy"],
            ev["samples_per_s"],
            extra={"mms_progress": (ev["epoch"], ev["epochs"])},
        )

    def finish(self, rank0: RankResult, *, epochs: int) -> None:
        """Log what the events may have missed (they are best-effort) and the strategy's figures."""
        for m in rank0.history:
            if m.epoch not in self.logged:
                self.epoch({**m.model_dump(), "epochs": epochs})
        if rank0.stats:
            registry.log_artifact_bytes(
                tracking_uri=self.tracking_uri,
                run_id=self.run_id,
                name="strategy_stats.json",
                data=json.dumps(rank0.stats, indent=2, sort_keys=True).encode(),
            )
            numeric = {f"strategy.{k}": float(v) for k, v in rank0.stats.items() if _is_number(v)}
            if numeric:
                self._metrics(numeric, step=rank0.steps)

    def _metrics(self, metrics: dict[str, float], *, step: int) -> None:
        registry.log_metrics(tracking_uri=self.tracking_uri, run_id=self.run_id, metrics=metrics, step=step)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
