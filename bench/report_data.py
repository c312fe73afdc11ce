"""What bench.report reads and how it writes numbers: the data directory, the run record, and
markdown helpers. No benchmark imports here (the report must run without torch or dask)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Benchmark data files whose command is not `python -m bench.NAME`.
MODULES = {"ddp_overhead_mms": "ddp_overhead", "ddp_overhead_dask_default": "ddp_overhead"}
DEFAULT_ARGS = {"ddp_overhead_dask_default": " --dask-malloc-trim dask-default"}


class Missing(Exception):
    """A section's data file is absent or empty: the section says 'not measured'."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines file; lines that are not JSON objects are skipped."""
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def latest_run(lines: list[dict]) -> list[dict]:
    """The lines of the newest run in a file that accumulates runs (grouped by their 'date' stamp)."""
    dates = sorted({str(x.get("date", "")) for x in lines})
    return [x for x in lines if str(x.get("date", "")) == dates[-1]] if dates else lines


@dataclass
class Context:
    """The data directory as the report sees it: benchmark lines and the make-bench run record."""

    data_dir: Path
    _cache: dict[str, list[dict]] = field(default_factory=dict)

    def lines(self, name: str) -> list[dict]:
        """The newest run's lines of bench/data/NAME.jsonl; raises Missing if absent or empty."""
        if name not in self._cache:
            path = self.data_dir / f"{name}.jsonl"
            lines = read_jsonl(path) if path.exists() else []
            if not lines:
                raise Missing(name)
            self._cache[name] = latest_run(lines)
        return self._cache[name]

    def glob(self, pattern: str) -> list[dict]:
        """Every line of the files matching ``pattern`` (all runs, for files of several runs)."""
        return [x for p in sorted(self.data_dir.glob(pattern)) for x in read_jsonl(p)]

    @property
    def record(self) -> list[dict]:
        path = self.data_dir / "make_bench.jsonl"
        return read_jsonl(path) if path.exists() else []

    def run(self) -> dict | None:
        """The run record's first line (machine, date, size), if `make bench` wrote one."""
        return next((x for x in self.record if x.get("kind") == "run"), None)

    def bench_record(self, name: str) -> dict | None:
        return next((x for x in self.record if x.get("kind") == "bench" and x.get("name") == name), None)

    def command(self, name: str) -> str:
        """The command that produced NAME's data: the run record's, else the data's, else the default."""
        rec = self.bench_record(name)
        if rec:
            return rec["command"]
        try:
            cmd = next((x["command"] for x in self.lines(name) if x.get("command")), None)
        except Missing:
            cmd = None
        return cmd or f"python -m bench.{MODULES.get(name, name)}{DEFAULT_ARGS.get(name, '')}"

    def source(self, name: str) -> str:
        """'`bench/data/NAME.jsonl`: machine, date; `command` (size, seconds)' for a section's header."""
        lines = self.lines(name)
        machine = next((x["machine"] for x in lines if x.get("machine")), "machine not recorded")
        dates = sorted({str(x["date"]) for x in lines if x.get("date")})
        when = " to ".join(dict.fromkeys([dates[0], dates[-1]])) if dates else "date not recorded"
        text = f"`bench/data/{name}.jsonl`: {machine}, {when}; `{self.command(name)}`"
        rec = self.bench_record(name)
        if rec:
            text += f" ({rec.get('size', '?')} size, {rec['wall_s']:.0f} s)"
        return text

    def failed_note(self, name: str) -> str | None:
        """A warning when the last `make bench` run of NAME failed (its older data is shown)."""
        rec = self.bench_record(name)
        if rec and rec.get("rc") not in (0, None):
            return (
                f"**Warning: the last run of `{rec['command']}` ({rec.get('started', '?')}) failed "
                f"(exit status {rec['rc']}); the figures below are from the data file's previous run.**"
            )
        return None


# ---- formatting ----------------------------------------------------------------------------------
def num(x: Any, nd: int = 0) -> str:
    """A number with thousands separators and ``nd`` decimals; '-' for None."""
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:,.{nd}f}"


def ratio(a: float | None, b: float | None, nd: int = 2) -> str:
    """'a/b' as '1.23x'; '-' when either is missing or b is 0."""
    if a is None or not b:
        return "-"
    return f"{a / b:.{nd}f}x"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("**met**" if ok else "**not met**")


def table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table: first column left-aligned, the others right-aligned."""
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out
