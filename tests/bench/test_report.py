"""bench.report on small fixture data (never the real bench/data): tables and ratios, 'not
measured' for benchmarks without data, GPU rows, idempotence and the atomic write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import report

MACHINE = "Linux-test-x86_64 nproc=2"
DATE = "2026-11-30T10:00:00+00:00"


def write(path: Path, lines: list[dict]) -> None:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def ddp_lines() -> list[dict]:
    stamp = {"bench": "ddp_overhead", "machine": MACHINE, "date": DATE}
    reps = [
        stamp | {"path": p, "rep": r, "samples_per_s": s, "epochs": 4}
        for r in (1, 2, 3)
        for p, s in (("dask", 9_500.0), ("torchrun", 10_000.0))
    ]
    final = stamp | {
        "path": "dask/torchrun",
        "ratio": 0.96,  # median of the per-rep ratios, the headline; not 9,500 / 10,000
        "rep_ratios": [0.9, 0.96, 0.97],
        "ratio_of_medians": 0.95,
        "goal": 0.95,
        "meets_goal": True,
        "samples_per_s": {"dask": 9_500.0, "torchrun": 10_000.0},
        "wall_s": {"dask": 10.0, "torchrun": 11.0},
        "same_params": True,
    }
    return [*reps, final]


def strategies_lines() -> list[dict]:
    stamp = {"bench": "strategies", "machine": MACHINE, "date": DATE}
    med = [
        ("ddp", 1, 20_000.0, 1.0, None, True),
        ("ddp", 2, 10_000.0, 1.0, 0.5, True),
        ("fsdp", 1, 20_000.0, 1.0, None, True),
        ("fsdp", 2, 2_500.0, 0.25, 0.125, True),
    ]
    return [
        stamp | {"stat": "start", "load_avg": "0.10 0.20 0.30", "epochs": 4, "batch_size": 64},
        *(
            stamp
            | {"stat": "median", "strategy": s, "world_size": ws, "samples_per_s": sps, "n": 1}
            | {"vs_ddp": vs, "scaling": sc, "same_params_as_ddp": same}
            for s, ws, sps, vs, sc, same in med
        ),
        stamp | {"stat": "end", "load_avg": "0.40 0.50 0.60", "elapsed_s": 12.5},
    ]


def pipeline_lines() -> list[dict]:
    values = {
        "cli_ours_fresh_s": 31.0,
        "cli_baseline_fresh_s": 45.0,
        "cli_ours_reused_s": 16.0,
        "cli_baseline_reused_s": 28.0,
        "embedded_server_new_home_s": 10.0,
        "flow_wall_warm_process_s": 10.0,
        "task_train_s": 6.0,
        "task_evaluate_s": 1.0,
        "task_train_loop_only_s": 2.0,
    }
    stamp = {"bench": "pipeline_walltime", "machine": "x86_64 2 cpu", "date": "2026-11-30"}
    ratios = [
        stamp | {"measure": "cli_fresh_ours_over_baseline", "value": 0.69, "min": 0.6, "max": 0.8,
                 "baseline_rev": "abc1234"},
        stamp | {"measure": "cli_reused_ours_over_baseline", "value": 0.57, "min": 0.5, "max": 0.6,
                 "baseline_rev": "abc1234"},
    ]  # fmt: skip
    return [stamp | {"measure": k, "value": v} for k, v in values.items()] + ratios


def compress_lines() -> list[dict]:
    stamp = {"bench": "compress", "machine": MACHINE, "date": DATE, "torch_threads": 1, "epochs": 30}
    variant = stamp | {
        "kind": "variant",
        "variant": "int8 + prune 30%",
        "model": {"name": "mlp", "kwargs": {"hidden": [8]}},
        "full_bytes": 4000,
        "compressed_bytes": 1000,
        "size_ratio": 4.0,
        "full_accuracy": 0.98,
        "compressed_accuracy": 0.97,
        "accuracy_drop": 0.01,
        "latency_ms_256": {"full": 0.5, "compressed": 0.25},
        "latency_ms_1": {"full": 0.05, "compressed": 0.1},
    }
    summary = stamp | {
        "kind": "summary",
        "variant": "int8 + prune 30%",
        "size_ratio": 4.0,
        "accuracy_drop": 0.01,
        "size_goal": 3.0,
        "accuracy_budget": 0.01,
        "meets_goal": True,
    }
    return [variant, summary]


def comm_bytes_run(date: str, inter_hier: int) -> list[dict]:
    stamp = {"bench": "comm_bytes", "machine": MACHINE, "date": date}
    measured = {"intra_recv": 100, "inter_recv": 100}
    acc = {"flat_inter_recv_bytes": 90, "inter_recv_bytes": 60}
    groups = {"groups": [[0, 1], [2, 3]], "steps": 5}
    hier = {"intra_recv": 200, "inter_recv": inter_hier}
    return [
        stamp | {"kind": "run", "strategy": "ddp", "measured": measured} | groups,
        stamp | {"kind": "run", "strategy": "hierarchical", "measured": hier} | groups,
        stamp
        | {"kind": "summary", "accounted": acc, "accounted_inter_ratio": 0.667, "params_max_abs_diff": 0},
    ]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Some benchmarks' data and a run record; serving, fedavg, batch_predict and GPU left out."""
    d = tmp_path / "data"
    d.mkdir()
    write(d / "ddp_overhead_mms.jsonl", ddp_lines())
    write(d / "strategies.jsonl", strategies_lines())
    write(d / "pipeline_walltime.jsonl", pipeline_lines())
    write(d / "compress.jsonl", compress_lines())
    # an appending benchmark: two runs, the newer one counts
    write(d / "comm_bytes.jsonl", comm_bytes_run(DATE, 80) + comm_bytes_run("2026-11-30T11:00:00+00:00", 50))
    run = {"kind": "run", "date": DATE, "size": "quick", "command": "make bench", "platform": "Linux-test"}
    run |= {"cores": 2, "memory_gib": 8.0, "python": "3.11.7", "versions": {"torch": "2.13.0+cpu"}}
    benches = [
        {"kind": "bench", "name": "compress", "command": "python -m bench.compress", "rc": 0, "wall_s": 12.0},
        {"kind": "bench", "name": "strategies", "command": "python -m bench.strategies --reps 1", "rc": 0}
        | {"wall_s": 90.0, "size": "quick"},
        {"kind": "bench", "name": "batch_predict", "command": "python -m bench.batch_predict", "rc": 1}
        | {"wall_s": 3.0},
    ]
    write(d / "make_bench.jsonl", [run, *benches, {"kind": "end", "benchmarks_s": 105.0}])
    return d


