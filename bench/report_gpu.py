"""The GPT throughput table of bench/RESULTS.md: GPU rows come from device-tool runs of
bench.gpt_throughput (appended to bench/data/gpt_throughput.jsonl by hand), never from `make
bench`, whose CPU smoke run goes to bench/data/gpt_throughput_cpu.jsonl."""

from __future__ import annotations

import ast
from pathlib import Path

from bench.report_data import Context, num, table

SCRIPT = Path(__file__).with_name("gpt_throughput.py")
ANCHORS = (("plain_pytorch_388k", 388e3), ("goal_420k", 420e3), ("llm_c_463k", 463e3))
FALLBACK = "python3 -m bench.gpt_throughput --device cuda --out $OUT/gpt_throughput.jsonl"


def docstring_command(marker: str, path: Path = SCRIPT) -> str:
    """The indented command block of bench/gpt_throughput.py's docstring that contains ``marker``,
    joined into one line (the GPU recipe is long; the device tool takes it as ONE line)."""
    try:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    except (OSError, SyntaxError):
        return FALLBACK
    blocks, block = [], []
    for line in [*doc.splitlines(), ""]:
        if line.startswith("    ") and line.strip():
            block.append(line.strip().rstrip("\\").strip())
        elif block:
            blocks.append(" ".join(block))
            block = []
    return next((b for b in blocks if marker in b), FALLBACK)


def _pct(x: float | None) -> str:
    return "" if x is None else f" ({100 * x:.1f}% MFU)"


def runs_table(lines: list[dict], *, anchors: bool = True) -> list[str]:
    """One row per (run, mms way): plain and mms tokens/s, ratio, and over the brief's H100
    anchors (``anchors=False``, for CPU runs: '-', a tiny model on 2 cores is no match for them)."""
    rows = []
    for date in sorted({x.get("date", "") for x in lines}):
        run = [x for x in lines if x.get("date", "") == date]
        plain = next((x for x in run if x.get("path") == "plain"), None)
        cfg = run[0].get("config", {})
        shape = f"{cfg.get('size', '?')}, seq {cfg.get('seq', '?')} x batch {cfg.get('batch', '?')}"
        for m in [x for x in run if x.get("path") == "mms"] or [None]:
            tps = m["tokens_per_s"] if m else None
            ref = plain["tokens_per_s"] if plain else None
            rows.append(
                (
                    run[0].get("device", "?"),
                    date[:16],
                    shape,
                    (num(ref) + _pct(plain.get("mfu"))) if plain else "-",
                    (f"{num(tps)} via {m.get('via', '?')}" + _pct(m.get("mfu"))) if m else "-",
                    f"{tps / ref:.3f}" if tps and ref else "-",
                    " / ".join(f"{tps / a:.2f}" for _, a in ANCHORS) if tps and anchors else "-",
                    ("yes" if tps >= 420e3 else "no") if tps and anchors else "-",
                )
            )
    return table(
        [
            "device",
            "run (UTC)",
            "model, shape",
            "plain PyTorch tokens/s (same run)",
            "ours tokens/s",
            "ours / plain",
            "ours / 388k plain H100 / 420k goal / 463k llm.c",
            ">= 420k",
        ],
        rows,
    )


def gpu(ctx: Context) -> list[str]:
    """GPU rows labelled as device-tool runs; without them, 'not measured' and the command."""
    lines = ctx.glob("gpt_throughput*.jsonl")
    on_gpu = [x for x in lines if x.get("device", "cpu") != "cpu"]
    on_cpu = [x for x in lines if x.get("device") == "cpu"]
    if on_gpu:
        out = [
            "GPU rows: measured on a lent GPU machine through the device tool (not by `make bench`), "
            "appended to bench/data/gpt_throughput*.jsonl; commands in each line's `command` field.",
            "",
        ]
        out += runs_table(on_gpu)
    else:
        out = [
            "**GPU: not measured: no GPU machine lent.** The commands, from bench/gpt_throughput.py's "
            "docstring: once, in the repo root, fetch the wheels the GPU image lacks; then, through the "
            "device tool (carry `.whl`, timeout 600 s), the benchmark as one line:",
            "",
            "```",
            docstring_command("gpu-wheels.sh"),
            docstring_command("--device cuda"),
            "```",
        ]
    if on_cpu:
        out += [
            "",
            "CPU smoke runs of the same benchmark (`make bench`; tiny model, 2 cores: checks that the "
            "paths agree, not a figure to compare):",
            "",
        ] + runs_table(on_cpu, anchors=False)
    else:
        out += ["", f"CPU smoke test (`make bench` runs it): `{docstring_command('--device cpu')}`."]
    return out
