"""The online-serving tables of bench/RESULTS.md (bench.serving's summary lines)."""

from __future__ import annotations

from bench.report_data import Context, num, table, verdict

SERVER_LABELS = {
    "mms": "ours, `POST /v1/models/digits-classifier/predict`",
    "mms serve (CLI)": "`mms serve` (the CLI process itself)",
    "inprocess": "reference: same uvicorn + FastAPI + parser, model on the loop, no Dask hop",
    "mlflow-w1": "`mlflow models serve` (`/invocations`, dataframe_split), baseline",
}
RAY_SERVE_MS, TORCHSERVE_MS = 2.0, 3.0  # added per request: Ray Serve 1-2 ms, TorchServe ~3 ms
RAY_SERVE_RPS_PER_CORE = 500  # 3-4k no-op QPS on 8 cores
TRITON_GAIN = 3.7


def _level(x: dict | None) -> str:
    return "-" if not x else f"{num(x['rps'])} ({x['concurrency']}, {x['p99_ms']:.1f} ms)"


def added_latency(lines: list[dict]) -> list[str]:
    direct = next(x for x in lines if x.get("measure") == "direct" and x["model"] == "digits-classifier")
    rows = [
        (
            "model alone: `Predictor.predict_array` in-process, 1 thread",
            f"{direct['p50_ms']:.3f}",
            f"{direct['p99_ms']:.3f}",
            "",
            "",
        )
    ]
    for s in (x for x in lines if x.get("summary") == "added_latency"):
        vs = ""
        if s["server"] == "mms":
            vs = (
                f"{s['added_p50_ms'] / RAY_SERVE_MS:.2f}x Ray Serve's 2 ms, "
                f"{s['added_p50_ms'] / TORCHSERVE_MS:.2f}x TorchServe's 3 ms"
            )
        added = f"+{s['added_p50_ms']:.2f} / +{s['added_p99_ms']:.2f}"
        rows.append(
            (
                SERVER_LABELS.get(s["server"], s["server"]),
                f"{s['p50_ms']:.2f}",
                f"{s['p99_ms']:.2f}",
                f"**{added}**" if s["server"] == "mms" else added,
                vs,
            )
        )
    return table(
        [
            "1 client, sequential, digits MLP, 1 row",
            "p50 ms",
            "p99 ms",
            "added p50 / p99 ms",
            "added p50 vs anchors (Ray Serve +1-2 ms, TorchServe +3 ms)",
        ],
        rows,
    )


def per_core(lines: list[dict]) -> list[str]:
    t = next(x for x in lines if x.get("summary") == "throughput_per_core")
    row = (
        f"peak, batching on ({t['concurrency']} clients)",
        num(t["rps"]),
        f"{t['p50_ms']:.1f} / {t['p99_ms']:.1f}",
        f"{t['server_cores']:.2f} ({t['server_main_cores']:.2f})",
        f"{t['loadgen_cores']:.2f}",
        f"**{num(t['rps_per_server_core'])}**",
        num(t["rps_per_box_core"]),
        f"{t['rps_per_server_core'] / RAY_SERVE_RPS_PER_CORE:.1f}x",
    )
    return table(
        [
            "digits MLP",
            "rps",
            "p50 / p99 ms",
            "server cores (main)",
            "load gen cores",
            "rps per server core",
            "rps per box core",
            "vs Ray Serve's ~375-500 no-op rps per core",
        ],
        [row],
    )


def batching(lines: list[dict]) -> list[str]:
    direct = {x["model"]: x["p50_ms"] for x in lines if x.get("measure") == "direct"}
    rows = []
    for g in (x for x in lines if x.get("summary") == "batching_gain"):
        by = g.get("ratio_by_slo", {})
        others = " / ".join(num(by.get(f"p99<={s}ms"), 2) for s in (25, 100, 200))
        gain = g.get("ratio")
        rows.append(
            (
                f"{g['model']} ({direct.get(g['model'], 0):.2f} ms a row)",
                _level(g.get("batched")),
                _level(g.get("unbatched")),
                f"**{num(gain, 2)}x**" if gain else "-",
                others,
                f"{g['ratio_at_peak']:.2f}x",
                f"{gain / TRITON_GAIN:.2f}" if gain else "-",
            )
        )
    return table(
        [
            "model",
            "batching 64: rps (clients, p99)",
            "batching off (baseline): rps (clients, p99)",
            "gain, p99 <= 50 ms",
            "gain, p99 <= 25 / 100 / 200 ms",
            "peak / peak",
            "gain / Triton's 3.7x",
        ],
        rows,
    )


