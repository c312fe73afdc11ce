"""Hierarchical (supernode) all-reduce: group planning and bytes accounting alone, then whole runs
on a real 4-worker Dask LocalCluster (gloo on CPU) against flat DDP on the same cluster."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load

from mms_core.data.shard import load_manifest, read_shard
from mms_core.evaluate import predict_classes
from mms_core.models import ModelSpec, build_model
from mms_core.training.ddp import run_ddp
from mms_core.training.hierarchical import (
    Topology,
    flat_ring_bytes,
    plan_groups,
    run_hierarchical,
    supernode_bytes,
)
from mms_core.training.spec import HierarchicalSpec, TrainJob, TrainSpec

WORKERS = 4
EPOCHS = 12  # 4 ranks x batch 32 on ~1,250 digits rows: 10 steps an epoch
TARGET = 0.9  # stated accuracy: validation and test, every strategy
# Same seed and data, only the summation order of the gradient average differs (a reduce then a
# 2-rank ring instead of one 4-rank ring): float32 rounding, then 120 AdamW steps of drift.
PARAM_ATOL = 1e-4

# ---- groups and bytes accounting --------------------------------------------------------------


@pytest.mark.parametrize(
    ("world_size", "group_size", "expected"),
    [
        (4, 2, ((0, 1), (2, 3))),
        (5, 2, ((0, 1), (2, 3), (4,))),
        (3, 1, ((0,), (1,), (2,))),
        (2, 8, ((0, 1),)),
    ],
)
def test_plan_groups_by_size_takes_consecutive_ranks(world_size, group_size, expected):
    assert plan_groups(world_size=world_size, group_size=group_size) == expected


def test_plan_groups_by_host_keeps_first_seen_order():
    assert plan_groups(world_size=5, host_keys=[7, 3, 7, 3, 9]) == ((0, 2), (1, 3), (4,))
    assert plan_groups(world_size=3, host_keys=[1, 1, 1]) == ((0, 1, 2),)
    with pytest.raises(ValueError, match="host key per rank"):
        plan_groups(world_size=3, host_keys=[1, 1])


def _totals(groups, nbytes):
    per_rank = [
        {
            **supernode_bytes(nbytes=nbytes, topo=Topology(groups=groups, rank=r)),
            **flat_ring_bytes(nbytes=nbytes, topo=Topology(groups=groups, rank=r)),
        }
        for g in groups
        for r in g
    ]
    return {k: sum(d.get(k, 0.0) for d in per_rank) for k in {k for d in per_rank for k in d}}


@pytest.mark.parametrize(
    "groups", [((0, 1), (2, 3)), ((0, 1, 2), (3, 4, 5), (6, 7, 8)), ((0, 1, 2, 3, 4),), ((0,), (1,))]
)
def test_bytes_accounting_balances_and_matches_the_algorithms(groups):
    s = 1000.0
    n, g = sum(len(x) for x in groups), len(groups)
    t = _totals(groups, s)
    # every byte sent is received, at each level
    for level in ("intra", "inter", "flat", "flat_inter"):
        assert t.get(f"{level}_sent_bytes", 0) == pytest.approx(t.get(f"{level}_recv_bytes", 0))
    # supernode ring: 2(G-1)/G*S per supernode; flat ring: 2(n-1)/n*S per rank
    assert t.get("inter_sent_bytes", 0) == pytest.approx(2 * (g - 1) * s)
    assert t["flat_sent_bytes"] == pytest.approx(2 * (n - 1) * s)
    # in a group of m: ring reduce-scatter (m-1)S, gather (m-1)S/m, broadcast (m-1)S
    intra = sum((len(x) - 1) * s * (2 + 1 / len(x)) for x in groups)
    assert t.get("intra_sent_bytes", 0) == pytest.approx(intra)


def test_inter_group_bytes_are_below_flat_all_reduce_for_groups_of_several():
    t = _totals(((0, 1), (2, 3)), 1000.0)
    assert t["inter_sent_bytes"] == pytest.approx(2000)  # two supernodes, ring of 2
    assert t["flat_inter_sent_bytes"] == pytest.approx(3000)  # ring edges 2->1 and 0->3 cross groups
    assert t["flat_sent_bytes"] == pytest.approx(6000)


# ---- whole runs on a LocalCluster --------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest_uri(digits_manifest):
    return digits_manifest(WORKERS)


@pytest.fixture(scope="module")
def client(training_cluster):
    with training_cluster(WORKERS) as client:
        yield client


def _job(manifest_uri, out: Path, **train) -> TrainJob:
    return TrainJob(
        manifest_uri=manifest_uri,
        model=ModelSpec(name="mlp"),
        train=TrainSpec(epochs=EPOCHS, checkpoint_every=0, **train),
        output_uri=str(out / "weights.safetensors"),
        checkpoint_uri=str(out / "ckpt"),
    )


@pytest.fixture(scope="module")
def runs(client, manifest_uri, tmp_path_factory):
    """Flat DDP, then hierarchical in groups of 2 and by host, on the same 4 workers.

    Three jobs, as each one after the first restarts the 4 workers (the bulk of this file's time).
    """
    settings = {"ddp": None, "size2": 2, "host": None}
    out = {}
    for name, group_size in settings.items():
        d = tmp_path_factory.mktemp(f"hier-{name}")
        job = _job(
            manifest_uri,
            d,
            strategy="ddp" if name == "ddp" else "hierarchical",
            hierarchical=HierarchicalSpec(group_size=group_size),
        )
        run = run_ddp if name == "ddp" else run_hierarchical
        results = run(client=client, job=job)
        out[name] = {"results": results, "state": st_load((d / "weights.safetensors").read_bytes())}
    return out


@pytest.mark.parametrize("name", ["ddp", "size2", "host"])
def test_each_setting_trains_digits_to_the_stated_accuracy(runs, name, manifest_uri):
    results = runs[name]["results"]
    assert len({r.params_sha256 for r in results}) == 1  # every rank ends with the same weights
    assert results[0].history[-1].val_accuracy >= TARGET
    model = build_model(spec=ModelSpec(name="mlp"), in_features=64, n_classes=10)
    model.load_state_dict(runs[name]["state"])
    x, y = read_shard(load_manifest(manifest_uri).test)
    assert (predict_classes(model=model, x=x) == y).mean() >= TARGET


@pytest.mark.parametrize("name", ["size2", "host"])
def test_two_level_average_matches_ddp_up_to_summation_order(runs, name):
    ref, got = runs["ddp"]["state"], runs[name]["state"]
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=PARAM_ATOL)


def test_stats_name_the_groups_and_count_bytes_per_level(runs):
    size2 = [r.stats for r in runs["size2"]["results"]]
    assert all(s["groups"] == [[0, 1], [2, 3]] for s in size2)
    assert [s["is_leader"] for s in size2] == [True, False, True, False]
    steps = runs["size2"]["results"][0].steps
    assert all(s["buckets"] >= steps and s["gradient_bytes"] > 0 for s in size2)
    # only supernodes send across groups, and in all less than a flat all-reduce would
    assert [s["inter_sent_bytes"] > 0 for s in size2] == [True, False, True, False]
    inter = sum(s["inter_sent_bytes"] for s in size2)
    assert inter < sum(s["flat_inter_sent_bytes"] for s in size2) < sum(s["flat_sent_bytes"] for s in size2)
    assert all(s["intra_sent_bytes"] > 0 for s in size2)

    host = [r.stats for r in runs["host"]["results"]]  # one machine: one group, no supernode ring
    assert all(s["groups"] == [[0, 1, 2, 3]] and s["leader"] == 0 for s in host)
    assert sum(s["inter_sent_bytes"] for s in host) == 0
    assert runs["ddp"]["results"][0].stats == {}  # flat DDP counts nothing
