"""Fixtures and hooks shared by every test directory. Keep this small: put per-area fixtures
beside their tests."""

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

# The fixture that starts a private redis-server (tests/core/serving/conftest.py); it skips its tests
# when redis-server is not on PATH.
REDIS_FIXTURE = "redis_url"
INSTALL_REDIS = "apt-get update && apt-get install -y redis-server"


def pytest_report_collectionfinish(
    config: pytest.Config, start_path: Path, items: Sequence[pytest.Item]
) -> list[str]:
    """Say up front how many of the selected tests will skip for lack of redis-server, and how to
    install it: skips are easy to miss in a -q run, and they hide the Redis stream tests.

    This hook, unlike pytest_report_header, is printed under -q, and it sees the final selection
    (after -k, -m and deselection).
    """
    if shutil.which("redis-server") is not None:
        return []
    n = sum(REDIS_FIXTURE in item.fixturenames for item in items)
    if n == 0:
        return []
    return [f"{n} test(s) will be skipped: redis-server is not on PATH (install it: {INSTALL_REDIS})"]


@pytest.fixture(scope="session", autouse=True)
def _no_embedded_prefect_server_left(tmp_path_factory):
    """`mms` commands run by tests start the embedded Prefect server of their MMS_HOME
    (infra.embedded_prefect), which would idle on for MMS_PREFECT_IDLE_S after the suite: stop
    every one whose home lies in this session's temporary folder."""
    yield
    from infra.embedded_prefect import stop

    base = tmp_path_factory.getbasetemp().resolve()
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "infra.prefect_keeper" in cmd and "--home" in cmd[:-1]:
            home = Path(cmd[cmd.index("--home") + 1])
            if home.resolve().is_relative_to(base):
                stop(home=home)


@pytest.fixture
def small_df() -> pd.DataFrame:
    """A tiny, deterministic, well-formed table: 90 rows, 4 float features (f0..f3), 3 classes in 'label'.

    Features have a large offset and spread so that standardisation visibly changes them.
    """
    rng = np.random.default_rng(1234)
    n = 90
    df = pd.DataFrame(
        {f"f{i}": (rng.normal(loc=10.0 * (i + 1), scale=i + 2, size=n)).astype(np.float32) for i in range(4)}
    )
    df["label"] = np.arange(n, dtype=np.int64) % 3
    return df
