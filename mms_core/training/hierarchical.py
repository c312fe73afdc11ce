"""Hierarchical ("supernode") data parallel on a Dask cluster.

Ranks are split into groups (``training.hierarchical.group_size`` consecutive ranks, or one group
per host); the lowest rank of each group is its supernode. Every step, per DDP gradient bucket:

1. each group reduces (sums) its gradients onto its supernode,
2. the supernodes all-reduce among themselves,
3. each supernode broadcasts the result back into its group.

Only step 2 crosses groups, so with one group per host only supernodes talk across hosts. The
result equals DDP's averaged gradient up to float summation order. It runs as a DDP
communication hook, so the per-rank loop, checkpoints and fail-over are DDP's (launch.py, loop.py).

Bytes accounting (``RankResult.stats``, per rank, gradient buckets only; DDP's start-up broadcast
and the per-epoch metric all-reduce are left out). For a bucket of S bytes, m members in the
rank's group, G groups and n ranks, following gloo's algorithms (gloo/reduce.cc, allreduce.cc,
broadcast.cc; nccl differs):

- reduce: a ring reduce-scatter (each member sends and receives (m-1)/m*S), then every member but
  the supernode sends its reduced chunk (S/m) to the supernode;
- supernode all-reduce: a ring, 2*(G-1)/G*S sent and received per supernode (the inter-group bytes);
- broadcast: a binomial tree from the supernode; each member receives S once and sends S per child.

Flat DDP, for comparison, all-reduces each bucket in one ring over all ranks: 2*(n-1)/n*S sent
and received per rank, of which rank r's share crosses groups when its ring successor (gloo
sends to rank r-1) is in another group. Chunk sizes are taken as exactly S/k; gloo rounds them
to whole elements and adds a small header per message.
"""

# No `from __future__ import annotations`: DDP's register_comm_hook compares the hook's annotations
# with dist.GradBucket and Future[Tensor] objects and rejects them as strings.
import hashlib
import socket
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from distributed import Client
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mms_core.training.launch import run_process_group
from mms_core.training.loop import Replicated, train_rank
from mms_core.training.spec import RankResult, TrainJob

Groups = tuple[tuple[int, ...], ...]


