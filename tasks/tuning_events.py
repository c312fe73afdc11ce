"""What the tuning task does with a study's trial events: one nested MLflow run per trial (under
the study's run), its metrics per epoch, and Prefect log lines with the study's progress."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from mms_core import registry

TRIAL_METRICS = ("train_loss", "val_loss", "val_accuracy")
END_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


@dataclass
class TrialRuns:
    """Callable handed to ``run_study`` as ``on_event``; runs in the flow's thread."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    study_name: str
    trials: int
    logger: logging.Logger | logging.LoggerAdapter
    runs: dict[int, str] = field(default_factory=dict)
    finished: int = 0

    def __call__(self, ev: dict[str, Any]) -> None:
        kind, number = ev["kind"], ev["trial"]
        if kind == "trial_start":
            self.runs[number] = registry.start_run(
                tracking_uri=self.tracking_uri,
                experiment_id=self.experiment_id,
                run_name=f"{self.study_name}-trial-{number}",
                tags={
                    "mlflow.parentRunId": self.parent_run_id,
                    "mms.study": self.study_name,
                    "mms.trial": str(number),
                },
                params=ev["params"],
            )
            self.logger.info("trial %d started: %s", number, ev["params"])
        elif kind == "trial_epoch" and number in self.runs:
            registry.log_metrics(
                tracking_uri=self.tracking_uri,
                run_id=self.runs[number],
                metrics={k: ev[k] for k in TRIAL_METRICS},
                step=ev["epoch"],
            )
        elif kind == "trial_end":
            self.end(ev)

    def end(self, ev: dict[str, Any]) -> None:
        number, state = ev["trial"], ev["state"]
        self.finished += 1
        if (run_id := self.runs.get(number)) is not None:
            client = registry.client(tracking_uri=self.tracking_uri)
            client.set_tag(run_id, "mms.trial_state", state)
            if ev.get("error"):
                client.set_tag(run_id, "mms.trial_error", str(ev["error"])[:4000])
            if ev.get("value") is not None:
                registry.log_metrics(
                    tracking_uri=self.tracking_uri, run_id=run_id, metrics={"value": ev["value"]}
                )
            registry.end_run(tracking_uri=self.tracking_uri, run_id=run_id, status=END_STATUS[state])
        log = self.logger.warning if state == "FAIL" else self.logger.info
        log(
            "trial %d %s%s%s",
            number,
            state.lower(),
            f": {ev['value']:.4f}" if ev.get("value") is not None else "",
            f" ({ev['error']})" if ev.get("error") else "",
            extra={"mms_trials": (self.finished, self.trials)},
        )
