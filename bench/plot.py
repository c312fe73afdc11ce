"""Plots for bench/RESULTS.md from the JSON lines the benchmarks print.

python -m bench.plot   # reads bench/data/*.jsonl, writes bench/*.png

Draws every plot from the data files, so the PNGs always match the data bench.report tabulates
(the strategies, serving and fedavg benchmarks also draw their own at the end of a run). A plot
whose data file is missing is skipped with a note on stderr.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent


def _lines(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / "data" / name).read_text().splitlines() if line.strip()]


def ddp_overhead_png() -> Path:
    """samples/s of torchrun vs our Dask path, with our cluster config and with Dask's default malloc
    setting; each Dask bar's ratio is to the torchrun median of its own run."""
    runs = {
        "mms": _lines("ddp_overhead_mms.jsonl"),
        "dask-default": _lines("ddp_overhead_dask_default.jsonl"),
    }
    med = {k: {r["path"]: r for r in v if r.get("stat") == "median"} for k, v in runs.items()}
    bars = [  # (label, samples/s, ratio to the same run's torchrun, runs in the median)
        ("torchrun", med["mms"]["torchrun"], med["mms"]["torchrun"]),
        ("Dask, MMS cluster config", med["mms"]["dask"], med["mms"]["torchrun"]),
        (
            "Dask, Dask's default\nMALLOC_TRIM_THRESHOLD_",
            med["dask-default"]["dask"],
            med["dask-default"]["torchrun"],
        ),
    ]
    values = [b[1]["samples_per_s"] for b in bars]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh([b[0] for b in bars], values, color=["#888", "#2a7", "#c55"])
    for i, (_, row, ref) in enumerate(bars):
        ratio = row["samples_per_s"] / ref["samples_per_s"]
        ax.text(
            row["samples_per_s"], i, f" {row['samples_per_s']:,.0f} ({ratio:.2f}x, n={row['n']})", va="center"
        )
    ax.set(
        xlabel="samples/s (median; ratio to its own run's torchrun; 2 ranks, gloo)",
        xlim=(0, max(values) * 1.5),
        title=f"DDP: same loop, same shards ({str(bars[1][1].get('date', ''))[:10]})",
    )
    fig.tight_layout()
    out = HERE / "ddp_overhead.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def strategies_png() -> Path:
    from bench import strategies

    summary = [x for x in _lines("strategies.jsonl") if x.get("stat") == "median"]
    return strategies.plot(summary, title=strategies.plot_title(summary[0]), out=HERE / "strategies.png")


def serving_png() -> Path:
    from bench import serving

    return serving.plot(_lines("serving.jsonl"))


def fedavg_png() -> Path:
    from bench import fedavg_table

    return fedavg_table.plot(_lines("fedavg_table.jsonl"))


def data_scale_png() -> Path:
    from bench import data_scale

    return data_scale.plot(_lines("data_scale.jsonl"))


PLOTS: dict[str, Callable[[], Path]] = {
    "ddp_overhead": ddp_overhead_png,
    "strategies": strategies_png,
    "serving": serving_png,
    "fedavg": fedavg_png,
    "data_scale": data_scale_png,
}


def main() -> None:
    """Draw every plot whose data is there."""
    for name, draw in PLOTS.items():
        try:
            print(draw())
        except (FileNotFoundError, StopIteration, IndexError, KeyError) as exc:
            print(f"bench.plot: {name} skipped ({type(exc).__name__}: {exc})", file=sys.stderr)


if __name__ == "__main__":
    main()
