"""The orchestration start-up table of bench/RESULTS.md (bench.orchestration_startup's summary lines):
our embedded Prefect server vs Prefect's temporary server, each start a fresh process under a CPU hog."""

from __future__ import annotations

from bench.report_data import Context, num, table, verdict

NAME = "orchestration_startup"
GOAL_STARTS = 20  # issue 11's done-when: 0 failures in 20 starts under load, for each of our modes
MODE_LABELS = {
    "ours_fresh": "ours, new home (server spawned, database migrated)",
    "ours_reused_stopped": "ours, same home, server stopped before each start",
    "ours_reused_running": "ours, same home, server left running (a second `mms run` attaches)",
    "baseline_fresh": "baseline: Prefect's temporary server (20 s timeout), new home",
    "baseline_reused": "baseline: Prefect's temporary server (20 s timeout), same home",
}


def _times(stats: dict) -> str:
    return f"{num(stats.get('p50'), 1)} / {num(stats.get('max'), 1)}" if stats else "-"


def _failures(s: dict) -> str:
    if not s["failures"]:
        return "0"
    return f"**{s['failures']}** ({s['first_error']})" if s.get("first_error") else f"**{s['failures']}**"


def _ratio(r: dict | None) -> str:
    if not r or not r.get("pairs"):
        return "- (no round with both ok)"
    spread = f" ({r['min']:.2f}-{r['max']:.2f})" if r["pairs"] > 1 else ""
    return f"{r['median']:.2f}x{spread}, {r['pairs']} round{'s' if r['pairs'] != 1 else ''}"


def goal(summaries: list[dict]) -> tuple[bool, str]:
    """Whether every one of our modes ran >= 20 starts under the hog without a failure; and why not."""
    ours = [s for s in summaries if s.get("ours")]
    if not ours:
        return False, "no starts of ours"
    short = [s for s in ours if s["n"] < GOAL_STARTS]
    failed = sum(s["failures"] for s in ours)
    if not all(s.get("hog_processes") for s in ours):
        return False, "measured without the CPU hog (`--no-hog`)"
    if failed:
        return False, f"{failed} failure{'s' if failed != 1 else ''} in {sum(s['n'] for s in ours)} starts"
    if short:
        fewest = min(s["n"] for s in short)
        return False, f"0 failures, but only {fewest} starts in a mode ({GOAL_STARTS} needed)"
    return True, f"0 failures; at least {min(s['n'] for s in ours)} starts in each of our {len(ours)} modes"


def orchestration_startup(ctx: Context) -> list[str]:
    """Time to a ready Prefect API and to a finished one-task flow, per mode; ratios; the goal."""
    lines = ctx.lines(NAME)
    summaries = [x for x in lines if x.get("summary")]
    if not summaries:
        raise ValueError("no summary lines: the run did not finish")
    first = summaries[0]
    hog = first.get("hog_processes", "?")
    out = [
        f"Each start is a fresh Python process, under a CPU hog of {hog} spinning processes (nice "
        f"{first.get('nice', '?')}; they got {num(first.get('hog_cores'), 2)} cores on average); "
        f"{num(first.get('elapsed_s'))} s in all. Seconds from the process's start:",
        "",
    ]
    rows = [
        (
            MODE_LABELS.get(s["mode"], s["mode"]),
            s["n"],
            _failures(s),
            _times(s["ready"]),
            _times(s["flow_done"]),
            num(s.get("wall", {}).get("p50"), 1),
        )
        for s in summaries
    ]
    head = ["mode", "starts", "failures", "to ready p50 / max", "to flow done p50 / max", "spawn to exit p50"]
    out += table(head, rows)
    out += ["", "Ours / baseline in the same round (median of the per-round ratios, range):", ""]
    ratio_rows = [
        (
            MODE_LABELS.get(s["mode"], s["mode"]),
            f"`{s['vs']}`",
            _ratio(s.get("ratio_ready")),
            f"**{_ratio(s.get('ratio_flow_done'))}**",
        )
        for s in summaries
        if s.get("vs")
    ]
    out += table(["ours", "vs", "to ready", "to flow done"], ratio_rows)
    met, why = goal(summaries)
    out += ["", f"Goal: 0 failures in {GOAL_STARTS} starts under load (ours): {verdict(met)} ({why})."]
    return out
