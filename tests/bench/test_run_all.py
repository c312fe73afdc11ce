"""bench.run_all's bookkeeping with stand-in benchmarks (tiny modules in tmp_path, no real benchmark):
data files from stdout, the run record, and a failure keeping the previous data."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from bench import run_all

GOOD = 'import json\nprint(json.dumps({"bench": "good", "value": 1}))\nprint("not json")\n'
BAD = 'import json, sys\nprint(json.dumps({"bench": "bad", "value": 2}))\nsys.exit(3)\n'
SELF = (
    "import pathlib, sys\n"
    "p = pathlib.Path(sys.argv[1])\n"
    "p.write_text('{\"partial\": true}\\n')\n"  # truncates, as bench.strategies does, then fails
    "sys.exit(4)\n"
)


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    mods = tmp_path / "mods"
    mods.mkdir()
    for name, text in {"fake_good": GOOD, "fake_bad": BAD, "fake_self": SELF}.items():
        (mods / f"{name}.py").write_text(text)
    monkeypatch.setenv("PYTHONPATH", str(mods))
    (tmp_path / "scratch").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))  # failed runs' output goes here
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setattr(run_all, "DATA", data)
    monkeypatch.setattr(run_all, "RECORD", data / "make_bench.jsonl")
    benches = (
        run_all.Bench("good", "fake_good", quick=("--x",)),
        run_all.Bench("bad", "fake_bad"),
        run_all.Bench("self", "fake_self", quick=(str(data / "self.jsonl"),), captures_stdout=False),
    )
    monkeypatch.setattr(run_all, "BENCHES", benches)
    return data


def test_run_all_records_and_keeps_previous_data_on_failure(sandbox: Path) -> None:
    (sandbox / "bad.jsonl").write_text('{"old": 1}\n')
    (sandbox / "self.jsonl").write_text('{"old": 2}\n')
    with pytest.raises(SystemExit) as exit_info:
        run_all.main(["--no-report"])
    assert exit_info.value.code == 1  # some benchmark failed

    assert (sandbox / "good.jsonl").read_text() == '{"bench": "good", "value": 1}\n'  # JSON lines only
    assert (sandbox / "bad.jsonl").read_text() == '{"old": 1}\n'
    assert (sandbox / "self.jsonl").read_text() == '{"old": 2}\n'
    assert sorted(p.name for p in sandbox.iterdir()) == [
        "bad.jsonl",
        "good.jsonl",
        "make_bench.jsonl",
        "self.jsonl",
    ]

    record = [json.loads(x) for x in (sandbox / "make_bench.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in record] == ["run", "bench", "bench", "bench", "end"]
    assert record[0]["size"] == "quick" and record[0]["command"] == "make bench" and record[0]["cores"] >= 1
    by_name = {x["name"]: x for x in record if x["kind"] == "bench"}
    assert by_name["good"]["rc"] == 0 and by_name["good"]["command"] == "python -m fake_good --x"
    assert by_name["bad"]["rc"] == 3 and by_name["self"]["rc"] == 4
    partial = Path(by_name["bad"]["partial_output"]) / "bad.jsonl"
    assert partial.read_text() == '{"bench": "bad", "value": 2}\n'


def test_only_keeps_the_other_records(sandbox: Path) -> None:
    with pytest.raises(SystemExit):
        run_all.main(["--no-report"])
    run_all.main(["--no-report", "--only", "good"])  # exits normally: nothing failed
    record = [json.loads(x) for x in (sandbox / "make_bench.jsonl").read_text().splitlines()]
    assert record[0]["only"] == ["good"] and "--only good" in record[0]["command"]
    assert [x["name"] for x in record if x["kind"] == "bench"] == ["good", "bad", "self"]