def build(data_dir: Path, tmp_path: Path, notes: str = "## compress\n\nNotes on compression.\n") -> str:
    (tmp_path / "NOTES.md").write_text("Preamble, not copied.\n\n" + notes)
    out = tmp_path / "out" / "RESULTS.md"
    report.main(["--data-dir", str(data_dir), "--out", str(out), "--notes", str(tmp_path / "NOTES.md")])
    return out.read_text()


def section(text: str, title_start: str) -> str:
    """The markdown of the section whose heading starts with ``title_start``."""
    start = text.index(f"## {title_start}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_tables_and_ratios(data_dir: Path, tmp_path: Path) -> None:
    text = build(data_dir, tmp_path)
    assert text.startswith("# Benchmark results")
    assert "Command: `make bench`" in text and "Linux-test, 2 cores, 8.0 GiB" in text

    ddp = section(text, "Training overhead")
    assert (
        "| MMS cluster config (as deployed) | 2026-11-30T10:00 | 4 ep, 3 reps | 9,500 | 10,000 "
        "| **0.96** (0.90-0.97) |" in ddp
    )
    assert "Dask's default MALLOC_TRIM_THRESHOLD_ (diagnostic) | not measured" in ddp
    assert "**met**, 0.96" in ddp
    assert f"{MACHINE}, {DATE}" in ddp  # where and when its rows were measured

    strategies = section(text, "Training strategies")
    assert "| fsdp | 20,000 | 2,500 | 0.25 | 0.12 | yes |" in strategies
    assert "| ddp | 20,000 | 10,000 | baseline | 0.50 | - |" in strategies
    assert "(quick size, 90 s)" in strategies  # from the run record

    pipeline = section(text, "Wall time")
    assert "| fresh process, new MMS_HOME | 31.0 | 45.0 | **0.69** (0.60-0.80) |" in pipeline
    assert "| fresh process, same MMS_HOME | 16.0 | 28.0 | **0.57** (0.50-0.60) |" in pipeline
    assert "before (abc1234) s" in pipeline
    assert "Goal <= 30 s on 2 cores, new MMS_HOME: **not met**, 31.0 s." in pipeline
    assert "| embedded Prefect server, new home (spawn to ready) | 10.00 |" in pipeline
    # flow 10 s minus tasks (6 + 1 s; the loop-only figure is not a task) over 2 tasks
    assert "| 1,500 ms | Prefect ~10-100 ms per task run | 15.0x the top of the range |" in pipeline
    assert "Goal <= 150 ms per task: **not met**." in pipeline

    comp = section(text, "Compression")
    assert "| int8 + prune 30% | 4,000 / 1,000 | **4.00x** | 0.9800 / 0.9700 | +1.00 |" in comp
    assert "0.500 / 0.250 (2.00x)" in comp and "0.050 / 0.100 (0.50x)" in comp
    assert "Notes on compression." in comp and "Preamble" not in text

    comm = section(text, "Hierarchical")
    assert "**0.500**" in comm  # the newer run (50 / 100), not the older (80 / 100)


def test_missing_benchmarks_say_not_measured(data_dir: Path, tmp_path: Path) -> None:
    text = build(data_dir, tmp_path)
    assert "**Not measured**: no data in `bench/data/serving.jsonl`" in section(text, "Online serving")
    assert "**Not measured**: no data in `bench/data/fedavg_table.jsonl`" in section(text, "Federated")
    batch = section(text, "Batch prediction")
    assert "**Not measured**" in batch and "`python -m bench.batch_predict`" in batch
    assert "**failed (1)**" in text  # the run record's status
    gpu = section(text, "GPT training throughput")
    assert "not measured: no GPU machine lent" in gpu and "--device cuda" in gpu

    (data_dir / "make_bench.jsonl").unlink()
    text = build(data_dir, tmp_path)
    assert "No `make bench` run record" in text


def test_gpu_rows_are_labelled(data_dir: Path, tmp_path: Path) -> None:
    stamp = {"bench": "gpt_throughput", "date": DATE, "device": "NVIDIA H100 80GB HBM3"}
    stamp |= {"config": {"size": "gpt2", "seq": 1024, "batch": 16}, "machine": MACHINE}
    write(
        data_dir / "gpt_throughput.jsonl",
        [
            stamp | {"path": "plain", "tokens_per_s": 400_000.0, "mfu": 0.35},
            stamp | {"path": "mms", "via": "ddp", "tokens_per_s": 420_000.0, "mfu": 0.37},
        ],
    )
    gpu = section(build(data_dir, tmp_path), "GPT training throughput")
    assert "GPU rows: measured on a lent GPU machine" in gpu
    assert "not measured" not in gpu
    assert "| NVIDIA H100 80GB HBM3 |" in gpu and "420,000 via ddp (37.0% MFU)" in gpu
    assert "| 1.050 | 1.08 / 1.00 / 0.91 | yes |" in gpu


def test_cpu_smoke_rows_have_no_gpu_anchors(data_dir: Path, tmp_path: Path) -> None:
    stamp = {"bench": "gpt_throughput", "date": DATE, "device": "cpu", "machine": MACHINE}
    stamp |= {"config": {"size": "tiny", "seq": 64, "batch": 8}}
    write(
        data_dir / "gpt_throughput_cpu.jsonl",  # what make bench writes
        [
            stamp | {"path": "plain", "tokens_per_s": 40_000.0, "mfu": None},
            stamp | {"path": "mms", "via": "cli", "tokens_per_s": 38_000.0, "mfu": None},
        ],
    )
    gpu = section(build(data_dir, tmp_path), "GPT training throughput")
    assert "not measured: no GPU machine lent" in gpu  # CPU rows are not GPU rows
    assert (
        "| cpu | 2026-11-30T10:00 | tiny, seq 64 x batch 8 | 40,000 | 38,000 via cli | 0.950 | - | - |" in gpu
    )


def test_idempotent_and_atomic(data_dir: Path, tmp_path: Path) -> None:
    first = build(data_dir, tmp_path)
    second = build(data_dir, tmp_path)
    assert first == second
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["RESULTS.md"]  # no temp file left


def startup_lines(*, n: int, failures: int = 0, hog: int = 2) -> list[dict]:
    """bench.orchestration_startup's summary lines: our 3 modes with ``n`` starts each, 2 baselines."""
    stamp = {"bench": "orchestration_startup", "machine": MACHINE, "date": DATE, "hog_processes": hog}
    stamp |= {"elapsed_s": 900.0, "hog_cores": 1.1, "nice": 0}

    def mode(name: str, *, ours: bool, ready: float, done: float, fails: int = 0, vs: str = "") -> dict:
        line = stamp | {"summary": True, "mode": name, "ours": ours, "fresh_home": "fresh" in name, "n": n}
        line |= {"failures": fails, "first_error": "EmbeddedServerError: not ready" if fails else None}
        line |= {"ready": {"p50": ready, "max": ready + 2}, "flow_done": {"p50": done, "max": done + 2}}
        line |= {"wall": {"p50": done + 1, "max": done + 3}}
        if vs:
            pair = {"median": 0.5, "min": 0.4, "max": 0.75, "pairs": n}
            line |= {"vs": vs, "ratio_ready": pair, "ratio_flow_done": pair | {"median": 0.6}}
        return line

    return [
        stamp | {"mode": "ours_fresh", "round": 1, "seconds": {"ready": 9.0}, "ok": True, "error": None},
        mode("ours_fresh", ours=True, ready=12.0, done=13.5, vs="baseline_fresh"),
        mode("ours_reused_stopped", ours=True, ready=6.0, done=7.0, fails=failures, vs="baseline_reused"),
        mode("ours_reused_running", ours=True, ready=2.0, done=3.0, vs="baseline_reused"),
        mode("baseline_fresh", ours=False, ready=20.0, done=21.5, fails=3),
        mode("baseline_reused", ours=False, ready=11.0, done=12.5),
    ]


def test_orchestration_startup_table_and_goal(data_dir: Path, tmp_path: Path) -> None:
    text = build(data_dir, tmp_path)
    startup = section(text, "Orchestration start-up")
    assert "**Not measured**: no data in `bench/data/orchestration_startup.jsonl`" in startup
    keys = [s.key for s in report.SECTIONS]
    assert keys.index("orchestration_startup") == keys.index("pipeline") + 1

    write(data_dir / "orchestration_startup.jsonl", startup_lines(n=20))
    startup = section(build(data_dir, tmp_path), "Orchestration start-up")
    fresh = "| ours, new home (server spawned, database migrated) | 20 | 0 | 12.0 / 14.0 | 13.5 / 15.5 |"
    assert fresh in startup
    assert "| 20 | **3** (EmbeddedServerError: not ready) | 20.0 / 22.0 |" in startup  # a baseline row
    assert "| 0.50x (0.40-0.75), 20 rounds | **0.60x (0.40-0.75), 20 rounds** |" in startup
    assert "hog of 2 spinning processes (nice 0; they got 1.10 cores on average)" in startup
    # the baseline's failures do not count against ours
    assert "Goal: 0 failures in 20 starts under load (ours): **met**" in startup

    write(data_dir / "orchestration_startup.jsonl", startup_lines(n=20, failures=1))
    startup = section(build(data_dir, tmp_path), "Orchestration start-up")
    assert "**not met** (1 failure in 60 starts)" in startup
    assert "| 20 | **1** (EmbeddedServerError: not ready) | 6.0 / 8.0 |" in startup

    write(data_dir / "orchestration_startup.jsonl", startup_lines(n=4))  # the quick size
    assert "**not met** (0 failures, but only 4 starts in a mode (20 needed))" in build(data_dir, tmp_path)
    write(data_dir / "orchestration_startup.jsonl", startup_lines(n=20, hog=0))  # --no-hog
    assert "**not met** (measured without the CPU hog" in build(data_dir, tmp_path)
