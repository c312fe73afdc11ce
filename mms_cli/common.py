"""What every `mms` command shares: the console, settings from the environment, the servers."""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rich.console import Console

console = Console()


def settings_from_env():
    from mms_core.config import Settings, prefect_env

    settings = Settings()
    os.environ.update(prefect_env(settings))  # before prefect is imported
    return settings


def use_stack_if_up(settings) -> bool:
    """Point this process at `mms stack up`'s servers, unless the environment already chose."""
    from infra.stack import stack_env, stack_status

    state = stack_status(home=settings.home)
    if state is None or not state.all_alive:
        return False
    for key, value in stack_env(state).items():
        os.environ.setdefault(key, value)
    return True


@dataclass
class Servers:
    """Which servers a command talks to: `mms stack up`'s, the home's embedded Prefect server, or
    whatever PREFECT_API_URL the environment names."""

    mode: str  # "stack" | "embedded" | "external"
    lease: Any = None  # infra.embedded_prefect.Lease in embedded mode

    def ready(self, settings) -> None:
        """Wait for the embedded Prefect server (no-op otherwise). Raises MMSError with the fix."""
        if self.lease is not None:
            self.lease.wait_ready(timeout_s=settings.prefect_start_timeout_s)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Settings for the flows this command runs. In embedded mode: no flow-run heartbeats (they
        feed a full server's zombie-run automations, the embedded server runs none, and the engine's
        wait for the heartbeat thread, which sleeps in 1 s steps, added up to 1 s to the end of every
        flow), and no "View at <UI link>" log line (the embedded server serves no UI)."""
        if self.mode != "embedded":
            yield
            return
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_UI_URL, temporary_settings

        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None, PREFECT_UI_URL: ""}):
            yield


def use_servers(settings) -> Servers:
    """Choose the servers before prefect is imported: the stack when it runs, else the
    environment's PREFECT_API_URL, else a lease on the home's embedded Prefect server, which
    then starts while the command imports and prepares (call ``Servers.ready`` before a flow)."""
    if use_stack_if_up(settings):
        return Servers(mode="stack")
    if os.environ.get("PREFECT_API_URL"):
        return Servers(mode="external")
    from infra.embedded_prefect import acquire

    lease = acquire(home=settings.home, idle_s=settings.prefect_idle_s)
    os.environ["PREFECT_API_URL"] = lease.api_url
    atexit.register(lease.release)
    return Servers(mode="embedded", lease=lease)
