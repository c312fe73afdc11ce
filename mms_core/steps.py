"""Step-level functions: one per pipeline task, so tasks stay thin wrappers.

Each takes URIs and small specs, returns a small pydantic result; bytes stay in storage.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel
from safetensors.torch import load as st_load

from mms_core import registry, storage
from mms_core.compress import CompressSpec, latency_ms, load_quantized, prune_linear, quantized_bytes
from mms_core.data.ingest import DataSpec, IngestResult, fsspec_options, is_builtin, load_source, snapshot
from mms_core.data.shard import (
    MANIFEST_VERSION,
    PARTS_MANIFEST_VERSION,
    ShardSpec,
    iter_shard,
    load_manifest,
    preprocess_and_shard,
    shard_key,
)
from mms_core.evaluate import EvalResult, GateDecision, evaluate_chunks, gate
from mms_core.models import ModelSpec, build_model
from mms_core.models.zoo import resolve_builder
from mms_core.monitoring.reference import save_reference
from mms_core.packaging import PackageConfig
from mms_core.spec import PipelineSpec
from mms_core.training.checkpoint import state_bytes

if TYPE_CHECKING:
    from distributed import Client


class CompressResult(BaseModel):
    weights_uri: str
    full_bytes: int
    compressed_bytes: int
    size_ratio: float
    full_latency_ms: float
    compressed_latency_ms: float
    full_accuracy: float
    compressed_accuracy: float
    accuracy_drop: float
    within_budget: bool


def ingest(*, spec: DataSpec, root: str, client: Client | None = None) -> IngestResult:
    """Check the source and make it readable by URI: with a Dask client, a file source is listed
    and checked on the workers and read in place (see data/ingest_files.py); a built-in dataset
    (or a file source without a client: small data only) becomes a content-addressed Parquet
    snapshot, in memory."""
    if client is not None and not is_builtin(spec.source):
        from mms_core.data.ingest_files import ingest_files  # pyarrow.csv/parquet on demand

        return ingest_files(client=client, spec=spec, root=root)
    return snapshot(df=load_source(spec=spec), label=spec.label, root=root)


def shard_key_of(*, ingested: IngestResult, spec: ShardSpec) -> str:
    """The content address the shards of ``ingested`` will have (a cache key, before any work)."""
    version = PARTS_MANIFEST_VERSION if ingested.layout == "files" else MANIFEST_VERSION
    return shard_key(source_sha256=ingested.sha256, label=ingested.label, spec=spec, version=version)


def shard(
    *,
    ingested: IngestResult,
    spec: ShardSpec,
    root: str,
    client: Client | None = None,
    data: DataSpec | None = None,
) -> str:
    """Split, scale and shard what ingest produced; returns the manifest URI. A snapshot is sharded
    in memory; a file source's table as Dask work, partition by partition on the workers
    (``client`` required; ``data`` gives the storage options to read the source with)."""
    if ingested.layout == "snapshot":
        return preprocess_and_shard(
            raw_uri=ingested.uri, source_sha256=ingested.sha256, label=ingested.label, spec=spec, root=root
        )
    if client is None:
        raise ValueError("a file source's table is sharded on Dask: pass the client")
    from mms_core.data.ingest_files import load_table
    from mms_core.data.shard_files import shard_files

    table = load_table(ingested.uri)
    return shard_files(
        client=client,
        table=table,
        source_sha256=ingested.sha256,
        spec=spec,
        root=root,
        # a CSV source's rows are ingest's copies under the root: the source's credentials don't apply
        storage_options=fsspec_options(data) if data is not None and not table.copied else None,
    )


def check_model(*, spec: ModelSpec) -> None:
    """Resolve the model's builder on the caller's side, so a bad zoo name or import path fails
    before any work. Building it needs the data's sizes; that happens in training."""
    resolve_builder(spec.name)


def load_trained(*, manifest_uri: str, model: ModelSpec, weights_uri: str) -> torch.nn.Module:
    manifest = load_manifest(manifest_uri)
    net = build_model(spec=model, in_features=len(manifest.features), n_classes=len(manifest.classes))
    net.load_state_dict(st_load(storage.read_bytes(weights_uri)))
    return net.eval()


def evaluate_trained(*, manifest_uri: str, model: ModelSpec, weights_uri: str) -> EvalResult:
    """Test-split metrics of trained weights, the test shard read part by part (each part's
    checksum verified)."""
    manifest = load_manifest(manifest_uri)
    net = load_trained(manifest_uri=manifest_uri, model=model, weights_uri=weights_uri)
    if getattr(net, "causal_lm", False) and torch.cuda.is_available():
        net = net.cuda()  # a language model's test split is many tokens: use the GPU if there is one
    return evaluate_chunks(model=net, chunks=iter_shard(manifest.test), n_classes=len(manifest.classes))


