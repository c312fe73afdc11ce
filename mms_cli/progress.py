"""Rich rendering for the CLI: a progress display fed by the flow's own log records, and the
summary table. The flow knows nothing about the terminal; it logs, and we listen."""

from __future__ import annotations

import logging
import os
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from mms_core.secrets import redact_url

STEPS = ("ingest", "preprocess-and-shard", "start-tracking", "train", "evaluate", "compress", "register")


class PipelineProgress(logging.Handler):
    """Context manager: shows pipeline steps and training epochs while the flow runs."""

    def __init__(self, *, console: Console, epochs: int) -> None:
        super().__init__(level=logging.INFO)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.steps = self.progress.add_task("pipeline", total=len(STEPS))
        self.epochs = self.progress.add_task("training epochs", total=epochs)
        self._loggers = [logging.getLogger("prefect.task_runs"), logging.getLogger("prefect.flow_runs")]

    def __enter__(self) -> PipelineProgress:
        self.progress.start()
        for logger in self._loggers:
            logger.addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        for logger in self._loggers:
            logger.removeHandler(self)
        self.progress.stop()

    def emit(self, record: logging.LogRecord) -> None:
        epoch = getattr(record, "mms_progress", None)
        if epoch:
            self.progress.update(self.epochs, completed=epoch[0], total=epoch[1])
        step = getattr(record, "task_name", None)  # set by Prefect's task-run logger
        if step in STEPS:
            self.progress.update(self.steps, description=f"pipeline: {step}")
            if record.getMessage().startswith("Finished in state"):
                self.progress.advance(self.steps)


def summary_table(*, result: Any, servers: Any) -> Table:
    """The closing summary of `mms run`: metrics, MLflow run, model version and alias, UI links."""
    table = Table(title="training-pipeline", show_header=False)
    ev, reg, comp = result.evaluation, result.registration, result.compression
    rows = [
        ("test accuracy / macro-F1", f"{ev.accuracy:.4f} / {ev.macro_f1:.4f}"),
        ("training", f"{result.train_seconds:.1f} s, {result.samples_per_s:,.0f} samples/s"),
        ("model", f"{result.model_name} v{reg.version} -> @{reg.alias}"),
        ("gate", reg.reason),
    ]
    if comp is not None:
        rows.append(
            (
                "compressed (int8)",
                f"v{reg.compressed_version}: {comp.size_ratio:.1f}x smaller, "
                f"accuracy {comp.compressed_accuracy:.4f}, {comp.compressed_latency_ms:.2f} ms vs "
                f"{comp.full_latency_ms:.2f} ms / batch",
            )
        )
    rows += [("MLflow run", result.run_id), ("Prefect flow run", result.flow_run_id)]
    tracking = redact_url(result.tracking_uri)  # a database or server URL may hold a password
    if tracking.startswith("http"):
        rows.append(("MLflow UI", f"{tracking}/#/models/{result.model_name}"))
    else:
        rows.append(("MLflow UI", f"mlflow ui --backend-store-uri {tracking}"))
    prefect_api = redact_url(os.environ.get("PREFECT_API_URL", ""))
    if servers.mode == "embedded":
        rows.append(("Prefect", f"embedded API {prefect_api} (no UI; `mms stack up` runs one with the UI)"))
    else:
        rows.append(("Prefect UI", f"{prefect_api.removesuffix('/api')}/runs/flow-run/{result.flow_run_id}"))
    for key, value in rows:
        table.add_row(key, value)
    return table
