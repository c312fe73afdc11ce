"""The tables of bench/RESULTS.md, one function per area. Each takes the report Context and
returns markdown lines; ``ctx.lines(name)`` raises Missing when a benchmark has no data, and the
report then says 'not measured'. Anchors are the design brief's section 4; every "baseline"
column is measured in the same run as "ours"."""

from __future__ import annotations

from bench.report_data import Context, Missing, num, ratio, table, verdict


def ddp_overhead(ctx: Context) -> list[str]:
    """Our run_ddp on the flow's cluster vs torchrun, same loop and shards; two cluster configs."""
    rows, goal = [], None
    configs = (
        ("ddp_overhead_mms", "MMS cluster config (as deployed)"),
        ("ddp_overhead_dask_default", "Dask's default MALLOC_TRIM_THRESHOLD_ (diagnostic)"),
    )
    for name, label in configs:
        try:
            lines = ctx.lines(name)
        except Missing:  # the other configuration's row still stands
            rows.append((label, "not measured", "-", "-", "-", "-", "-", "-"))
            continue
        final = next(x for x in lines if x.get("path") == "dask/torchrun")
        reps = [x for x in lines if "rep" in x]
        epochs = reps[0]["epochs"] if reps else "?"
        per_rep = final.get("rep_ratios")  # older data: only the ratio of the two medians
        headline = (
            final["ratio"] if per_rep else final["samples_per_s"]["dask"] / final["samples_per_s"]["torchrun"]
        )
        spread = f" ({min(per_rep):.2f}-{max(per_rep):.2f})" if per_rep and len(per_rep) > 1 else ""
        rows.append(
            (
                label,
                str(final.get("date", "?"))[:16],
                f"{epochs} ep, {len(reps) // 2} reps",
                num(final["samples_per_s"]["dask"]),
                num(final["samples_per_s"]["torchrun"]),
                f"**{headline:.2f}**{spread}",
                f"{final['wall_s']['dask']:.1f} / {final['wall_s']['torchrun']:.1f}",
                "yes" if final.get("same_params") else "no",
            )
        )
        if name == "ddp_overhead_mms":
            goal = final
    if all(r[1] == "not measured" for r in rows):
        raise Missing(configs[0][0])
    head = [
        "Dask workers",
        "run (UTC)",
        "size",
        "ours samples/s",
        "torchrun samples/s (same run)",
        "ours / torchrun (median of reps, range)",
        "wall s ours / torchrun",
        "same final weights",
    ]
    out = table(head, rows)
    if goal:
        ours = (
            goal["ratio"]
            if goal.get("rep_ratios")
            else goal["samples_per_s"]["dask"] / goal["samples_per_s"]["torchrun"]
        )
        out += [
            "",
            f"Goal ours/torchrun >= {goal['goal']} (anchor: Ray Train stays within 2.5% of plain DDP): "
            f"{verdict(goal['meets_goal'])}, {ours:.2f}.",
        ]
    return out


STRATEGY_LABELS = {
    "hierarchical": "hierarchical (`group_size: 1`)",
    "param_server": "param_server, async",
    "param_server_s0": "param_server, `staleness_bound: 0`",
}


def strategies(ctx: Context) -> list[str]:
    """Median samples/s per strategy at 1 and 2 workers; ddp (same run) is the baseline."""
    lines = ctx.lines("strategies")
    med = {(x["strategy"], x["world_size"]): x for x in lines if x.get("stat") == "median"}
    order = list(dict.fromkeys(s for s, _ in med))
    rows = []
    for s in order:
        one, two = med.get((s, 1)), med.get((s, 2))
        same = two.get("same_params_as_ddp") if two else None
        rows.append(
            (
                STRATEGY_LABELS.get(s, s),
                num(one and one["samples_per_s"]),
                num(two and two["samples_per_s"]),
                "baseline" if s == "ddp" else num(two and two.get("vs_ddp"), 2),
                num(two and two.get("scaling"), 2),
                "-"
                if s == "ddp"
                else ("yes" if same else "no" + (" (async)" if s == "param_server" else "")),
            )
        )
    errors = [x for x in lines if "error" in x]
    start = next((x for x in lines if x.get("stat") == "start"), {})
    end = next((x for x in lines if x.get("stat") == "end"), {})
    n = next(iter(med.values()), {}).get("n", "?")
    out = [
        f"MLP 256x256, batch {start.get('batch_size', '?')} per worker, {start.get('epochs', '?')} epochs, "
        f"median of {n}; load average {start.get('load_avg', '?')} at the start, {end.get('load_avg', '?')} "
        f"at the end ({end.get('elapsed_s', '?')} s).",
        "",
    ]
    out += table(
        ["strategy", "1 worker", "2 workers", "vs ddp at 2", "scaling 1 -> 2", "same weights as ddp"], rows
    )
    if errors:
        out += [
            "",
            f"{len(errors)} run(s) failed: "
            + "; ".join(f"{e['strategy']}@{e['world_size']}: {e['error'][:120]}" for e in errors),
        ]
    return out


