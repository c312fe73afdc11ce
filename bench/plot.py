"""Plots for bench/RESULTS.md from the JSON lines the benchmarks print.

python -m bench.plot   # reads bench/data/*.jsonl, writes bench/*.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent


def _lines(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / "data" / name).read_text().splitlines() if line.strip()]


def ddp_overhead_png() -> Path:
    """samples/s of torchrun vs our Dask path, with Dask's default malloc setting and with ours."""
    runs = {
        "mms": _lines("ddp_overhead_mms.jsonl"),
        "dask-default": _lines("ddp_overhead_dask_default.jsonl"),
    }
    medians = {
        k: {r["path"]: r["samples_per_s"] for r in v if r.get("stat") == "median"} for k, v in runs.items()
    }
    bars = {
        "torchrun": medians["mms"]["torchrun"],
        "Dask, MMS cluster config": medians["mms"]["dask"],
        "Dask, Dask's default\nMALLOC_TRIM_THRESHOLD_": medians["dask-default"]["dask"],
    }
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh(list(bars), list(bars.values()), color=["#888", "#2a7", "#c55"])
    for i, value in enumerate(bars.values()):
        ax.text(value, i, f" {value:,.0f} ({value / bars['torchrun']:.2f}x)", va="center")
    ax.set(
        xlabel="samples/s (median of 3, 2 ranks, gloo, 2 cores)",
        xlim=(0, max(bars.values()) * 1.3),
        title="DDP: same loop, same shards",
    )
    fig.tight_layout()
    out = HERE / "ddp_overhead.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(ddp_overhead_png())