def vs_mlflow(lines: list[dict]) -> list[str]:
    rows = []
    for m in (x for x in lines if x.get("summary") == "vs_mlflow"):
        by = m.get("ratio_by_concurrency", {})
        rows.append(
            (
                f"`mlflow models serve -w {m['mlflow'].rsplit('w', 1)[-1]}`",
                _level(m.get("ours_at_slo")),
                _level(m.get("mlflow_at_slo")),
                f"**{num(m['ratio_at_slo'], 1)}x**" if m.get("ratio_at_slo") is not None else "-",
                f"{num(m['ratio_peak_rps'], 1)}x",
                ", ".join(f"{c}: {r:g}x" for c, r in by.items()),
                f">= {m['goal']:g}x: {verdict(m['meets_goal'])}",
            )
        )
    return table(
        [
            "baseline",
            "ours: best rps with p99 <= 50 ms (clients, p99)",
            "MLflow: same",
            "ratio",
            "peak / peak",
            "ratio by clients",
            "goal",
        ],
        rows,
    )


def _counts(counts: dict[str, int]) -> str:
    """{"422": 30, "timeout": 2} as '422 x 30, timeout x 2'; '-' when empty."""
    return ", ".join(f"{k} x {v}" for k, v in counts.items()) or "-"


def _ratio(m: dict, key: str) -> str:
    """'0.97x (0.93-1.01)': the median of the per-pair ratios and their range, and how many pairs
    gave one when some did not (a window that failed, or had no good answer)."""
    value, span, n = m[key], m[f"{key}_range"], len(m[f"{key}s"])
    if value is None:
        return "-"
    text = f"{value:.2f}x" + (f" ({span[0]:.2f}-{span[1]:.2f})" if span and n > 1 else "")
    return text + (f", {n} of {m['pairs']} pairs" if n < m["pairs"] else "")


def mixed_traffic(lines: list[dict], command: str) -> list[str]:
    """Good requests' rps and p99 with 5% malformed requests mixed in, against clean traffic."""
    m = next((x for x in lines if x.get("summary") == "mixed_traffic"), None)
    if m is None:
        return ["Mixed traffic (5% malformed requests): not measured in this run (its data predates it)."]
    clean, mixed, goals = m["clean"], m["mixed"], m["goals"]
    share = f"{m['bad_fraction']:.0%}"
    failures = m["good_failures"] | {f"malformed {k}": v for k, v in m["bad_failures"].items()}
    row = (
        f"{m['concurrency']} clients, {share} malformed",
        f"{m['pairs']} x {num(m.get('duration_s'), 1)} s",
        f"{num(clean['rps'])} / {num(clean['p99_ms'], 1)}",
        f"{num(mixed['rps'])} / {num(mixed['p99_ms'], 1)}",
        f"**{_ratio(m, 'rps_ratio')}**",
        f"**{_ratio(m, 'p99_ratio')}**",
        f"{num(m['bad_requests'])}: {_counts(m['bad_statuses'])}",
        f"{m['server_errors']} / {_counts(failures)}",
        verdict(m["meets_goal"]),
    )
    out = table(
        [
            "ours, digits MLP, batching 64",
            "pairs x window",
            "clean: good rps / p99 ms",
            f"{share} malformed: good rps / p99 ms",
            "good rps mixed / clean (median, range)",
            "good p99 mixed / clean (median, range)",
            "malformed requests: answers",
            "5xx / failures",
            f"goal: >= {goals['rps_ratio']:g}x, <= {goals['p99_ratio']:g}x, no 5xx, no failures",
        ],
        [row],
    )
    kinds = "; ".join(f"{kind}: {_counts(c)}" for kind, c in m["bad_by_kind"].items())
    out += [
        "",
        f"`{command}`, {m.get('machine', 'machine not recorded')}, {m.get('date', '?')}: clean and mixed "
        "windows alternate in pairs (AB, BA, ...); ratios are per pair, the median with the range. "
        "A good request counts only if it got 200 with the model's in-process prediction; failures are "
        "good requests answered otherwise (or not at all), and malformed ones that got a 5xx, timed out "
        f"or lost their connection. Malformed answers by kind: {kinds or '-'}.",
    ]
    if m.get("failed_windows"):
        out += ["", "Windows that failed: " + "; ".join(m["failed_windows"]) + "."]
    return out


