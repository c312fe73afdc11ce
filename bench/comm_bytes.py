"""Bytes communicated: hierarchical (supernode) all-reduce against flat DDP, same model and steps.

    python -m bench.comm_bytes [--epochs N]

Both strategies train one job (MLP 256x256 on the synthetic set of bench.ddp_overhead, 4 shards)
on a 4-worker LocalCluster, one rank per worker; hierarchical runs 2 groups of 2
(``training.hierarchical.group_size=2``): ranks {0,1} and {2,3}, supernodes 0 and 2. Every run
prints one JSON line; all lines are appended to bench/data/comm_bytes.jsonl.

Two figures per run:

- ``measured``: TCP payload bytes that each rank received from the other ranks during training,
  read from the kernel's per-socket counters (``TCP_INFO`` bytes_received / bytes_sent) of the
  rank processes' own sockets before and after :func:`train_rank`, each socket attributed to the
  peer rank that owns its other end. Sockets to the rendezvous store and to Dask are left out.
  On one host everything is loopback, so the point is the split: bytes between ranks of different
  groups are the ones that would cross hosts. Includes DDP's start-up parameter broadcast and the
  per-epoch metric all-reduce (both runs alike) and gloo's message headers.
- ``accounted``: the gradient bytes the strategy's accounting predicts (mms_core.training.
  hierarchical: gloo's ring reduce, ring all-reduce and binomial broadcast; flat: a ring of all
  ranks), from the hierarchical ranks' ``RankResult.stats``.

``box_lo_bytes`` is the loopback interface's received-bytes delta (/proc/net/dev) over the whole
run, launch and teardown included: every process on the machine counts there (Dask, other jobs),
so it bounds the run's traffic from above and is not the comparison.

A last ``kind: topology`` block applies the same accounting to larger clusters (hosts x ranks
per host, host-contiguous rank order as launch.py gives it), per byte of gradient.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from distributed import Client, LocalCluster
from safetensors.torch import load as st_load

from bench.ddp_overhead import machine, prepare_data
from mms_core.models import ModelSpec
from mms_core.training.ddp import ddp_rank
from mms_core.training.hierarchical import (
    Topology,
    flat_ring_bytes,
    hierarchical_rank,
    plan_groups,
    supernode_bytes,
)
from mms_core.training.launch import run_process_group
from mms_core.training.spec import HierarchicalSpec, RankResult, TrainJob, TrainSpec

BENCH = "comm_bytes"
DATA = Path(__file__).parent / "data" / "comm_bytes.jsonl"
WORKERS, GROUP_SIZE = 4, 2
GROUPS = plan_groups(world_size=WORKERS, group_size=GROUP_SIZE)
TOPOLOGIES = ((2, 2), (2, 8), (4, 8), (16, 8))  # (hosts, ranks per host) for the accounting block
# struct tcp_info (linux/tcp.h): u64 tcpi_bytes_received at byte 128, u64 tcpi_bytes_sent at 200.
TCP_INFO_RECEIVED, TCP_INFO_SENT = 128, 200


def tcp_counters() -> dict[tuple, tuple[int, int]]:
    """(local, peer) endpoint of each connected TCP socket of this process -> (received, sent) bytes."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            # A duplicate of the descriptor: closing it leaves gloo's and Dask's socket open.
            with socket.socket(fileno=os.dup(int(fd))) as s:
                if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                key = (s.getsockname()[:2], s.getpeername()[:2])
                info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        except OSError:  # closed meanwhile, listening or not connected
            continue
        out[key] = (
            struct.unpack_from("Q", info, TCP_INFO_RECEIVED)[0],
            struct.unpack_from("Q", info, TCP_INFO_SENT)[0],
        )
    return out


def _store_port() -> int | None:
    store = dist.distributed_c10d._get_default_store()  # no public accessor; bench-only
    while hasattr(store, "underlying_store"):
        store = store.underlying_store
    return getattr(store, "port", None)


