"""`mms tune SPEC --trials N`: an Optuna study on Dask, then the best configuration retrained and
registered. Progress (trials, then the retrain's epochs) comes from the flow's log records."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from mms_cli.common import console, settings_from_env, use_servers
from mms_cli.progress import summary_table
from mms_core.secrets import redact_text, redact_url


class TuneProgress(logging.Handler):
    """Context manager: a bar of finished trials and one of the retrain's epochs."""

    def __init__(self, *, trials: int, epochs: int) -> None:
        super().__init__(level=logging.INFO)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self.trials = self.progress.add_task("trials", total=trials)
        self.epochs = self.progress.add_task("retrain epochs", total=epochs, visible=False)
        self._loggers = [logging.getLogger("prefect.task_runs"), logging.getLogger("prefect.flow_runs")]

    def __enter__(self) -> TuneProgress:
        self.progress.start()
        for logger in self._loggers:
            logger.addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        for logger in self._loggers:
            logger.removeHandler(self)
        self.progress.stop()

    def emit(self, record: logging.LogRecord) -> None:
        if trials := getattr(record, "mms_trials", None):
            self.progress.update(self.trials, completed=trials[0], total=trials[1])
        if epoch := getattr(record, "mms_progress", None):
            self.progress.update(self.epochs, completed=epoch[0], total=epoch[1], visible=True)


def tune(
    spec: Annotated[Path, typer.Argument(help="PipelineSpec YAML with a `tuning:` section.")],
    trials: Annotated[int | None, typer.Option(help="Trials in the study (default: the spec's).")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override: section.key=value, tuning.* too (repeatable)."),
    ] = None,
) -> None:
    """Tune hyperparameters: parallel trials on Dask (poor ones pruned); the best retrained and registered."""
    from mms_core.errors import MMSError
    from mms_core.tuning.space import load_tuning

    servers = use_servers(settings_from_env())
    try:
        pipeline_spec, tune_spec = load_tuning(spec, overrides=set_ or [], trials=trials)
    except MMSError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    from mms_core.config import Settings

    settings = Settings()
    console.print(
        study_line(spec=spec, tune=tune_spec, storage_url=settings.study_storage, mode=servers.mode)
    )
    from flows.tuning import tuning

    with TuneProgress(trials=tune_spec.trials, epochs=pipeline_spec.training.epochs):
        try:
            servers.ready(settings)
            with servers.running():
                result = tuning(spec=pipeline_spec, tune=tune_spec)
        except MMSError as exc:  # a database error may quote its URL, password included
            console.print(f"[red]error:[/red] {redact_text(str(exc))}")
            raise typer.Exit(1) from None
    console.print(_study_table(result))
    if result.retrained is not None:
        console.print(summary_table(result=result.retrained, servers=servers))


def study_line(*, spec: Path, tune: Any, storage_url: str, mode: str) -> str:
    """The opening line of `mms tune`: what runs, and where the study lives (password masked)."""
    return (
        f"[bold]mms tune[/bold] {spec}: {tune.trials} trials, {len(tune.params)} parameters, "
        f"study database {redact_url(storage_url)}  ({mode} mode)"
    )


def _study_table(result) -> Table:
    s = result.study
    table = Table(title=f"study {s.study_name}", show_header=False)
    table.add_row("trials", f"{s.completed} completed, {s.pruned} pruned, {s.failed} failed")
    if s.best_number is not None:
        table.add_row(f"best ({s.metric})", f"trial {s.best_number}: {s.best_value:.4f}")
        for name, value in s.best_params.items():
            table.add_row(f"  {name}", str(value))
    table.add_row("MLflow study run", result.study_run_id)
    return table
