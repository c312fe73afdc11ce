"""FedAvg vs FedSGD on digits: rounds to a target test accuracy, the shape of McMahan et al.
2017, Table 2 (issue 4).

    python -m bench.fedavg_table [--quick] [--plot-only] | tee bench/data/fedavg_table.jsonl

Data: scikit-learn's digits through the pipeline's own ingest and shard steps (1,437 training
rows, 270 test rows; ``val_fraction=0.05``, the smallest the split allows, as only the test split
is read). Digits has 1/40 of MNIST's training rows: 100 clients would hold 14 rows each, and
E=5, B=10 would mean 7 local steps per round against the paper's 300, which measures nothing
about local work. So the training rows are augmented with their 8 one-pixel shifts (9x: 12,933
rows, 129 per client, 65 local steps per round at E=5; test rows are left as they are);
``--no-augment`` runs the plain rows.

K=100 clients, C=0.1, partitioned IID or non-IID the paper's way (rows sorted by label, 200
shards, two per client), and three client settings: FedSGD (E=1, B=inf: one full-batch
gradient step per client), FedAvg E=1 B=10 and E=5 B=10. Model: the zoo MLP with two hidden
layers of 200 units and no dropout (the paper's "2NN"; its Table 2 uses a CNN).

Every learning rate of a grid runs with 3 seeds (the seed fixes partition, initial weights,
client sampling and shuffles); a run stops at the first round whose test accuracy reaches the
target. A setting's figure is the median over seeds at its best learning rate (best = fewest
median rounds; the paper, too, took the best rate per setting); speedups are FedSGD's rounds
over the setting's, per partition, from the same run.

Each simulation runs its 10 sampled clients in-process, inside one Dask task per grid point on
a 2-worker LocalCluster: a task per client per round (what ``run_fedavg`` does) would add Dask's
per-task cost to client work of a few milliseconds. The ``dask_path`` line measures that: the same
rounds through ``run_fedavg`` and in-process, and whether both end with the same weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from distributed import Client, LocalCluster, as_completed
from safetensors.torch import load as st_load

from mms_core import steps
from mms_core.data.ingest import DataSpec
from mms_core.data.shard import ShardSpec, load_manifest, preprocess_and_shard, read_shard
from mms_core.models import ModelSpec, build_model
from mms_core.training import fedavg, fedavg_client, federated_math
from mms_core.training.spec import EpochMetrics, FedAvgSpec, TrainJob, TrainSpec

HERE = Path(__file__).parent
DATA = HERE / "data" / "fedavg_table.jsonl"
PNG = HERE / "fedavg.png"
MODEL = ModelSpec(name="mlp", kwargs={"hidden": [200, 200], "dropout": 0.0})  # the paper's "2NN"
CLIENTS, FRACTION = 100, 0.1
ALSO_TARGETS = (0.9, 0.93)  # rounds to these are read off the same curves, for reference


@dataclass(frozen=True)
class Setting:
    name: str
    local_epochs: int
    local_batch_size: int  # 0: the client's whole dataset as one batch


SETTINGS = (Setting("FedSGD", 1, 0), Setting("FedAvg E=1", 1, 10), Setting("FedAvg E=5", 5, 10))
PARTITIONS = {"iid": {"partition": "iid"}, "non-iid": {"partition": "shards", "shards_per_client": 2}}
# McMahan et al. 2017, Table 2, MNIST CNN, C=0.1, target 99%: rounds (E, B as in SETTINGS).
PAPER = {
    ("iid", "FedSGD"): 626,
    ("iid", "FedAvg E=1"): 34,
    ("iid", "FedAvg E=5"): 20,
    ("non-iid", "FedSGD"): 483,
    ("non-iid", "FedAvg E=1"): 350,
    ("non-iid", "FedAvg E=5"): 229,
}
# Factor-2 grids around each setting's best rate in trial runs; a best rate at a grid's edge
# is flagged in the output (`lr_at_grid_edge`). E=5 stops at 0.4: at 0.8 a trial (IID, seed 0)
# swung between 15% and 68% test accuracy for 12 rounds, and such runs cost 200 s each.
LR_GRID = {
    "FedSGD": (0.5, 1.0, 2.0, 4.0),
    "FedAvg E=1": (0.2, 0.4, 0.8),
    "FedAvg E=5": (0.1, 0.2, 0.4),
}


def emit(**fields: Any) -> dict:
    line = {
        "bench": "fedavg_table",
        "machine": f"{platform.machine()} {os.cpu_count()} cpu",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        **fields,
    }
    print(json.dumps(line), flush=True)
    return line


def prepare_data(*, root: str) -> str:
    """Digits through ingest + shard (one train shard, 5% val, 15% test); returns the manifest URI."""
    raw = steps.ingest(spec=DataSpec(source="builtin://digits"), root=root)
    spec = ShardSpec(n_shards=1, val_fraction=0.05, test_fraction=0.15, seed=0)
    return preprocess_and_shard(
        raw_uri=raw.uri, source_sha256=raw.sha256, label="label", spec=spec, root=root
    )


def load_data(manifest_uri: str, *, augment: bool) -> dict[str, np.ndarray]:
    """Train rows (with their one-pixel shifts if ``augment``) and test rows, standardised."""
    manifest = load_manifest(manifest_uri)
    parts = [read_shard(s) for s in manifest.train]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    x_test, y_test = read_shard(manifest.test)
    if augment:
        mean, std = np.asarray(manifest.mean), np.asarray(manifest.std)
        raw, y = shift_augment((x * std + mean).reshape(-1, 8, 8), y)
        # Restandardise with the augmented training rows' statistics: shifted pixels leave the range
        # the shard's scaler saw (a border pixel with std 0.05 would become a feature near 300).
        mean, std = raw.mean(axis=0), raw.std(axis=0)
        std = np.where(std < 1e-6, 1.0, std)
        x = ((raw - mean) / std).astype(np.float32)
        x_test = ((x_test * np.asarray(manifest.std) + np.asarray(manifest.mean) - mean) / std).astype(
            np.float32
        )
    return {"x": x, "y": y, "x_test": x_test, "y_test": y_test}


def shift_augment(images: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each 8x8 raw training image plus its 8 one-pixel shifts (zero fill): 9x the rows, flattened."""
    out = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            shifted = np.zeros_like(images)
            dst = (slice(max(dy, 0), 8 + min(dy, 0)), slice(max(dx, 0), 8 + min(dx, 0)))
            src = (slice(max(-dy, 0), 8 + min(-dy, 0)), slice(max(-dx, 0), 8 + min(-dx, 0)))
            shifted[:, dst[0], dst[1]] = images[:, src[0], src[1]]
            out.append(shifted)
    return np.concatenate(out).reshape(-1, 64), np.tile(y, 9)