def measured_rank(job: TrainJob, *, rank: int, world_size: int, emit: Any = None) -> RankResult:
    """Run the job's strategy's rank function and add the bytes this rank exchanged with every
    other rank during it, split into intra- and inter-group by GROUPS, to ``stats["measured"]``."""
    inner = hierarchical_rank if job.train.strategy == "hierarchical" else ddp_rank
    before = tcp_counters()
    result = inner(job, rank=rank, world_size=world_size, emit=emit)
    after = tcp_counters()
    skip = {_store_port()}  # the rank's own process holds only the store's and gloo's sockets
    owners: list[Any] = [None] * world_size
    dist.all_gather_object(owners, ({local for local, _ in after}, skip))
    owner = {ep: r for r, (eps, _) in enumerate(owners) for ep in eps}
    skip |= {p for _, ports in owners for p in ports}
    group_of = {r: i for i, g in enumerate(GROUPS) for r in g}
    totals = dict.fromkeys(("intra_recv", "intra_sent", "inter_recv", "inter_sent"), 0)
    for (local, peer), (recv, sent) in after.items():
        p = owner.get(peer)
        if p is None or p == rank or local[1] in skip or peer[1] in skip:
            continue
        old_recv, old_sent = before.get((local, peer), (0, 0))
        level = "intra" if group_of[p] == group_of[rank] else "inter"
        totals[f"{level}_recv"] += recv - old_recv
        totals[f"{level}_sent"] += sent - old_sent
    return result.model_copy(update={"stats": {**result.stats, "measured": totals}})


def lo_received() -> int:
    """Bytes received on the loopback interface since boot (every process on the machine)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, fields = line.partition(":")
        if name.strip() == "lo":
            return int(fields.split()[0])
    return 0


def make_job(*, manifest_uri: str, workdir: Path, strategy: str, epochs: int) -> TrainJob:
    """The job both strategies run: MLP 256x256, batch 32 per rank, no step checkpoints."""
    return TrainJob(
        manifest_uri=manifest_uri,
        model=ModelSpec(name="mlp", kwargs={"hidden": [256, 256]}),
        train=TrainSpec(
            strategy=strategy,
            epochs=epochs,
            checkpoint_every=0,
            world_size=WORKERS,
            hierarchical=HierarchicalSpec(group_size=GROUP_SIZE),
        ),
        output_uri=str(workdir / strategy / "model.safetensors"),
        checkpoint_uri=str(workdir / strategy / "checkpoints"),
        num_threads=1,
    )


def run_one(client: Client, *, job: TrainJob) -> tuple[list[RankResult], dict[str, Any]]:
    """Train ``job`` with its strategy through the measuring rank function; one JSON-ready row."""
    lo0, t0 = lo_received(), time.perf_counter()
    results = run_process_group(client=client, job=job, rank_fn=measured_rank)
    wall, lo = time.perf_counter() - t0, lo_received() - lo0
    measured = {k: sum(r.stats["measured"][k] for r in results) for k in results[0].stats["measured"]}
    r0 = results[0]
    return results, {
        "kind": "run",
        "strategy": job.train.strategy,
        "groups": [list(g) for g in GROUPS],
        "steps": r0.steps,
        "measured": measured,
        "measured_inter_per_step": round(measured["inter_recv"] / r0.steps),
        "measured_intra_per_step": round(measured["intra_recv"] / r0.steps),
        "box_lo_bytes": lo,
        "train_s": round(r0.train_seconds, 3),
        "wall_s": round(wall, 3),
        "final_val_accuracy": round(r0.history[-1].val_accuracy, 4),
        "params_sha256": r0.params_sha256[:16],
    }


def accounted(results: list[RankResult]) -> dict[str, int]:
    """Sum over ranks of the hierarchical stats' byte counts (hierarchical and flat accounting)."""
    keys = [k for k in results[0].stats if k.endswith("_bytes")]
    return {k: sum(r.stats[k] for r in results) for k in keys}


