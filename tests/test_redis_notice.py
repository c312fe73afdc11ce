"""tests/conftest.py's notice: how many selected tests will skip for lack of redis-server, printed
even under -q; run on a small suite of its own with pytester."""

import os
from pathlib import Path

import pytest

from tests.conftest import INSTALL_REDIS, REDIS_FIXTURE

pytest_plugins = ["pytester"]

SUITE = f"""
import shutil

import pytest


@pytest.fixture
def {REDIS_FIXTURE}():
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server")
    return "redis://unused"


def test_stream({REDIS_FIXTURE}):
    pass


@pytest.mark.parametrize("n", [1, 2, 3])
def test_each({REDIS_FIXTURE}, n):
    pass


@pytest.mark.slow
def test_slow({REDIS_FIXTURE}):
    pass


def test_without_redis():
    pass
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(test_suite=SUITE)
    pytester.makeini("[pytest]\nmarkers = slow: slow")
    return pytester


def _path_with_redis(tmp_path: Path, *, present: bool) -> str:
    """A PATH holding only a directory that does or does not have a redis-server executable (the
    notice looks it up; the suite's tests never run it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if present:
        exe = bin_dir / "redis-server"
        exe.write_text("#!/bin/sh\nexit 1\n")
        exe.chmod(0o755)
    return str(bin_dir)


def test_counts_the_selected_tests_that_need_redis_server(suite, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _path_with_redis(tmp_path, present=False))
    result = suite.runpytest("-q", "-p", "tests.conftest")
    result.assert_outcomes(passed=1, skipped=5)
    notice = f"5 test(s) will be skipped: redis-server is not on PATH (install it: {INSTALL_REDIS})"
    assert result.outlines.count(notice) == 1
    assert result.outlines.index(notice) < next(
        i for i, line in enumerate(result.outlines) if "passed" in line
    )

    # Deselected tests do not count; a selection without Redis tests says nothing.
    result = suite.runpytest("-q", "-p", "tests.conftest", "-m", "not slow")
    assert "4 test(s) will be skipped" in result.stdout.str()
    result = suite.runpytest("-q", "-p", "tests.conftest", "-k", "without_redis")
    result.assert_outcomes(passed=1, deselected=5)
    assert "will be skipped" not in result.stdout.str()


def test_says_nothing_when_redis_server_is_on_path(suite, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _path_with_redis(tmp_path, present=True) + os.pathsep + os.environ["PATH"])
    result = suite.runpytest("-q", "-p", "tests.conftest")
    result.assert_outcomes(passed=6)
    assert "redis-server" not in result.stdout.str()