def comm_bytes(ctx: Context) -> list[str]:
    """Bytes between would-be hosts: hierarchical vs flat DDP, measured and accounted."""
    lines = ctx.lines("comm_bytes")
    runs = {x["strategy"]: x for x in lines if x.get("kind") == "run"}
    s = next(x for x in lines if x.get("kind") == "summary")
    flat, hier, acc = runs["ddp"]["measured"], runs["hierarchical"]["measured"], s["accounted"]

    def mb(b: float) -> str:
        return f"{b / 1e6:,.2f} MB"

    ft, ht = flat["intra_recv"] + flat["inter_recv"], hier["intra_recv"] + hier["inter_recv"]
    out = [f"4 workers in groups {runs['hierarchical']['groups']}, {runs['ddp']['steps']} steps.", ""]
    out += table(
        ["", "flat DDP (baseline)", "hierarchical", "hierarchical / flat"],
        [
            (
                "inter-group bytes, measured",
                mb(flat["inter_recv"]),
                mb(hier["inter_recv"]),
                f"**{hier['inter_recv'] / flat['inter_recv']:.3f}**",
            ),
            (
                "inter-group bytes, accounted",
                mb(acc["flat_inter_recv_bytes"]),
                mb(acc["inter_recv_bytes"]),
                f"{s['accounted_inter_ratio']:.3f}",
            ),
            (
                "intra-group bytes, measured",
                mb(flat["intra_recv"]),
                mb(hier["intra_recv"]),
                f"{hier['intra_recv'] / flat['intra_recv']:.2f}",
            ),
            ("total, measured", mb(ft), mb(ht), f"{ht / ft:.2f}"),
        ],
    )
    topo = [x for x in lines if x.get("kind") == "topology"]
    if topo:
        out += ["", "The same accounting for larger clusters (per byte of gradient, summed over ranks):", ""]
        out += topology_table(topo)
    acc = s.get("val_accuracy", {})
    out += [
        "",
        f"Final weights, hierarchical vs flat: max abs difference {s['params_max_abs_diff']:.1e}; validation "
        f"accuracy {num(acc.get('hierarchical'), 4)} vs {num(acc.get('flat'), 4)}.",
    ]
    return out


def topology_table(topo: list[dict]) -> list[str]:
    """comm_bytes' accounting for larger clusters: inter-host bytes and sequential steps."""
    return table(
        [
            "hosts x ranks",
            "flat: inter-host bytes",
            "hierarchical",
            "hier / flat",
            "sequential inter-host steps, flat / hier",
        ],
        [
            (
                f"{t['hosts']} x {t['ranks_per_host']}",
                num(t["flat_inter_host_sent_per_byte"], 2),
                num(t["hier_inter_host_sent_per_byte"], 2),
                ratio(t["hier_inter_host_sent_per_byte"], t["flat_inter_host_sent_per_byte"], 3),
                f"{t['flat_steps_on_inter_host_links']} / {t['hier_steps_on_inter_host_links']}",
            )
            for t in topo
        ],
    )


def batch_predict(ctx: Context) -> list[str]:
    """Dask batch predictor vs a plain single-process loop, per model."""
    lines = ctx.lines("batch_predict")
    finals = [x for x in lines if x.get("path") == "dask/plain"]
    start = next((x["value"] for x in lines if x.get("measure") == "dask_cluster_start_s"), None)
    rows = [
        (
            x.get("model", "mlp-1024x1024"),
            num(x["rows"]),
            num(x["rows_per_s"]["plain"]),
            num(x["rows_per_s"]["dask"]),
            f"**{x['ratio']:.2f}**",
            f">= {x['goal']}",
            verdict(x["meets_goal"]),
        )
        for x in finals
    ]
    head = [
        "model",
        "rows",
        "plain loop rows/s (baseline, torch threads: "
        f"{finals[0].get('torch_threads_plain', '?') if finals else '?'})",
        "Dask rows/s (2 workers x 1 thread)",
        "Dask / plain",
        "goal",
        "",
    ]
    out = table(head, rows)
    out += [
        "",
        f"Median of {sum(1 for x in lines if x.get('path') == 'plain') // max(1, len(finals))} "
        f"alternating runs; Dask cluster start ({num(start, 2)} s) not included.",
    ]
    return out


