"""The bench/RESULTS.md section of bench.data_scale: `mms run`'s ingest + shard of a 1 GiB and a
4 GiB table against dask.dataframe and a pyarrow read + write, memory peaks, and the goals.

The data file keeps the newest run of each size (bench.data_scale replaces only its own size), so
the section shows every size side by side, each from its own run, and compares the worker peaks of
the quick (~1 GiB) and full (~4 GiB) runs when both are there."""

from __future__ import annotations

from bench._scale_runs import GOALS
from bench.data_scale import newest_by_size
from bench.report_data import Context, Missing, num, table, verdict

NAME = "data_scale"


def data_scale(ctx: Context) -> list[str]:
    """Figures per size (columns), the goals per size, then where each size's data comes from."""
    sizes = {
        size: (summary, table_line)
        for size, lines in newest_by_size(ctx.glob(f"{NAME}.jsonl")).items()
        if (summary := next((x for x in lines if x.get("kind") == "summary"), None))
        and (table_line := next((x for x in lines if x.get("kind") == "table"), None))
    }
    if not sizes:
        raise Missing(NAME)
    head = ["figure (medians over reps; peaks: highest of any rep)"]
    head += [f"{size}: {t['rows']:,} rows, {_gib(t):.3g} GiB" for size, (_, t) in sizes.items()]
    out = table(head, [(label, *(f(s) for s, _ in sizes.values())) for label, f in FIGURES])
    out += ["", *goals(sizes), ""]
    for size, (s, t) in sizes.items():
        out.append(
            f"- {size}: `{s['command']}`, {s['date'].replace('T', ' ').replace('+00:00', ' UTC')}, revision "
            f"{s['revision']}, {s['machine']}; {s['reps']} reps (order rotated each rep); table "
            f"{t['bytes_on_disk'] / 2**30:.2f} GiB of Parquet in {t.get('row_groups', '?')} row groups."
        )
        out += [f"  - **failed**: {e}" for e in s.get("errors", [])]
    return out


def _gib(table_line: dict) -> float:
    return table_line["bytes_in_memory"] / 2**30


def _ratio(r: dict) -> str:
    if r.get("median") is None:
        return "-"
    spread = f" ({r['min']:.2f}-{r['max']:.2f})" if r.get("n", 0) > 1 else ""
    return f"**{r['median']:.2f}x**{spread}"


def _s(key: str, nd: int = 1):
    return lambda s: num(s.get(key), nd)


FIGURES = (
    ("`mms run`: ingest + preprocess-and-shard s (Prefect task runs)", _s("mms_work_s")),
    ("- of which the ingest task s", _s("mms_ingest_s")),
    ("- of which the preprocess-and-shard task s", _s("mms_shard_s")),
    ("dask.dataframe, same work, 2 workers x 1 thread s (cluster start included)", _s("dask_work_s")),
    ("- of which the LocalCluster's start s", _s("dask_cluster_start_s")),
    ("pyarrow `read_table` + `write_table` s", _s("pyarrow_work_s")),
    ("ingest + shard / dask (median of per-rep ratios, range)", lambda s: _ratio(s["ratios"]["vs_dask"])),
    ("- / dask without its cluster's start", lambda s: _ratio(s["ratios"].get("vs_dask_compute", {}))),
    ("ingest + shard / pyarrow", lambda s: _ratio(s["ratios"]["vs_pyarrow"])),
    ("`mms run` whole command s (train 1 epoch, evaluate, compress, register)", _s("mms_wall_s")),
    ("flow process peak RSS MiB (whole run)", _s("flow_peak_mib", 0)),
    ("- during ingest + shard", _s("flow_peak_ingest_shard_mib", 0)),
    ("Dask worker peak RSS MiB, highest worker (whole run)", _s("worker_peak_mib", 0)),
    ("- during ingest + shard", _s("worker_peak_ingest_shard_mib", 0)),
    ("dask.dataframe baseline: process tree peak RSS MiB (cluster included)", _s("dask_tree_peak_mib", 0)),
    ("pyarrow: process peak RSS MiB", _s("pyarrow_peak_mib", 0)),
    ("test accuracy after 1 epoch", _s("accuracy", 3)),
    ("every `mms run` completed", lambda s: "yes" if s["completed"] else "**no**"),
)


def goals(sizes: dict[str, tuple[dict, dict]]) -> list[str]:
    """Each goal, its target and the verdict per size; worker growth compares the quick and full runs."""
    names = list(sizes)
    rows = [
        ("ingest + shard vs dask.dataframe", f"<= {GOALS['vs_dask']}x", "vs_dask"),
        ("ingest + shard vs pyarrow read + write", f"<= {GOALS['vs_pyarrow']}x", "vs_pyarrow"),
        ("flow process peak RSS", f"< {GOALS['flow_peak_mib'] / 1024:g} GiB", "flow_peak"),
        ("`mms run` completes", "every rep", "completed"),
    ]
    out = table(["goal", "target", *names], [(g, t, *(verdict(s["meets"][k]) for s, _ in sizes.values()))
                                             for g, t, k in rows])  # fmt: skip
    target = f"<= {GOALS['worker_growth']:.2f}x"
    if "quick" in sizes and "full" in sizes:
        quick, full = sizes["quick"][0].get("worker_peak_mib"), sizes["full"][0].get("worker_peak_mib")
        growth = full / quick if quick and full else None
        figure = f"{num(full)} / {num(quick)} MiB = {growth:.2f}x" if growth else "-"
        ok = verdict(None if growth is None else growth <= GOALS["worker_growth"])
        out += ["", f"Worker peak RSS, 4 GiB over 1 GiB table (full / quick), goal {target}: {ok}, {figure}."]
    else:
        out += ["", f"Worker peak RSS, 4 GiB over 1 GiB table (goal {target}): needs a quick and a full run."]
    return out
