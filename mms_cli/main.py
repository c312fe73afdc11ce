"""`mms` CLI (typer). Heavy imports (torch, prefect, mlflow) happen inside commands: Dask's
spawned workers re-import this module, and `mms --help` should answer at once."""

from __future__ import annotations

import atexit
import gc
from pathlib import Path
from typing import Annotated

import typer

from mms_cli.common import console, settings_from_env, use_servers, use_stack_if_up
from mms_cli.progress import PipelineProgress, summary_table
from mms_cli.retention import retention
from mms_cli.serving import keys_app, serve, stream, usage
from mms_cli.tune import tune
from mms_core.secrets import redact_text, redact_url

app = typer.Typer(help="MMS: train, compress, register and serve PyTorch models.", no_args_is_help=True)
stack_app = typer.Typer(
    help="Start, inspect and stop the local stack (Prefect, MLflow, Dask, Redis) on 127.0.0.1."
)
app.add_typer(stack_app, name="stack")
app.add_typer(keys_app, name="keys")
app.command()(serve)
app.command()(usage)
app.command()(stream)
app.command()(retention)
app.command()(tune)
DEFAULT_SPEC = Path("examples/digits.yaml")
# Runs after the command, before the interpreter's teardown: with torch, prefect and mlflow loaded
# (~6,000 modules) the teardown's last garbage collections took ~1.9 s of every `mms run`'s exit on
# 2 cores, to free memory the process is about to give back anyway; frozen objects are skipped.
atexit.register(gc.freeze)


@app.command()
def run(
    spec: Annotated[
        Path | None, typer.Argument(help="PipelineSpec YAML (default: examples/digits.yaml).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override: section.key=value (repeatable).")
    ] = None,
) -> None:
    """Run the training pipeline: ingest, shard, train (DDP on Dask), evaluate, compress, register."""
    servers = use_servers(settings_from_env())  # an embedded Prefect server starts beside the imports below
    from mms_core.errors import MMSError
    from mms_core.spec import load_spec

    path = spec if spec is not None else (DEFAULT_SPEC if DEFAULT_SPEC.exists() else None)
    try:
        pipeline_spec = load_spec(path, overrides=set_ or [])
    except MMSError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    from mms_core.config import Settings

    settings = Settings()  # after the stack may have set MMS_* variables
    console.print(f"[bold]mms run[/bold] {path or '(defaults)'}  home={settings.home}  {servers.mode} mode")
    from flows.training_pipeline import training_pipeline
    from mms_core import registry
    from mms_core.training.strategies import progress_units

    try:
        with console.status("opening the MLflow store and the Prefect server..."):
            registry.open_store(tracking_uri=settings.tracking_uri)  # migrations, while Prefect starts
            servers.ready(settings)
        with (
            PipelineProgress(console=console, epochs=progress_units(pipeline_spec.training)),
            servers.running(),
        ):
            result = training_pipeline(spec=pipeline_spec)
    except MMSError as exc:
        console.print(f"[red]error:[/red] {redact_text(str(exc))}")
        raise typer.Exit(1) from None
    console.print(summary_table(result=result, servers=servers))


@app.command()
def predict(
    model: Annotated[str, typer.Option(help="Registered model as NAME@ALIAS or NAME/VERSION.")],
    input: Annotated[str, typer.Option("--input", help="CSV or Parquet at any fsspec URI.")],
    output: Annotated[str, typer.Option("--output", help="Where to write the Parquet predictions.")],
    id_column: Annotated[str | None, typer.Option(help="Input column copied to the output as 'id'.")] = None,
    probabilities: Annotated[
        bool, typer.Option(help="Also write one prob_<class> column per class.")
    ] = False,
) -> None:
    """Batch prediction on Dask: every row of --input through --model, Parquet to --output."""
    from mms_core.errors import MMSError

    settings = settings_from_env()
    servers = use_servers(settings)
    from flows.batch_predict import batch_predict

    with console.status(f"predicting {redact_url(input)} with {model} on Dask..."):
        try:
            servers.ready(settings)
            with servers.running():
                result = batch_predict(
                    model=model,
                    input_uri=input,
                    output_uri=output,
                    id_column=id_column,
                    probabilities=probabilities,
                )
        except MMSError as exc:
            console.print(f"[red]error:[/red] {redact_text(str(exc))}")
            raise typer.Exit(1) from None
    shown = redact_url(result.output_uri)
    console.print(f"{result.rows} rows predicted by {model} (v{result.model_version}) -> {shown}")