def compress(ctx: Context) -> list[str]:
    """Each compression variant against the full model it came from."""
    lines = ctx.lines("compress")
    variants = [x for x in lines if x.get("kind") == "variant"]
    rows = []
    for x in variants:
        l256, l1 = x["latency_ms_256"], x["latency_ms_1"]
        rows.append(
            (
                x["variant"],
                f"{num(x['full_bytes'])} / {num(x['compressed_bytes'])}",
                f"**{x['size_ratio']:.2f}x**",
                f"{x['full_accuracy']:.4f} / {x['compressed_accuracy']:.4f}",
                f"{100 * x['accuracy_drop']:+.2f}",
                f"{l256['full']:.3f} / {l256['compressed']:.3f} ({ratio(l256['full'], l256['compressed'])})",
                f"{l1['full']:.3f} / {l1['compressed']:.3f} ({ratio(l1['full'], l1['compressed'])})",
            )
        )
    first = variants[0] if variants else {}
    out = [
        f"Model {first.get('model', {}).get('kwargs', '?')}, {first.get('epochs', '?')} epochs, one rank; "
        f"latencies on {first.get('torch_threads', '?')} torch thread(s).",
        "",
    ]
    out += table(
        [
            "variant",
            "bytes full / compressed",
            "smaller by",
            "test accuracy full / compressed",
            "drop, points",
            "ms per 256 rows full / compressed (speed-up)",
            "ms per row full / compressed (speed-up)",
        ],
        rows,
    )
    s = next((x for x in lines if x.get("kind") == "summary"), None)
    if s:
        out += [
            "",
            f"Goal for the spec's variant ({s['variant']}): >= {s['size_goal']:g}x smaller and within "
            f"{100 * s['accuracy_budget']:g} point of the full model's accuracy: {verdict(s['meets_goal'])} "
            f"({s['size_ratio']:.2f}x, {100 * s['accuracy_drop']:+.2f} points).",
        ]
    return out


def _local_steps(best: dict, rows_per_client: float, paper_rows: int = 600) -> str:
    if best["B"] == "inf":
        return "1 (1)"
    per_round = -(-rows_per_client // best["B"]) * best["E"]
    return f"{per_round:.0f} ({paper_rows // best['B'] * best['E']})"


def fedavg(ctx: Context) -> list[str]:
    """Rounds to the target accuracy per setting; FedSGD (same run) is the baseline; the paper's table."""
    lines = ctx.lines("fedavg_table")
    cfg = next((x for x in lines if x.get("kind") == "config"), {})
    best = [x for x in lines if x.get("kind") == "best"]
    per_client = cfg.get("train_rows", 0) / cfg.get("clients", 100)
    rows = [
        (
            x["partition"],
            x["setting"],
            _local_steps(x, per_client),
            f"{x['lr']:g}" + ("*" if x.get("lr_at_grid_edge") else ""),
            f"{num(x['rounds'])} ({', '.join(num(r) for r in x['rounds_per_seed'])})",
            "baseline"
            if x["setting"] == "FedSGD"
            else ("**" + ratio(x.get("speedup_vs_fedsgd"), 1, 1) + "**"),
            num(x.get("paper_rounds")),
            ratio(x.get("paper_speedup"), 1, 1),
        )
        for x in best
    ]
    target = f"{100 * cfg['target']:g}%" if "target" in cfg else "the target"
    out = [
        f"K={cfg.get('clients', '?')} clients, C={cfg.get('fraction', '?')}, "
        f"{cfg.get('train_rows', '?')} training rows ({'augmented' if cfg.get('augmented') else 'plain'}), "
        f"{cfg.get('test_rows', '?')} test rows, "
        f"seeds {cfg.get('seeds', '?')}, learning-rate grids {cfg.get('lr_grid', '?')}"
        + (" (**quick**: 1 seed, 2 rates per setting)" if cfg.get("quick") else "")
        + ".",
        "",
    ]
    out += table(
        [
            "partition",
            "setting",
            "local steps a round per client (paper)",
            "best lr",
            f"rounds to {target}: median (per seed)",
            "speedup vs FedSGD",
            "paper: rounds to 99%, CNN",
            "paper speedup",
        ],
        rows,
    )
    out += [
        "",
        "\\* best rate at the edge of its grid"
        + (" (a quick run's grids have two rates)." if cfg.get("quick") else "."),
    ]
    d = next((x for x in lines if x.get("kind") == "dask_path"), None)
    return out + (["", dask_path_line(d)] if d else [])


def dask_path_line(d: dict) -> str:
    """fedavg_table's comparison of run_fedavg (a Dask task per client) with the in-process loop."""
    return (
        f"Through `run_fedavg` (a Dask task per client per round) vs in-process, {d['rounds']} rounds of "
        f"{d['setting']} {d['partition'].upper()}: {d['dask_ms_per_round']:g} ms vs "
        f"{d['inprocess_ms_per_round']:g} ms a round ({d['dask_over_inprocess']:.2f}x), same weights: "
        f"{'yes' if d['same_weights'] else 'no'}."
    )
