"""What every `mms` command shares: the console, settings from the environment, the local stack."""

from __future__ import annotations

import os

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