def run_hierarchical(
    *,
    client: Client,
    job: TrainJob,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> list[RankResult]:
    """Train ``job`` with supernode all-reduce across the cluster's workers (one rank per worker).

    Args:
        client: a connected Dask client (built by the caller).
        job: the training job; ``job.train.hierarchical.group_size`` ranks per group (None: one
            group per host) and ``job.train.world_size`` ranks (default: all workers).
        on_event: called in this thread with each event from rank 0 (epoch metrics, progress,
            resume and restart notices).

    Returns:
        Every rank's result in rank order; each one's ``stats`` holds its groups and bytes
        counts (see the module docstring).
    """
    return run_process_group(client=client, job=job, rank_fn=hierarchical_rank, on_event=on_event)


def hierarchical_rank(
    job: TrainJob, *, rank: int, world_size: int, emit: Callable | None = None
) -> RankResult:
    """One rank of a hierarchical job (runs inside the process group); adds its bytes stats."""
    parallel = Hierarchical()
    result = train_rank(job=job, rank=rank, world_size=world_size, emit=emit, parallel=parallel)
    return result.model_copy(update={"stats": parallel.stats(rank=rank, world_size=world_size)})


@dataclass(frozen=True)
class Topology:
    """The groups (each a tuple of global ranks, lowest first) and this rank's place in them."""

    groups: Groups
    rank: int

    @property
    def members(self) -> tuple[int, ...]:
        """The ranks of this rank's group."""
        return next(g for g in self.groups if self.rank in g)

    @property
    def leader(self) -> int:
        """This group's supernode: its lowest rank."""
        return self.members[0]

    @property
    def leaders(self) -> tuple[int, ...]:
        """Every group's supernode, in group order."""
        return tuple(g[0] for g in self.groups)


def plan_groups(
    *, world_size: int, group_size: int | None = None, host_keys: Sequence[int] | None = None
) -> Groups:
    """Split ranks ``0..world_size-1`` into groups.

    Args:
        world_size: number of ranks.
        group_size: ranks per group, consecutive (the last group may be smaller); None to group by
            ``host_keys``.
        host_keys: one key per rank (equal keys: same host); used when ``group_size`` is None.

    Returns:
        The groups, each sorted, ordered by their lowest rank.
    """
    if group_size is not None:
        return tuple(
            tuple(range(s, min(s + group_size, world_size))) for s in range(0, world_size, group_size)
        )
    if host_keys is None or len(host_keys) != world_size:
        raise ValueError("plan_groups needs one host key per rank when group_size is None")
    by_host: dict[int, list[int]] = {}
    for r, key in enumerate(host_keys):
        by_host.setdefault(key, []).append(r)  # dicts keep first-seen order: groups by lowest rank
    return tuple(tuple(g) for g in by_host.values())


def gather_host_keys(*, world_size: int, device: torch.device) -> list[int]:
    """Every rank's host, as a 63-bit hash of its hostname (collective).

    An int64 all-gather rather than ``all_gather_object``: no pickle crosses the wire.
    """
    digest = hashlib.sha256(socket.gethostname().encode()).digest()
    mine = torch.tensor([int.from_bytes(digest[:8], "big") >> 1], dtype=torch.int64, device=device)
    keys = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(keys, mine)
    return [int(k.item()) for k in keys]


@dataclass
class _HookState:
    """What the communication hook needs on one rank; ``sent``/``received`` count its bytes."""

    topo: Topology
    world_size: int
    group: dist.ProcessGroup | None  # None when the group has one member: nothing to reduce
    leaders: dist.ProcessGroup | None  # None unless this rank is a supernode and there are 2+ groups
    counts: Counter = field(default_factory=Counter)


def supernode_hook(state: _HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average one gradient bucket through the supernodes.

    The three collectives run one after another in this call and the returned future is already
    complete: chaining them asynchronously would start each collective from the previous one's
    completion callback, on the backend's own thread. The cost: this bucket's communication does
    not overlap with the rest of backward.
    """
    tensor = bucket.buffer()
    # Divide first, as DDP does: the sum cannot overflow, and with one rank per group the result
    # is DDP's bit for bit (the supernode ring is then DDP's ring).
    tensor.div_(state.world_size)
    topo = state.topo
    if state.group is not None:
        dist.reduce(tensor, dst=topo.leader, group=state.group)
    if state.leaders is not None:
        dist.all_reduce(tensor, group=state.leaders)
    if state.group is not None:
        dist.broadcast(tensor, src=topo.leader, group=state.group)
    nbytes = tensor.numel() * tensor.element_size()
    state.counts.update(supernode_bytes(nbytes=nbytes, topo=topo))
    state.counts.update(flat_ring_bytes(nbytes=nbytes, topo=topo))
    state.counts.update(buckets=1, gradient_bytes=nbytes)
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(tensor)
    return fut


class Hierarchical(Replicated):
    """DDP with :func:`supernode_hook`: every rank holds the whole model, as in DDP."""

    def __init__(self) -> None:
        self.state: _HookState | None = None

    def wrap(self, model: nn.Module, *, job: TrainJob, world_size: int) -> nn.Module:
        """Build the groups (collective: every rank creates every group, in the same order), wrap
        ``model`` in DDP and register the hook."""
        if world_size == 1:
            return model
        rank = dist.get_rank()
        group_size = job.train.hierarchical.group_size
        keys = None
        if group_size is None:
            device = next(model.parameters()).device  # nccl gathers device tensors only
            keys = gather_host_keys(world_size=world_size, device=device)
        topo = Topology(
            groups=plan_groups(world_size=world_size, group_size=group_size, host_keys=keys), rank=rank
        )
        group, _ = dist.new_subgroups_by_enumeration(ranks_per_subgroup_list=[list(g) for g in topo.groups])
        leaders = dist.new_group(ranks=list(topo.leaders))
        self.state = _HookState(
            topo=topo,
            world_size=world_size,
            group=group if len(topo.members) > 1 else None,
            leaders=leaders if rank in topo.leaders and len(topo.groups) > 1 else None,
        )
        ddp = DDP(model)
        ddp.register_comm_hook(self.state, supernode_hook)
        return ddp

    def stats(self, *, rank: int, world_size: int) -> dict[str, Any]:
        """This rank's topology and byte counts since :meth:`wrap`, JSON-able (``RankResult.stats``)."""
        topo = self.state.topo if self.state else Topology(groups=((rank,),), rank=rank)
        counts = self.state.counts if self.state else Counter()
        keys = ("buckets", "gradient_bytes", *(f"{k}_bytes" for k in _BYTE_KEYS))
        return {
            "groups": [list(g) for g in topo.groups],
            "leader": topo.leader,
            "is_leader": rank == topo.leader,
            "world_size": world_size,
            **{k: round(counts[k]) for k in keys},
        }


_BYTE_KEYS = (
    "intra_sent",
    "intra_recv",
    "inter_sent",
    "inter_recv",
    "flat_sent",
    "flat_recv",
    "flat_inter_sent",
    "flat_inter_recv",
)


def supernode_bytes(*, nbytes: int, topo: Topology) -> dict[str, float]:
    """Bytes this rank sends and receives to average one bucket of ``nbytes`` through supernodes,
    by level: ``intra_*`` inside its group, ``inter_*`` between supernodes (gloo's algorithms,
    see the module docstring)."""
    m, n_groups = len(topo.members), len(topo.groups)
    local = topo.members.index(topo.rank)
    out = Counter()
    if m > 1:
        ring = nbytes * (m - 1) / m  # reduce-scatter
        out.update(intra_sent=ring, intra_recv=ring)
        if local == 0:
            out.update(intra_recv=nbytes * (m - 1) / m, intra_sent=nbytes * _tree_children(local, m))
        else:
            out.update(intra_sent=nbytes / m + nbytes * _tree_children(local, m), intra_recv=nbytes)
    if local == 0 and n_groups > 1:
        ring = 2 * nbytes * (n_groups - 1) / n_groups
        out.update(inter_sent=ring, inter_recv=ring)
    return {f"{k}_bytes": v for k, v in out.items()}


def flat_ring_bytes(*, nbytes: int, topo: Topology) -> dict[str, float]:
    """What a flat ring all-reduce of the same bucket over all ranks would move for this rank
    (``flat_*``), and the part of it that crosses groups (``flat_inter_*``): gloo's ring sends to
    rank r-1 and receives from rank r+1."""
    n = sum(len(g) for g in topo.groups)
    ring = 2 * nbytes * (n - 1) / n
    group_of = {r: i for i, g in enumerate(topo.groups) for r in g}
    me = group_of[topo.rank]
    return {
        "flat_sent_bytes": ring,
        "flat_recv_bytes": ring,
        "flat_inter_sent_bytes": ring if group_of[(topo.rank - 1) % n] != me else 0.0,
        "flat_inter_recv_bytes": ring if group_of[(topo.rank + 1) % n] != me else 0.0,
    }


def _tree_children(vrank: int, size: int) -> int:
    """Peers that ``vrank`` (0 = root) sends to in gloo's binomial-tree broadcast over ``size`` ranks:
    in round i, ranks below 2**i send to rank + 2**i."""
    return sum(1 for i in range(max(size - 1, 0).bit_length()) if vrank < 2**i and vrank + 2**i < size)
