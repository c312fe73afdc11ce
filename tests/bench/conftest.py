"""Shared pieces of the bench report tests: a serving run's summaries and the rendered section."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from bench import report

STAMP = {"bench": "serving", "machine": "x86_64 2 cpu", "date": "2026-12-03"}


@pytest.fixture
def serving_lines() -> list[dict]:
    """A whole serving run's summaries, enough for the section's older tables (figures do not matter)."""
    level = {"concurrency": 16, "rps": 2000.0, "p50_ms": 6.0, "p99_ms": 12.0, "server_cores": 1.3}
    level |= {"server_main_cores": 0.9, "loadgen_cores": 0.1}
    return [
        STAMP | {"measure": "env", "command": "python -m bench.serving --quick", "versions": {"torch": "2"}},
        STAMP | {"measure": "direct", "model": "digits-classifier", "p50_ms": 0.03, "p99_ms": 0.06},
        STAMP | {"summary": "added_latency", "server": "mms", "p50_ms": 1.3, "p99_ms": 2.8}
        | {"added_p50_ms": 1.27, "added_p99_ms": 2.74},
        STAMP | {"summary": "throughput_per_core", **level}
        | {"rps_per_server_core": 1500, "rps_per_box_core": 1000},
        STAMP | {"summary": "batching_gain", "model": "digits-classifier"}
        | {"batched": level, "unbatched": level, "ratio": 3.5, "ratio_by_slo": {}, "ratio_at_peak": 3.5},
        STAMP | {"summary": "vs_mlflow", "mlflow": "mlflow-w1", "ours_at_slo": level, "mlflow_at_slo": level}
        | {"ratio_at_slo": 25.0, "ratio_peak_rps": 25.0, "ratio_by_concurrency": {"1": 7.8}, "goal": 3.0}
        | {"meets_goal": True},
    ]  # fmt: skip


@pytest.fixture
def render_serving(tmp_path: Path) -> Callable[[list[dict]], str]:
    """``render_serving(lines)``: bench.report's "Online serving" section for these data lines."""

    def render(lines: list[dict]) -> str:
        data = tmp_path / "data"
        data.mkdir(exist_ok=True)
        (data / "serving.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        out = tmp_path / "RESULTS.md"
        report.main(["--data-dir", str(data), "--out", str(out), "--notes", str(tmp_path / "none.md")])
        text = out.read_text()
        start = text.index("## Online serving")
        return text[start : text.index("\n## ", start + 1)]

    return render