def fed_spec(*, setting: Setting, partition: str, lr: float, rounds: int) -> FedAvgSpec:
    return FedAvgSpec(
        clients=CLIENTS,
        fraction=FRACTION,
        local_epochs=setting.local_epochs,
        local_batch_size=setting.local_batch_size,
        rounds=rounds,
        client_lr=lr,
        **PARTITIONS[partition],
    )


def simulate(
    data: dict[str, np.ndarray],
    *,
    setting: Setting,
    partition: str,
    lr: float,
    seed: int,
    rounds: int,
    target: float | None,
) -> dict[str, Any]:
    """One FedAvg run, clients in-process, with the functions run_fedavg uses; stops at ``target``."""
    torch.set_num_threads(1)
    spec = fed_spec(setting=setting, partition=partition, lr=lr, rounds=rounds)
    parts = federated_math.partition(
        data["y"], clients=CLIENTS, scheme=spec.partition, shards_per_client=2, seed=seed
    )
    owned = [(data["x"][p], data["y"][p]) for p in parts]
    test = (data["x_test"], data["y_test"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same init as run_fedavg
        model = build_model(spec=MODEL, in_features=64, n_classes=10)
    t0 = time.perf_counter()
    run = fedavg.federated_training(
        spec=spec,
        init=fedavg_client.get_weights(model),
        seed=seed,
        # one model object serves every simulated client: they run one after another
        run_clients=lambda w, ctx: [
            fedavg_client.local_update(model=model, weights=w, data=owned[k], spec=spec, client_id=k, ctx=ctx)
            for k in ctx.participants
        ],
        evaluate=lambda w: fedavg_client.evaluate_weights(model=model, weights=w, data=test),
        stop=lambda m: (target is not None and m.val_accuracy >= target) or _diverged(m),
    )
    curve = [round(m.val_accuracy, 4) for m in run.history]
    return {
        "partition": partition,
        "setting": setting.name,
        "E": setting.local_epochs,
        "B": setting.local_batch_size or "inf",
        "lr": lr,
        "seed": seed,
        "rounds_to_target": rounds_to(curve, target) if target is not None else None,
        **{f"rounds_to_{t}": rounds_to(curve, t) for t in ALSO_TARGETS},
        "rounds_run": len(curve),
        "local_steps": run.steps,
        "wall_s": round(time.perf_counter() - t0, 3),
        "curve": curve,
        "weights_sha": _sha(run.weights),
    }


def _diverged(m: EpochMetrics) -> bool:
    # Only a non-finite loss ends a run early: FedSGD often sits near chance for 10-20 rounds
    # before it climbs, so a low accuracy says nothing about whether a run gets there.
    return not math.isfinite(m.train_loss)


def rounds_to(curve: list[float], target: float) -> int | None:
    """First round (1-based) whose test accuracy reaches ``target``; None if none did."""
    return next((i + 1 for i, acc in enumerate(curve) if acc >= target), None)


def _sha(weights: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(weights, dtype=np.float32).tobytes()).hexdigest()[:16]


def median_rounds(runs: list[dict]) -> float:
    """Median rounds to target over seeds; a seed that never reached it counts as infinitely many."""
    return statistics.median(r["rounds_to_target"] or float("inf") for r in runs)


def _median_or_none(rounds: list[int | None]) -> float | None:
    m = statistics.median(r or float("inf") for r in rounds)
    return None if m == float("inf") else m


def best_line(runs: list[dict], *, partition: str, setting: Setting, base: float | None) -> dict:
    """The learning rate with the fewest median rounds for one (partition, setting)."""
    mine = sorted(
        (r for r in runs if r["partition"] == partition and r["setting"] == setting.name),
        key=lambda r: r["seed"],
    )
    by_lr = {lr: [r for r in mine if r["lr"] == lr] for lr in sorted({r["lr"] for r in mine})}
    lr = min(by_lr, key=lambda k: (median_rounds(by_lr[k]), k))
    rounds = median_rounds(by_lr[lr])
    finite = rounds != float("inf")
    paper = PAPER[(partition, setting.name)]
    return {
        "kind": "best",
        "partition": partition,
        "setting": setting.name,
        "E": setting.local_epochs,
        "B": setting.local_batch_size or "inf",
        "lr": lr,
        "lr_at_grid_edge": len(by_lr) > 1 and lr in (min(by_lr), max(by_lr)),
        "rounds": rounds if finite else None,
        "rounds_per_seed": [r["rounds_to_target"] for r in by_lr[lr]],
        # the same runs' first crossings of lower targets (their own best rate may differ)
        **{f"rounds_to_{t}": _median_or_none([r[f"rounds_to_{t}"] for r in by_lr[lr]]) for t in ALSO_TARGETS},
        "median_rounds_per_lr": {
            str(k): _median_or_none([r["rounds_to_target"] for r in v]) for k, v in by_lr.items()
        },
        "speedup_vs_fedsgd": round(base / rounds, 2) if finite and base not in (None, float("inf")) else None,
        "paper_rounds": paper,
        "paper_speedup": round(PAPER[(partition, "FedSGD")] / paper, 1),
        "curve": by_lr[lr][0]["curve"],
    }


def best_lines(runs: list[dict], *, target: float) -> list[dict]:
    """Per partition, each setting's best line; FedSGD's rounds are the speedup's base."""
    out = []
    for partition in PARTITIONS:
        base = None
        for setting in SETTINGS:
            line = best_line(runs, partition=partition, setting=setting, base=base)
            if setting.name == "FedSGD":
                base = line["rounds"] or float("inf")
            out.append({**line, "target": target})
    return out


def dask_path_line(client: Client, *, manifest_uri: str, workdir: Path, lr: float, rounds: int) -> dict:
    """FedAvg E=5, IID, plain rows: ``run_fedavg`` (a Dask task per client) vs the same rounds in-process."""
    setting = SETTINGS[2]
    job = TrainJob(
        manifest_uri=manifest_uri,
        model=MODEL,
        train=TrainSpec(
            strategy="fedavg", seed=0, fedavg=fed_spec(setting=setting, partition="iid", lr=lr, rounds=rounds)
        ),
        output_uri=str(workdir / "fedavg.safetensors"),
        checkpoint_uri=str(workdir / "ckpt"),
    )
    t0 = time.perf_counter()
    result = fedavg.run_fedavg(client=client, job=job)[0]
    dask_s = time.perf_counter() - t0
    plain = load_data(manifest_uri, augment=False)  # run_fedavg reads the manifest's rows as they are
    local = client.submit(
        simulate,
        plain,
        setting=setting,
        partition="iid",
        lr=lr,
        seed=0,
        rounds=rounds,
        target=None,
        pure=False,
    ).result()
    model = build_model(spec=MODEL, in_features=64, n_classes=10)
    model.load_state_dict(st_load(Path(job.output_uri).read_bytes()))
    return {
        "kind": "dask_path",
        "setting": setting.name,
        "partition": "iid",
        "augmented": False,
        "lr": lr,
        "rounds": rounds,
        "dask_ms_per_round": round(1000 * dask_s / rounds, 1),
        "inprocess_ms_per_round": round(1000 * local["wall_s"] / rounds, 1),
        "dask_over_inprocess": round(dask_s / local["wall_s"], 2),
        "same_weights": _sha(fedavg_client.get_weights(model)) == local["weights_sha"],
        "local_steps": result.steps,
    }


def plot(lines: list[dict]) -> Path:
    """Test accuracy per round at each setting's best learning rate (seed 0), IID and non-IID."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = [x for x in lines if x.get("kind") == "best"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharey=True)
    for ax, partition in zip(axes, PARTITIONS, strict=True):
        for x in (b for b in best if b["partition"] == partition):
            rounds = f"{x['rounds']:g} rounds (median)" if x["rounds"] else "not reached"
            label = f"{x['setting']}, lr {x['lr']:g}: {rounds}"
            ax.plot(range(1, len(x["curve"]) + 1), x["curve"], label=label)
        ax.axhline(best[0]["target"], color="#888", lw=0.8, ls="--")
        ax.set(
            xscale="log", xlabel="communication round", title=f"digits x9 shifts, {partition}: K=100, C=0.1"
        )
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2))  # below: curves fill the axes
    axes[0].set(ylabel="test accuracy (seed 0, to target)", ylim=(0.4, 1.0))
    fig.tight_layout()
    fig.savefig(PNG, dpi=100)
    plt.close(fig)
    return PNG


def run_grid(
    client: Client, data: dict, *, seeds: tuple[int, ...], grid: dict, rounds: int, target: float
) -> list:
    """Every (partition, setting, lr, seed) as one Dask task; prints a line per finished run."""
    shared = client.scatter(data, broadcast=True)
    futures = [
        client.submit(
            simulate,
            shared,
            setting=s,
            partition=p,
            lr=lr,
            seed=seed,
            rounds=rounds,
            target=target,
            pure=False,
        )
        for p in PARTITIONS
        for s in SETTINGS
        for lr in grid[s.name]
        for seed in seeds
    ]
    runs = []
    for fut in as_completed(futures):
        run = fut.result()
        runs.append(run)
        emit(kind="run", **{k: v for k, v in run.items() if k != "curve"})
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 learning rates each")
    parser.add_argument("--plot-only", action="store_true", help=f"redraw {PNG.name} from {DATA.name}")
    parser.add_argument("--target", type=float, default=0.95, help="test accuracy to reach")
    parser.add_argument("--max-rounds", type=int, default=300, help="a run stops here if short of target")
    parser.add_argument("--no-augment", action="store_true", help="the 1,437 plain training rows only")
    args = parser.parse_args()
    if args.plot_only:
        print(plot([json.loads(x) for x in DATA.read_text().splitlines() if x.strip()]))
        return
    seeds = (0,) if args.quick else (0, 1, 2)
    grid = {k: v[1:3] if args.quick else v for k, v in LR_GRID.items()}
    t0 = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="mms-bench-fedavg-") as tmp,
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        manifest_uri = prepare_data(root=tmp)
        data = load_data(manifest_uri, augment=not args.no_augment)
        emit(
            kind="config",
            target=args.target,
            clients=CLIENTS,
            fraction=FRACTION,
            seeds=list(seeds),
            lr_grid=grid,
            max_rounds=args.max_rounds,
            model="mlp 200x200 (2NN), no dropout",
            train_rows=len(data["y"]),
            test_rows=len(data["y_test"]),
            augmented=not args.no_augment,
            quick=args.quick,
            torch=torch.__version__,
        )
        runs = run_grid(client, data, seeds=seeds, grid=grid, rounds=args.max_rounds, target=args.target)
        best = [emit(**b) for b in best_lines(runs, target=args.target)]
        e5 = next(b for b in best if b["partition"] == "iid" and b["setting"] == "FedAvg E=5")
        emit(**dask_path_line(client, manifest_uri=manifest_uri, workdir=Path(tmp), lr=e5["lr"], rounds=20))
    emit(kind="done", wall_s=round(time.perf_counter() - t0, 1))
    if not args.quick:
        print(f"wrote {plot(best)}", file=sys.stderr)  # stdout stays JSON lines


if __name__ == "__main__":
    main()