@app.command()
def deploy(
    spec: Annotated[
        Path | None, typer.Option(help="Spec for the scheduled deployment (default: examples/digits.yaml).")
    ] = None,
    cron: Annotated[
        str, typer.Option(help="Cron schedule of training-pipeline/digits-nightly.")
    ] = "0 2 * * *",
    work_pool: Annotated[
        str | None,
        typer.Option(
            help="Register the deployments with this process work pool (created if missing) and "
            "return; `prefect worker start --pool NAME` then runs them. Default: serve them here (blocks)."
        ),
    ] = None,
) -> None:
    """Serve the flows as Prefect deployments (needs `mms stack up` or PREFECT_API_URL); blocks.
    With --work-pool, register them for that pool's workers instead."""
    settings = settings_from_env()
    use_stack_if_up(settings)
    from flows.deploy import register_deployments, serve_deployments
    from mms_core.errors import MMSError

    try:
        if work_pool is None:
            serve_deployments(spec_path=spec, cron=cron)
            return
        names = register_deployments(work_pool=work_pool, spec_path=spec, cron=cron)
    except MMSError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    console.print(f"{len(names)} deployments registered with work pool {work_pool!r}: {', '.join(names)}")
    console.print(f"start a worker to run them: prefect worker start --pool {work_pool}")


@stack_app.command("up")
def stack_up_cmd(
    redis: Annotated[bool, typer.Option(help="Also start redis-server if it is installed.")] = True,
) -> None:
    """Start Prefect server, MLflow server, Dask scheduler + 2 workers (and Redis) on 127.0.0.1."""
    from infra.stack import StackError, stack_env, stack_up

    settings = settings_from_env()
    with console.status("starting the local stack (Prefect, MLflow, Dask, Redis)..."):
        try:
            state = stack_up(home=settings.home, with_redis=redis)
        except StackError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from None
    _print_stack(state)
    console.print("\n`mms run` uses it automatically; other shells can export:")
    for key, value in stack_env(state).items():
        console.print(f"  export {key}={redact_url(value)}")  # the real value: the stack state file


@stack_app.command("status")
def stack_status_cmd() -> None:
    """Show the recorded stack and whether each component answers, and the embedded Prefect server."""
    from infra import embedded_prefect
    from infra.stack import stack_status

    home = settings_from_env().home
    embedded = embedded_prefect.status(home=home)
    if embedded is not None:
        console.print(f"embedded Prefect server: pid {embedded.pid}, {redact_url(embedded.api_url)}")
    state = stack_status(home=home)
    if state is None:
        console.print("no stack recorded (start one with `mms stack up`)")
        raise typer.Exit(1)
    _print_stack(state)


@stack_app.command("down")
def stack_down_cmd() -> None:
    """Stop exactly the processes `mms stack up` started, and the home's embedded Prefect server."""
    from infra import embedded_prefect
    from infra.stack import stack_down

    home = settings_from_env().home
    stopped = stack_down(home=home)
    if embedded_prefect.stop(home=home):
        stopped.append("embedded-prefect")
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


def _print_stack(state) -> None:
    from rich.table import Table

    table = Table("component", "pid", "url", "alive", "log")
    for c in state.components:
        table.add_row(
            c.name,
            str(c.pid),
            redact_url(c.url or ""),
            "[green]yes[/green]" if c.alive else "[red]no[/red]",
            str(c.log),
        )
    for name, why in (state.skipped or {}).items():
        table.add_row(name, "-", "", "skipped", why)
    console.print(table)
