"""`mms serve`, `mms keys ...`, `mms usage`: the online server and what it bills. Heavy imports
stay inside the commands (see main.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from mms_cli.common import console, settings_from_env, use_stack_if_up

keys_app = typer.Typer(help="Issue, list and revoke API keys for the online server (stored hashed).")


def serve(
    model: Annotated[str, typer.Option(help="Registered model as NAME@ALIAS or NAME/VERSION.")],
    replicas: Annotated[int | None, typer.Option(help="Model replicas on the Dask workers.")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (beyond loopback needs API keys).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port.")] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Rows per forward pass at most.")] = None,
    require_key: Annotated[
        bool | None, typer.Option("--require-key/--no-require-key", help="Default: only beyond loopback.")
    ] = None,
) -> None:
    """Online HTTP server: replicas on Dask, load-balanced, dynamic batching; Ctrl-C/SIGTERM drains."""
    from pydantic import ValidationError

    from mms_core.errors import MMSError
    from mms_core.serving.online.config import ServeConfig

    settings = settings_from_env()
    use_stack_if_up(settings)
    chosen = {"replicas": replicas, "host": host, "port": port, "max_batch_size": max_batch_size}
    try:
        config = ServeConfig(require_key=require_key, **{k: v for k, v in chosen.items() if v is not None})
    except ValidationError as exc:
        console.print(f"[red]error:[/red] {exc.errors()[0]['msg']}")
        raise typer.Exit(2) from None
    from infra.cluster import dask_scheduler
    from mms_core.config import Settings
    from mms_core.serving.online.server import build_server, serve_forever

    settings = Settings()  # after the stack may have set MMS_* variables
    with dask_scheduler(settings) as address:  # the server's runtime opens the one Dask client
        try:
            server = build_server(
                config=config, model=model, tracking_uri=settings.tracking_uri,
                scheduler_address=address, home=settings.home,
            )  # fmt: skip
        except MMSError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from None
        console.print(
            f"serving {model} with {config.replicas} replica(s) on http://{config.host}:{config.port} "
            f"(docs /docs, metrics /metrics; API keys {'required' if config.auth_required else 'optional'})"
        )
        serve_forever(server)
    if not server.started:
        raise typer.Exit(1)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Who is billed for this key's usage.")],
    quota_rows_per_min: Annotated[int | None, typer.Option(help="Rows per minute; 429 beyond.")] = None,
    admin: Annotated[bool, typer.Option(help="May call the /admin API (rollouts).")] = False,
) -> None:
    """Issue an API key; the key is shown once and stored only as a hash."""
    from mms_core.errors import MMSError
    from mms_core.serving.metering import KeyStore, metering_path

    try:
        token, key = KeyStore(path=metering_path(settings_from_env().home)).create(
            tenant=tenant, admin=admin, quota_rows_per_min=quota_rows_per_min
        )
    except MMSError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"key {key.key_id} for tenant {key.tenant} (shown once, keep it safe):")
    print(token)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (k_...), from `mms keys list`.")],
) -> None:
    """Revoke a key; servers refuse it (403) within seconds."""
    from mms_core.errors import MMSError
    from mms_core.serving.metering import KeyStore, metering_path

    try:
        key = KeyStore(path=metering_path(settings_from_env().home)).revoke(key_id=key_id)
    except MMSError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"revoked {key.key_id} (tenant {key.tenant})")


@keys_app.command("list")
def keys_list() -> None:
    """List keys (ids, tenants, quotas; never the secrets)."""
    from rich.table import Table

    from mms_core.serving.metering import KeyStore, metering_path

    table = Table("key id", "tenant", "admin", "quota rows/min", "created", "revoked")
    for k in KeyStore(path=metering_path(settings_from_env().home)).list():
        table.add_row(
            k.key_id, k.tenant, "yes" if k.admin else "", str(k.quota_rows_per_min or "-"),
            k.created.strftime("%Y-%m-%d %H:%M"), "yes" if k.revoked else "",
        )  # fmt: skip
    console.print(table)


def usage(
    since: Annotated[str, typer.Option(help="Start date/time, ISO 8601 (UTC), e.g. 2026-11-01.")],
    until: Annotated[str | None, typer.Option(help="End (exclusive), ISO 8601 (UTC).")] = None,
    price_per_1k_rows: Annotated[
        float | None, typer.Option(help="Default: MMS_SERVE_PRICE_PER_1K_ROWS.")
    ] = None,
) -> None:
    """Usage per API key and model version (requests, rows, compute) with its price."""
    from datetime import UTC, datetime

    from rich.table import Table

    from mms_core.serving.metering import metering_path, usage_report
    from mms_core.serving.online.config import ServeConfig

    def when(text: str) -> datetime:
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            console.print(f"[red]error:[/red] {text!r} is not an ISO date, e.g. 2026-11-01T08:00")
            raise typer.Exit(2) from None
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    price = price_per_1k_rows if price_per_1k_rows is not None else ServeConfig().price_per_1k_rows
    rows = usage_report(
        path=metering_path(settings_from_env().home), since=when(since), until=when(until) if until else None,
        price_per_1k_rows=price,
    )  # fmt: skip
    table = Table("tenant", "key", "model", "version", "requests", "rows", "compute ms", f"cost @{price}/1k")
    for r in rows:
        table.add_row(
            r.tenant, r.key_id, r.model, r.version, str(r.requests), str(r.rows),
            f"{r.compute_ms:.1f}", f"{r.cost:.4f}",
        )  # fmt: skip
    console.print(table)
    console.print(f"total: {sum(r.rows for r in rows)} rows, {sum(r.cost for r in rows):.4f}")


def stream(
    model: Annotated[str, typer.Option(help="Registered model as NAME@ALIAS or NAME/VERSION.")],
    source: Annotated[
        str | None,
        typer.Option(
            help="redis://HOST:PORT/DB?stream=NAME, or a directory of *.ndjson (default MMS_HOME/stream/in)."
        ),
    ] = None,
    sink: Annotated[
        str | None,
        typer.Option(
            help="redis://...?stream=NAME, or a directory for answers (default MMS_HOME/stream/out)."
        ),
    ] = None,
    consumers: Annotated[int, typer.Option(help="Consumers (long-lived Dask tasks) in the group.")] = 2,
    batch_size: Annotated[int, typer.Option(help="Messages per micro-batch (one forward pass).")] = 64,
    idle_exit_s: Annotated[
        float | None, typer.Option(help="Stop after this long with nothing to do; default: run until Ctrl-C.")
    ] = None,
    stats_dir: Annotated[
        str | None,
        typer.Option(
            help="Where consumers write input/prediction statistics for `monitoring` "
            "(default <storage>/monitoring/NAME/stream)."
        ),
    ] = None,
) -> None:
    """Streaming predictor: consume a Redis Stream (consumer group) or NDJSON files on Dask workers."""
    from infra.cluster import dask_client
    from mms_core.config import Settings
    from mms_core.errors import MMSError
    from mms_core.monitoring.live import stream_stats_uri
    from mms_core.serving.offline.stream import StreamOptions, stream_registered

    use_stack_if_up(settings_from_env())
    settings = Settings()
    source = source or str(settings.home / "stream" / "in")
    sink = sink or str(settings.home / "stream" / "out")
    stats_dir = stats_dir or stream_stats_uri(storage_root=settings.storage_root, model=model)
    options = StreamOptions(batch_size=batch_size, idle_exit_s=idle_exit_s, stats_uri=stats_dir)
    from mms_core.secrets import redact_text, redact_url  # a redis:// URL may carry a password

    console.print(
        f"streaming {redact_url(source)} -> {redact_url(sink)} with {model} "
        f"({consumers} consumers; Ctrl-C stops)"
    )
    with dask_client(settings) as client:
        try:
            result = stream_registered(
                client=client, tracking_uri=settings.tracking_uri, model=model, source=source, sink=sink,
                consumers=consumers, options=options,
            )  # fmt: skip
        except MMSError as exc:
            console.print(f"[red]error:[/red] {redact_text(str(exc))}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("stopped; unacknowledged messages stay pending for the next consumer")
            raise typer.Exit(130) from None
    console.print(
        f"{result.messages} messages ({result.rows} rows, {result.errors} errors, "
        f"{result.reclaimed} reclaimed, {result.dead} dead-lettered) answered by v{result.model_version}"
    )
