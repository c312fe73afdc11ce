"""The bench/RESULTS.md section of bench.pipeline_walltime: `mms run` on digits against the code
before the embedded Prefect server, its start-up pieces, and the flow's time outside its tasks."""

from __future__ import annotations

from bench.report_data import Context, num, table, verdict

TASK_LABELS = {"train_loop_only": "of which the training loop itself"}


def pipeline(ctx: Context) -> list[str]:
    """`mms run` on digits against the code before the embedded server, where its time goes, and
    the flow's time outside its tasks."""
    lines = [x for x in ctx.lines("pipeline_walltime") if "measure" in x]
    v = {x["measure"]: x["value"] for x in lines}
    by = {x["measure"]: x for x in lines}
    out: list[str] = []
    if "cli_ours_fresh_s" in v:
        rev = by.get("cli_fresh_ours_over_baseline", {}).get("baseline_rev", "?")
        rows = []
        labels = (("fresh", "fresh process, new MMS_HOME"), ("reused", "fresh process, same MMS_HOME"))
        for when, label in labels:
            r = by.get(f"cli_{when}_ours_over_baseline", {})
            spread = f" ({r['min']:.2f}-{r['max']:.2f})" if "min" in r else ""
            rows.append(
                (label, num(v.get(f"cli_ours_{when}_s"), 1), num(v.get(f"cli_baseline_{when}_s"), 1),
                 f"**{r['value']:.2f}**{spread}" if r else "-")
            )  # fmt: skip
        out += table(
            ["`mms run examples/digits.yaml`", "ours s (median)", f"before ({rev}) s", "ours / before"], rows
        )
        fresh = v.get("cli_ours_fresh_s")
        met = verdict(fresh <= 30 if fresh else None)
        out += ["", f"Goal <= 30 s on 2 cores, new MMS_HOME: {met}, {fresh} s.", ""]
    parts = [
        ("Python imports (torch, prefect, mlflow, dask, flows)", "imports_s"),
        ("embedded Prefect server, new home (spawn to ready)", "embedded_server_new_home_s"),
        ("embedded Prefect server, existing home, server stopped", "embedded_server_existing_home_s"),
        ("embedded Prefect server, attach to the running one", "embedded_server_attach_s"),
        ("MLflow SQLite store, first open (migrations)", "mlflow_store_open_new_s"),
        ("the flow in a warm process (server up)", "flow_wall_warm_process_s"),
    ]
    tasks = sorted(
        (k for k in v if k.startswith("task_")), key=lambda k: (k == "task_train_loop_only_s", -v[k])
    )
    for k in tasks:
        name = k[len("task_") : -len("_s")]
        parts.append((f"- {TASK_LABELS.get(name, 'task ' + name)}", k))
    out += table(["part (alone)", "seconds"], [(label, num(v.get(k), 2)) for label, k in parts if k in v])
    task_keys = [k for k in tasks if k != "task_train_loop_only_s"]
    flow = v.get("flow_wall_warm_process_s")
    if flow and task_keys:
        per_task_ms = 1000 * (flow - sum(v[k] for k in task_keys)) / len(task_keys)
        out += [""] + table(
            ["figure", "ours", "anchor (brief, section 4)", "ours / anchor"],
            [
                (
                    f"flow wall time outside its {len(task_keys)} tasks, per task (an upper bound on "
                    "Prefect's per-task cost: includes the flow's own work between tasks)",
                    f"{per_task_ms:,.0f} ms",
                    "Prefect ~10-100 ms per task run",
                    f"{per_task_ms / 100:.1f}x the top of the range",
                )
            ],
        )
        out += ["", f"Goal <= 150 ms per task: {verdict(per_task_ms <= 150)}."]
    return out