def compress_trained(
    *, manifest_uri: str, model: ModelSpec, weights_uri: str, spec: CompressSpec
) -> CompressResult:
    """Prune + int8-quantize, then measure size, latency and accuracy beside the full model."""
    manifest = load_manifest(manifest_uri)
    n_classes = len(manifest.classes)
    full = load_trained(manifest_uri=manifest_uri, model=model, weights_uri=weights_uri)
    full_bytes = len(state_bytes(full))
    pruned = prune_linear(model=copy.deepcopy(full), amount=spec.prune_amount)
    data = quantized_bytes(model=pruned) if spec.quantize else state_bytes(pruned)
    small = build_model(spec=model, in_features=len(manifest.features), n_classes=n_classes)
    small = load_quantized(model=small, data=data) if spec.quantize else pruned
    out_uri = weights_uri.rsplit("/", 1)[0] + "/model-int8.safetensors"
    storage.write_bytes_atomic(out_uri, data)
    batch = next(iter_shard(manifest.test))[0][:256].astype(np.float32)
    full_acc = evaluate_chunks(model=full, chunks=iter_shard(manifest.test), n_classes=n_classes).accuracy
    small_acc = evaluate_chunks(model=small, chunks=iter_shard(manifest.test), n_classes=n_classes).accuracy
    return CompressResult(
        weights_uri=out_uri,
        full_bytes=full_bytes,
        compressed_bytes=len(data),
        size_ratio=full_bytes / len(data),
        full_latency_ms=latency_ms(model=full, x=batch),
        compressed_latency_ms=latency_ms(model=small, x=batch),
        full_accuracy=full_acc,
        compressed_accuracy=small_acc,
        accuracy_drop=full_acc - small_acc,
        within_budget=full_acc - small_acc <= spec.max_accuracy_drop,
    )


class RegisterResult(BaseModel):
    version: str
    alias: str
    reason: str
    compressed_version: str | None


def register_trained(
    *,
    tracking_uri: str,
    run_id: str,
    spec: PipelineSpec,
    manifest_uri: str,
    weights_uri: str,
    evaluation: EvalResult,
    compressed: CompressResult | None,
    lineage: dict[str, str],
) -> RegisterResult:
    """Register the full model (and its int8 sibling), then move the alias the gate decides.

    Idempotent per run: calling it again returns the same versions and registers nothing new.
    """
    manifest = load_manifest(manifest_uri)
    name = spec.registry.model_name
    decision = gate(
        accuracy=evaluation.accuracy,
        spec=spec.evaluate,
        champion_accuracy=registry.champion_accuracy(tracking_uri=tracking_uri, name=name),
    )
    example = pd.DataFrame(
        np.asarray(next(iter_shard(manifest.test))[0][:5]) * manifest.std + manifest.mean,
        columns=manifest.features,
    ).astype(np.float32)
    common = dict(tracking_uri=tracking_uri, run_id=run_id, name=name, example=example)
    if evaluation.perplexity is None:  # a classifier: training statistics for drift monitoring
        save_reference(tracking_uri=tracking_uri, run_id=run_id, manifest=manifest)
    tags = {**lineage, registry.TAG_ACCURACY: f"{evaluation.accuracy:.6f}", "mms.gate": decision.reason}
    version = registry.register_package(
        **common,
        weights=storage.read_bytes(weights_uri),
        tags={**tags, registry.TAG_VARIANT: "fp32"},
        config=PackageConfig.from_manifest(manifest, model=spec.model, format="fp32"),
    )
    compressed_version = None
    if compressed is not None:
        compressed_version = registry.register_package(
            **common,
            weights=storage.read_bytes(compressed.weights_uri),
            config=PackageConfig.from_manifest(manifest, model=spec.model, format="int8"),
            tags={
                **lineage,
                registry.TAG_ACCURACY: f"{compressed.compressed_accuracy:.6f}",
                registry.TAG_VARIANT: "int8",
                "mms.parent_version": version,
            },
        )
    if registry.alias_version(tracking_uri=tracking_uri, name=name, alias="champion") == version:
        # a re-run of the run that made this version: it cannot "beat" itself, and must not lose the alias
        decision = GateDecision(passed=True, alias="champion", reason="this version is already the champion")
    elif registry.alias_version(tracking_uri=tracking_uri, name=name, alias=decision.alias) != version:
        registry.set_alias(tracking_uri=tracking_uri, name=name, alias=decision.alias, version=version)
    return RegisterResult(
        version=version, alias=decision.alias, reason=decision.reason, compressed_version=compressed_version
    )
