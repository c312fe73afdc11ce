"""Compression on digits: int8 quantization and pruning against the full model, in one run.

    python -m bench.compress [--epochs N] [--repeats R]

The digits model of ``examples/digits.yaml`` (MLP 256x128, its data split and training settings)
is trained once, in this process, on one rank (``mms run`` trains it with DDP on 2 workers, so
its accuracy differs a little); then every variant goes through
:func:`mms_core.steps.compress_trained`, the pipeline's own compress step: int8 per-row Linear
weights (the spec's default) with 0, 30 (``examples/digits.yaml``) and 50% magnitude pruning, and
30% pruning without quantization (stored as fp32: pruning alone shrinks nothing on disk).

Per variant, one JSON line (stdout): bytes on disk full / compressed and their ratio, test
accuracy of both and the drop (the spec's budget: 1 point), and CPU latency of one forward pass,
full vs compressed, at 256 rows (the step's own figure, median of 30) and at 1 row (median of
``--repeats``), both on one torch thread (what a serving replica uses). Last, a ``summary`` line
for the spec's variant with the goals (size >= 3x, accuracy within 1 point).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mms_core import steps, storage
from mms_core.compress import CompressSpec, latency_ms, load_quantized
from mms_core.data.shard import load_manifest, preprocess_and_shard, read_shard
from mms_core.models import build_model
from mms_core.spec import load_spec
from mms_core.training.loop import train_rank
from mms_core.training.spec import TrainJob

BENCH = "compress"
REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "examples" / "digits.yaml"
# (label, quantize, prune_amount); "int8 + prune 30%" is examples/digits.yaml's compress section.
VARIANTS = (
    ("int8", True, 0.0),
    ("int8 + prune 30%", True, 0.3),
    ("int8 + prune 50%", True, 0.5),
    ("fp32, prune 30%", False, 0.3),
)
SPEC_VARIANT = "int8 + prune 30%"
SIZE_GOAL, ACCURACY_BUDGET = 3.0, 0.01


def train(*, root: str, epochs: int | None) -> tuple[str, str, Any]:
    """Ingest, shard and train the digits spec on one rank; (manifest URI, weights URI, spec)."""
    spec = load_spec(SPEC)
    if epochs:
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"epochs": epochs})})
    raw = steps.ingest(spec=spec.data, root=root)
    manifest_uri = preprocess_and_shard(
        raw_uri=raw.uri, source_sha256=raw.sha256, label=spec.data.label, spec=spec.preprocess, root=root
    )
    train_spec = spec.training.model_copy(update={"world_size": 1, "checkpoint_every": 0, "resume": False})
    job = TrainJob(
        manifest_uri=manifest_uri,
        model=spec.model,
        train=train_spec,
        output_uri=storage.join(root, "model.safetensors"),
        checkpoint_uri=storage.join(root, "checkpoints"),
    )
    train_rank(job=job, rank=0, world_size=1)
    return manifest_uri, job.output_uri, spec


def one_row_latency(
    *, manifest_uri: str, spec: Any, weights_uri: str, compressed_uri: str, quantize: bool, repeats: int
) -> dict:
    """Median latency (ms) of a 1-row forward pass, full model vs the variant's stored bytes."""
    manifest = load_manifest(manifest_uri)
    x = read_shard(manifest.test)[0][:1].astype(np.float32)
    full = steps.load_trained(manifest_uri=manifest_uri, model=spec.model, weights_uri=weights_uri)
    if quantize:  # as the compress step loads it: int8 bytes, torch's dynamic int8 Linear kernels
        small = build_model(
            spec=spec.model, in_features=len(manifest.features), n_classes=len(manifest.classes)
        )
        small = load_quantized(model=small, data=storage.read_bytes(compressed_uri))
    else:
        small = steps.load_trained(manifest_uri=manifest_uri, model=spec.model, weights_uri=compressed_uri)
    return {
        "full": round(latency_ms(model=full, x=x, repeats=repeats), 4),
        "compressed": round(latency_ms(model=small, x=x, repeats=repeats), 4),
    }


def variant_line(r: Any, *, label: str, quantize: bool, amount: float, spec: Any, latency_1: dict) -> dict:
    """One variant's figures from the compress step's result (and the 1-row latencies)."""
    return {
        "kind": "variant",
        "variant": label,
        "quantize": quantize,
        "prune_amount": amount,
        "model": spec.model.model_dump(mode="json"),
        "epochs": spec.training.epochs,
        "full_bytes": r.full_bytes,
        "compressed_bytes": r.compressed_bytes,
        "size_ratio": round(r.size_ratio, 3),
        "full_accuracy": round(r.full_accuracy, 4),
        "compressed_accuracy": round(r.compressed_accuracy, 4),
        "accuracy_drop": round(r.accuracy_drop, 4),
        "latency_ms_256": {
            "full": round(r.full_latency_ms, 4),
            "compressed": round(r.compressed_latency_ms, 4),
        },
        "latency_ms_1": latency_1,
    }


def summary_line(lines: list[dict]) -> dict:
    """The spec's variant against the goals: >= 3x smaller, accuracy within 1 point."""
    main = next(x for x in lines if x["variant"] == SPEC_VARIANT)
    return {
        "kind": "summary",
        "variant": SPEC_VARIANT,
        "size_ratio": main["size_ratio"],
        "accuracy_drop": main["accuracy_drop"],
        "size_goal": SIZE_GOAL,
        "accuracy_budget": ACCURACY_BUDGET,
        "meets_goal": main["size_ratio"] >= SIZE_GOAL and main["accuracy_drop"] <= ACCURACY_BUDGET,
    }


def run(*, epochs: int | None, repeats: int) -> list[dict]:
    """Train once, compress every variant; the JSON-ready lines."""
    torch.set_num_threads(1)
    stamp = {
        "bench": BENCH,
        "machine": f"{platform.platform()} nproc={len(os.sched_getaffinity(0))}",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    lines = []
    with tempfile.TemporaryDirectory(prefix="mms-bench-compress-") as tmp:
        manifest_uri, weights_uri, spec = train(root=tmp, epochs=epochs)
        for label, quantize, amount in VARIANTS:
            cspec = CompressSpec(quantize=quantize, prune_amount=amount)
            r = steps.compress_trained(
                manifest_uri=manifest_uri, model=spec.model, weights_uri=weights_uri, spec=cspec
            )
            b1 = one_row_latency(
                manifest_uri=manifest_uri,
                spec=spec,
                weights_uri=weights_uri,
                compressed_uri=r.weights_uri,
                quantize=quantize,
                repeats=repeats,
            )
            line = variant_line(r, label=label, quantize=quantize, amount=amount, spec=spec, latency_1=b1)
            lines.append(stamp | line)
    return [*lines, stamp | summary_line(lines)]


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: JSON lines on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="Training epochs (default: the spec's, 30).")
    parser.add_argument(
        "--repeats", type=int, default=300, help="Timed 1-row passes per model (default: %(default)s)."
    )
    args = parser.parse_args(argv)
    for line in run(epochs=args.epochs, repeats=args.repeats):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
