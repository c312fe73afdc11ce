"""`mms retention`: delete old shards, checkpoints, weights and model versions (or list them)."""

from __future__ import annotations

from typing import Annotated

import typer

from mms_cli.common import console, settings_from_env, use_servers


def retention(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would go; delete nothing.")] = False,
    max_age_days: Annotated[
        float | None,
        typer.Option(help="Delete items older than this (default MMS_RETENTION_MAX_AGE_DAYS, 30)."),
    ] = None,
    keep_last: Annotated[
        int | None, typer.Option(help="Newest versions kept per registered model (default 5).")
    ] = None,
    delete_version: Annotated[
        list[str] | None, typer.Option(help="Also delete this NAME/VERSION, whatever its age (repeatable).")
    ] = None,
) -> None:
    """Apply the retention policy: never aliased, served or last-N versions, nor the data they use."""
    from pydantic import ValidationError
    from rich.table import Table

    from mms_core.errors import MMSError
    from mms_core.retention import RetentionPolicy

    settings = settings_from_env()
    servers = use_servers(settings)
    chosen = {
        "max_age_days": max_age_days,
        "keep_last_versions": keep_last,
        "delete_versions": delete_version,
    }
    try:
        policy = RetentionPolicy(dry_run=dry_run, **{k: v for k, v in chosen.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        console.print(f"[red]error:[/red] {'.'.join(map(str, err['loc']))}: {err['msg']}")
        raise typer.Exit(2) from None
    from flows.retention import retention as retention_flow

    try:
        servers.ready(settings)
        with servers.running():
            state = retention_flow(policy=policy, return_state=True)
        result = state.result()
    except MMSError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    items = result.planned if dry_run else result.deleted
    table = Table("action", "kind", "target", "age (days)", "reason")
    for i in items:
        table.add_row(
            "would delete" if dry_run else "deleted", i.kind, i.target, f"{i.age_days:.1f}", i.reason
        )
    console.print(table)
    console.print(f"{len(items)} item(s) {'would be deleted (dry run)' if dry_run else 'deleted'}")