def topology_rows() -> list[dict[str, Any]]:
    """The accounting for larger clusters, per byte of gradient, summed over ranks."""
    rows = []
    for hosts, per_host in TOPOLOGIES:
        n = hosts * per_host
        groups = plan_groups(world_size=n, group_size=per_host)
        tot: dict[str, float] = {}
        for r in range(n):
            topo = Topology(groups=groups, rank=r)
            for k, v in {
                **supernode_bytes(nbytes=1, topo=topo),
                **flat_ring_bytes(nbytes=1, topo=topo),
            }.items():
                tot[k] = tot.get(k, 0.0) + v
        rows.append(
            {
                "kind": "topology",
                "hosts": hosts,
                "ranks_per_host": per_host,
                "flat_sent_per_byte": round(tot["flat_sent_bytes"], 3),
                "flat_inter_host_sent_per_byte": round(tot["flat_inter_sent_bytes"], 3),
                "hier_inter_host_sent_per_byte": round(tot.get("inter_sent_bytes", 0.0), 3),
                "hier_intra_host_sent_per_byte": round(tot.get("intra_sent_bytes", 0.0), 3),
                # sequential ring steps that wait on an inter-host link (latency): every step of the flat
                # ring does, only the supernode ring's steps in the hierarchical scheme
                "flat_steps_on_inter_host_links": 2 * (n - 1),
                "hier_steps_on_inter_host_links": 2 * (hosts - 1),
            }
        )
    return rows


def summary(flat: dict, hier: dict, acc: dict[str, int], *, max_abs_diff: float) -> dict[str, Any]:
    """Inter-group bytes, hierarchical over flat: measured and accounted; and how close the weights are."""
    return {
        "kind": "summary",
        "measured_inter_ratio": round(hier["measured"]["inter_recv"] / flat["measured"]["inter_recv"], 3),
        "measured_total_ratio": round(
            sum(hier["measured"][k] for k in ("intra_recv", "inter_recv"))
            / sum(flat["measured"][k] for k in ("intra_recv", "inter_recv")),
            3,
        ),
        "accounted": acc,
        "accounted_inter_ratio": round(acc["inter_sent_bytes"] / acc["flat_inter_sent_bytes"], 3),
        "params_max_abs_diff": max_abs_diff,
        "val_accuracy": {"flat": flat["final_val_accuracy"], "hierarchical": hier["final_val_accuracy"]},
    }


def emit(line: dict[str, Any], *, stamp: dict[str, str]) -> None:
    """Print one JSON line and append it to bench/data/comm_bytes.jsonl."""
    text = json.dumps({"bench": BENCH, **line, **stamp})
    print(text, flush=True)
    with DATA.open("a") as f:
        f.write(text + "\n")


def _max_abs_diff(a: TrainJob, b: TrainJob) -> float:
    sa, sb = (st_load(Path(j.output_uri).read_bytes()) for j in (a, b))
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: flat DDP, then hierarchical, on one 4-worker LocalCluster."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="Epochs per run (default: %(default)s).")
    args = parser.parse_args(argv)
    stamp = {"machine": machine(), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    stamp["torch"] = torch.__version__
    with (
        tempfile.TemporaryDirectory(prefix="mms-bench-comm-") as tmp,
        LocalCluster(
            n_workers=WORKERS, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        manifest_uri = prepare_data(root=str(Path(tmp) / "data"))
        jobs = {
            s: make_job(manifest_uri=manifest_uri, workdir=Path(tmp), strategy=s, epochs=args.epochs)
            for s in ("ddp", "hierarchical")
        }
        _, flat = run_one(client, job=jobs["ddp"])
        emit(flat, stamp=stamp)
        hier_results, hier = run_one(client, job=jobs["hierarchical"])
        emit(hier, stamp=stamp)
        diff = _max_abs_diff(jobs["ddp"], jobs["hierarchical"])
    emit(summary(flat, hier, accounted(hier_results), max_abs_diff=diff), stamp=stamp)
    for row in topology_rows():
        emit(row, stamp=stamp)


if __name__ == "__main__":
    main()
