"""Batch prediction throughput: our Dask path vs a plain single-process PyTorch loop.

    python -m bench.batch_predict [--rows N]

Same Parquet table (synthetic, 64 features, 8 files), same model, same output (Parquet with id +
prediction); two models: ``mlp-1024x1024`` (compute-bound) and ``mlp-default`` (the zoo's
default MLP, which the digits pipeline trains: cheap, so reading and writing dominate).
(a) ``dask``: mms_core.serving.offline.batch on the flow's LocalCluster (2 workers x 1 thread), cluster
start excluded, measured separately; (b) ``plain``: one process, pandas reads the table, torch
(default threads: every core) predicts in 8192-row chunks, pandas writes.
Goal from issue 3: dask/plain >= 1.6 on 2 workers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save as st_save

from mms_core.models import ModelSpec, build_model
from mms_core.packaging import PackageConfig, Predictor

FEATURES = [f"f{i}" for i in range(64)]
MODELS = {
    "mlp-1024x1024": ModelSpec(name="mlp", kwargs={"hidden": [1024, 1024], "dropout": 0.0}),
    "mlp-default": ModelSpec(),
}


def emit(**fields: object) -> None:
    base = {
        "bench": "batch_predict",
        "machine": f"{platform.machine()} {os.cpu_count()} cpu",
        "date": str(date.today()),
    }
    print(json.dumps({**base, **fields}), flush=True)


def make_table(*, root: Path, rows: int) -> str:
    rng = np.random.default_rng(0)
    table = root / "in"
    table.mkdir()
    for i, chunk in enumerate(np.array_split(np.arange(rows), 8)):
        df = pd.DataFrame(rng.standard_normal((len(chunk), 64)).astype(np.float32), columns=FEATURES)
        df.insert(0, "id", chunk)
        df.to_parquet(table / f"part-{i}.parquet", index=False)
    return str(table)


def make_model(spec: ModelSpec) -> tuple[PackageConfig, bytes]:
    torch.manual_seed(0)
    model = build_model(spec=spec, in_features=64, n_classes=10)
    config = PackageConfig(
        format="fp32",
        model=spec,
        features=FEATURES,
        classes=list(range(10)),
        mean=[0.0] * 64,
        std=[1.0] * 64,
    )
    return config, st_save({k: v.contiguous() for k, v in model.state_dict().items()})


def run_plain(*, table: str, config: PackageConfig, weights: bytes, out: Path) -> float:
    t0 = time.perf_counter()
    predictor = Predictor(config=config, weights=weights)
    df = pd.read_parquet(table)
    preds = np.concatenate([predictor.predict(df.iloc[i : i + 8192]) for i in range(0, len(df), 8192)])
    pd.DataFrame({"id": df["id"].to_numpy(), "prediction": preds}).to_parquet(out, index=False)
    return time.perf_counter() - t0


def run_dask(*, client, table: str, config: PackageConfig, weights: bytes, out: Path) -> float:
    from mms_core.serving.offline.batch import predict_table

    t0 = time.perf_counter()
    predict_table(
        client=client,
        config=config,
        weights=weights,
        model_version="bench",
        input_uri=table,
        output_uri=str(out),
        id_column="id",
    )
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    from infra.cluster import dask_client
    from mms_core.config import Settings

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        table = make_table(root=root, rows=args.rows)
        t0 = time.perf_counter()
        with dask_client(Settings(home=root, n_workers=2, threads_per_worker=1, dask_address=None)) as client:
            emit(measure="dask_cluster_start_s", value=round(time.perf_counter() - t0, 2))
            for name, spec in MODELS.items():
                config, weights = make_model(spec)
                compare(client=client, root=root / name, table=table, config=config, weights=weights,
                        model=name, rows=args.rows, reps=args.reps)  # fmt: skip


def compare(
    *, client, root: Path, table: str, config, weights: bytes, model: str, rows: int, reps: int
) -> None:
    root.mkdir()
    times: dict[str, list[float]] = {"plain": [], "dask": []}
    for rep in range(reps):  # alternate, so drift hits both alike
        times["plain"].append(
            run_plain(table=table, config=config, weights=weights, out=root / f"p{rep}.parquet")
        )
        times["dask"].append(
            run_dask(client=client, table=table, config=config, weights=weights, out=root / f"d{rep}")
        )
        for path in ("plain", "dask"):
            emit(model=model, path=path, rep=rep + 1, seconds=round(times[path][-1], 3),
                 rows_per_s=round(rows / times[path][-1]))  # fmt: skip
    med = {k: float(np.median(v)) for k, v in times.items()}
    emit(
        model=model,
        path="dask/plain",
        rows=rows,
        rows_per_s={k: round(rows / v) for k, v in med.items()},
        ratio=round(med["plain"] / med["dask"], 3),
        goal=1.6,
        meets_goal=med["plain"] / med["dask"] >= 1.6,
        torch_threads_plain=torch.get_num_threads(),
    )


if __name__ == "__main__":
    main()