def revision_ab(lines: list[dict], command: str) -> list[str]:
    """Ours against an earlier revision's server, same run, alternating pairs: per-pair ratios."""
    m = next((x for x in lines if x.get("summary") == "revision_ab"), None)
    if m is None:
        return ["Against an earlier revision: not measured in this run (its data predates it)."]
    rev = f"`{m['rev_commit'] or m['rev']}`"
    subject = (m.get("rev_subject") or "").replace("|", "\\|")
    ours, theirs, goals = m["ours_figures"], m["rev_figures"], m["goals"]

    def figures(f: dict) -> str:
        return f"{num(f['p50_ms'], 2)} / {num(f['p99_ms'], 2)} / {num(f['rps'])}"

    row = (
        f"ours ({m.get('ours_head') or 'working tree'}) vs {rev}" + (f": {subject}" if subject else ""),
        f"{m['pairs']} x {num(m.get('duration_s'), 1)} s",
        figures(ours),
        figures(theirs),
        f"**{_ratio(m, 'p50_ratio')}**",
        _ratio(m, "p99_ratio"),
        f"**{_ratio(m, 'rps_ratio')}**",
        verdict(m["meets_goal"]),
    )
    out = table(
        [
            "digits MLP, batching 64, `/v1/.../predict`",
            "pairs x window",
            "ours: p50 / p99 ms (1 client) / rps (32 clients)",
            f"{rev}: same",
            "p50 ours / REV (median, range)",
            "p99 ours / REV",
            "rps at 32 clients ours / REV",
            f"goal: p50 <= {goals['p50_ratio']:g}x, rps >= {goals['rps_ratio']:g}x",
        ],
        [row],
    )
    non_200 = "; ".join(f"{side}: {_counts(c)}" for side, c in m["non_200"].items() if c)
    out += [
        "",
        f"`{command}`, {m.get('machine', 'machine not recorded')}, {m.get('date', '?')}: both servers "
        f"up at once, each on its own fresh home; {rev}'s is its own `bench/serving.py` from a `git "
        "archive` of it (same virtual env); pairs alternate (REV then ours, ours then REV, ...), each "
        "side 1 client then 32; the ratios are per pair, the median with the range. The goal also needs "
        "every pair measured and ours answering only 200s."
        + (f" Non-200 answers: {non_200}." if non_200 else ""),
    ]
    if m.get("failed"):
        out += ["", "What failed: " + "; ".join(m["failed"]) + "."]
    return out


def serving(ctx: Context) -> list[str]:
    """Added latency, requests/s per core, batching gain, /invocations vs MLflow, mixed traffic, and
    ours against an earlier revision."""
    lines = ctx.lines("serving")
    env = next((x for x in lines if x.get("measure") == "env"), {})
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
    out = [f"Versions: {versions}." if versions else "", ""]
    mixed = ["Mixed traffic: good requests with malformed ones among them, against clean traffic:", ""]
    mixed += mixed_traffic(lines, ctx.command("serving"))
    revision = ["Against an earlier revision of the server, measured in the same run:", ""]
    revision += revision_ab(lines, ctx.command("serving"))
    if not any(x.get("measure") == "direct" for x in lines):  # `--mixed-only`, `--revision-only`
        has_mixed = any(x.get("summary") == "mixed_traffic" for x in lines)
        if not any(x.get("summary") == "revision_ab" for x in lines):
            return [*out, "Only the mixed-traffic measurement is in this data (`--mixed-only`).", "", *mixed]
        if not has_mixed:
            return [*out, "Only the revision A/B is in this data (`--revision-only`).", "", *revision]
        return [*out, "Only the mixed-traffic and revision measurements are in this data.", "", *mixed, "",
                *revision]  # fmt: skip
    out += added_latency(lines) + [""] + per_core(lines)
    out += ["", "Dynamic batching gain at equal p99 (highest rps among the load levels within the SLO):", ""]
    out += batching(lines)
    out += ["", "Our `/invocations` vs `mlflow models serve`, same model, load generator and body:", ""]
    out += vs_mlflow(lines)
    return [*out, "", *mixed, "", *revision]
