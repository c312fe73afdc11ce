"""bench.serving's A/B against an earlier revision without servers: the per-pair ratios and their
summary, the goal, what a failure leaves, the check that REV's tree runs its own code, and the
report's table."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import pytest

from bench import serving

MACHINE, DATE = "x86_64 2 cpu", "2026-12-03"
STAMP = {"bench": "serving", "machine": MACHINE, "date": DATE}
SUBJECT = "Embedded Prefect server: the lease file name is made where it is read"


def side(p50: float, rps: float, **extra: object) -> dict:
    return {"p50_ms": p50, "p99_ms": 2 * p50, "rps_1": 1000 / p50, "rps": rps, "non_200": {}} | extra


def pair(n: int, ours: dict, rev: dict) -> dict:
    order = ["rev", "ours"] if n % 2 == 0 else ["ours", "rev"]
    line = {"measure": "revision_pair", "against": "dc58bb3", "pair": n, "order": order, "duration_s": 1.0}
    return STAMP | line | {"ours": ours, "rev": rev}


def revision_lines() -> list[dict]:
    head = {"measure": "revision", "against": "dc58bb3", "rev_commit": "dc58bb3", "rev_subject": SUBJECT}
    return [
        STAMP | head | {"ours_head": "abc1234 + working tree"},
        pair(0, side(2.0, 1900.0), side(2.0, 2000.0)),  # p50 1.0, rps 0.95
        pair(1, side(2.2, 2000.0), side(2.0, 2000.0)),  # p50 1.1, rps 1.0
        pair(2, side(1.8, 1700.0), side(2.0, 2000.0)),  # p50 0.9, rps 0.85
        pair(3, side(2.1, 2100.0), side(2.0, 2000.0)),  # p50 1.05, rps 1.05
    ]


def test_pair_ratios() -> None:
    assert serving.pair_ratios(side(2.2, 1800.0), side(2.0, 2000.0)) == {
        "p50_ratio": 1.1,
        "p99_ratio": 1.1,
        "rps_ratio": 0.9,
    }
    none = serving.pair_ratios(side(2.0, 10.0), side(float("nan"), 0.0))  # REV answered nothing
    assert none == {"p50_ratio": None, "p99_ratio": None, "rps_ratio": None}


def test_revision_summary_medians_ranges_and_goal() -> None:
    (s,) = serving.revision_summary(revision_lines())
    assert s["summary"] == "revision_ab" and s["rev"] == "dc58bb3" and s["rev_subject"] == SUBJECT
    assert s["ours_head"] == "abc1234 + working tree" and s["pairs"] == 4 and s["duration_s"] == 1.0
    assert s["p50_ratios"] == [1.0, 1.1, 0.9, 1.05] and s["p50_ratio"] == 1.025
    assert s["p50_ratio_range"] == [0.9, 1.1] and s["p99_ratio"] == 1.025
    assert s["rps_ratios"] == [0.95, 1.0, 0.85, 1.05] and s["rps_ratio"] == 0.975
    assert s["rps_ratio_range"] == [0.85, 1.05]
    assert s["ours_figures"] == {"p50_ms": 2.05, "p99_ms": 4.1, "rps": 1950.0}
    assert s["rev_figures"] == {"p50_ms": 2.0, "p99_ms": 4.0, "rps": 2000.0}
    assert s["failed"] == [] and s["meets_goal"] is True
    assert serving.revision_summary([{"measure": "load"}, {"summary": "mixed_traffic"}]) == []

    slow = revision_lines()
    for line in slow[1:]:
        line["ours"] = side(2.4, 1700.0)  # p50 1.2x, rps 0.85x
    (s,) = serving.revision_summary(slow)
    assert s["p50_ratio"] == 1.2 and s["rps_ratio"] == 0.85 and s["meets_goal"] is False

    non_200 = revision_lines()
    non_200[2]["ours"]["non_200"] = {"503": 4}
    (s,) = serving.revision_summary(non_200)
    assert s["non_200"] == {"ours": {"503": 4}, "rev": {}} and s["meets_goal"] is False

    failed = revision_lines()
    failed[3]["ours"] = {"error": "CalledProcessError: loadgen exit 1"}
    (s,) = serving.revision_summary(failed)
    assert s["pairs"] == 4 and s["p50_ratios"] == [1.0, 1.1, 1.05]  # the failed pair left out
    assert s["failed"] == ["pair 2 ours: CalledProcessError: loadgen exit 1"] and s["meets_goal"] is False


def bench_args(**extra: object) -> argparse.Namespace:
    args = {"against": "dc58bb3", "revision_pairs": 2, "revision_duration": 0.1, "warmup": 0.1, "prime": 0.1}
    return argparse.Namespace(**args | extra)


def test_a_failed_block_is_recorded_not_raised(tmp_path: Path, capsys, monkeypatch) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    bench = serving.Bench(args=bench_args(against="no-such-revision-xyz"), tmp=tmp_path)
    bench.revision()  # `git log` fails before anything starts
    (error,) = bench.lines
    assert error["measure"] == "revision_error" and error["against"] == "no-such-revision-xyz"
    assert error["error"].startswith("RuntimeError: git log")
    assert list(scratch.iterdir()) == []  # its temporary directory is gone
    (s,) = serving.revision_summary(bench.lines)
    assert s["rev"] == "no-such-revision-xyz" and s["pairs"] == 0 and s["p50_ratio"] is None
    assert s["failed"] == [error["error"]] and s["meets_goal"] is False
    assert json.loads(capsys.readouterr().out.splitlines()[0])["measure"] == "revision_error"


def test_check_code_wants_the_trees_own_modules(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for f in ("bench/__init__.py", "bench/serving.py", "mms_core/__init__.py", "infra/__init__.py"):
        (tree / f).parent.mkdir(parents=True, exist_ok=True)
        (tree / f).write_text("")
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(tree)}
    serving._check_code(tree, env)
    (tree / "infra/__init__.py").unlink()  # found in this tree's editable install instead
    with pytest.raises(RuntimeError, match="would not run its own code"):
        serving._check_code(tree, env)


# ---- the report --------------------------------------------------------------------------------
ROW = (
    f"| ours (abc1234 + working tree) vs `dc58bb3`: {SUBJECT} | 4 x 1.0 s | 2.05 / 4.10 / 1,950 "
    "| 2.00 / 4.00 / 2,000 | **1.02x (0.90-1.10)** | 1.02x (0.90-1.10) | **0.97x (0.85-1.05)** | **met** |"
)


def test_report_renders_the_revision_table(serving_lines, render_serving) -> None:
    before = render_serving(serving_lines)
    assert "| **25.0x** |" in before
    assert "Against an earlier revision: not measured in this run (its data predates it)." in before

    lines = serving_lines + revision_lines()
    text = render_serving(lines + serving.revision_summary(lines))
    assert "**Could not tabulate**" not in text and "| **25.0x** |" in text
    assert ROW in text
    assert text.index("Mixed traffic (5% malformed") < text.index(ROW)  # after the existing tables
    assert "`python -m bench.serving --quick`, x86_64 2 cpu, 2026-12-03: both servers" in text
    assert "What failed" not in text

    only = [STAMP | {"measure": "env", "command": "python -m bench.serving --quick --revision-only"}]
    only += revision_lines()
    only[2]["ours"] = {"error": "TimeoutExpired: boom"}
    text = render_serving(only + serving.revision_summary(only))
    assert "Only the revision A/B is in this data (`--revision-only`)." in text
    assert "Mixed traffic" not in text
    assert "| **1.05x (0.90-1.10), 3 of 4 pairs** |" in text and "| **not met** |" in text
    assert "What failed: pair 0 ours: TimeoutExpired: boom." in text

    broken = [STAMP | {"measure": "revision_error", "against": "dc58bb3", "error": "RuntimeError: no"}]
    text = render_serving(serving_lines + broken + serving.revision_summary(broken))
    assert "| ours (working tree) vs `dc58bb3` | 0 x - s | - / - / - | - / - / - | **-** |" in text
    assert "What failed: RuntimeError: no." in text
