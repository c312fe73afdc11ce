"""Preprocess and shard: seeded split, standardisation fitted on train only, Parquet shards
and a manifest (row counts, schema, sha256 per shard, split seed, scaler stats).

Token data (a language model's windows, see ingest's builtin://pystdlib) is marked in the
snapshot's metadata; its ids are neither scaled nor remapped (``_features_and_labels``).

Shards are content-addressed: the directory is named by a hash of (input sha, config), so the
same input and config give the same manifest and a re-run reuses what is there.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from mms_core import storage
from mms_core.data.text import TOKEN_VOCAB_ATTR
from mms_core.errors import CorruptShardError, DataError

MANIFEST_VERSION = 1  # the single-file layout of a snapshot
PARTS_MANIFEST_VERSION = 2  # shards as directories of parts (file sources, see shard_files.py)
LABEL_COLUMN = "__mms_label__"  # the label's column inside shards; cannot clash with a user feature


class ShardSpec(BaseModel):
    """How to split, scale and shard."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_shards: int = Field(default=4, ge=1, description="Number of training shards.")
    val_fraction: float = Field(default=0.15, gt=0, lt=1, description="Share of rows for validation.")
    test_fraction: float = Field(default=0.15, gt=0, lt=1, description="Share of rows for the test split.")
    seed: int = Field(default=0, description="Seed of the split shuffle.")
    standardize: bool = Field(default=True, description="Scale features with train mean/std.")
    block_rows: int | None = Field(
        default=None,
        ge=1,
        description="File sources: rows per block, the unit each shard's parts are cut by (None: "
        "derived from the row width, ~64 MiB of float32 a block). Smaller blocks, smaller parts.",
    )

    @model_serializer(mode="wrap")
    def _without_unset_block(self, handler):  # keeps the content address of specs from before the field
        data = handler(self)
        if data.get("block_rows") is None:
            data.pop("block_rows", None)
        return data

    @model_validator(mode="after")
    def _fractions(self) -> ShardSpec:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% of rows for training")
        return self


class PartInfo(BaseModel):
    """One Parquet file of a shard."""

    uri: str
    rows: int
    sha256: str


class ShardInfo(BaseModel):
    """A shard: one Parquet file (``parts`` empty, the snapshot path), or a directory of parts, one
    per block of the source's rows that has rows for this shard (file sources); then ``sha256``
    is the hash of the parts' hashes in order."""

    uri: str
    rows: int
    sha256: str
    parts: list[PartInfo] = Field(default_factory=list)

    @model_serializer(mode="wrap")
    def _without_empty_parts(self, handler):  # single-file manifests read and hash as before
        data = handler(self)
        if not data.get("parts"):
            data.pop("parts", None)
        return data

    def part_list(self) -> list[PartInfo]:
        """The shard's parts in order (a single-file shard is its own one part)."""
        return self.parts or [PartInfo(uri=self.uri, rows=self.rows, sha256=self.sha256)]


class Manifest(BaseModel):
    """Everything a reader needs to trust and use the shards."""

    version: int = MANIFEST_VERSION
    key: str
    source_sha256: str
    label: str
    features: list[str]
    classes: list[int | str]
    spec: ShardSpec
    mean: list[float]
    std: list[float]
    train: list[ShardInfo]
    val: ShardInfo
    test: ShardInfo

    @property
    def hash(self) -> str:
        """Hash of the manifest content: identical input + config -> identical hash."""
        return storage.canonical_hash(self.model_dump(mode="json"))


def shard_key(*, source_sha256: str, label: str, spec: ShardSpec, version: int = MANIFEST_VERSION) -> str:
    """Content address of the shards: the input's, the label, the spec and the layout's version."""
    return storage.canonical_hash(
        {"v": version, "source": source_sha256, "label": label, "spec": spec.model_dump(mode="json")}
    )


def preprocess_and_shard(*, raw_uri: str, source_sha256: str, label: str, spec: ShardSpec, root: str) -> str:
    """Split, scale and shard the snapshot at ``raw_uri``; returns the manifest URI.

    Idempotent: if a verified manifest for the same key exists, it is returned untouched.
    """
    key = shard_key(source_sha256=source_sha256, label=label, spec=spec)
    out = storage.join(root, "shards", key[:16])
    manifest_uri = storage.join(out, "manifest.json")
    if storage.exists(manifest_uri):
        # Reuse. Shards are checksummed where they are read (every rank, evaluation), so a shard
        # corrupted after this point fails the run loudly instead of being silently rebuilt.
        return manifest_uri

    df = pd.read_parquet(io.BytesIO(storage.read_bytes(raw_uri)))
    features = [c for c in df.columns if c != label]
    if LABEL_COLUMN in features:
        raise DataError(f"{raw_uri}: column name {LABEL_COLUMN!r} is reserved by MMS; rename that column")
    x, y, classes = _features_and_labels(df, features=features, label=label, raw_uri=raw_uri)
    scale = spec.standardize and TOKEN_VOCAB_ATTR not in df.attrs

    rng = np.random.default_rng(spec.seed)
    order = rng.permutation(len(df))
    n_test = max(1, round(len(df) * spec.test_fraction))
    n_val = max(1, round(len(df) * spec.val_fraction))
    test_idx, val_idx, train_idx = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    if len(train_idx) < spec.n_shards:
        raise DataError(f"{raw_uri}: {len(train_idx)} training rows cannot fill {spec.n_shards} shards")

    mean = x[train_idx].mean(axis=0) if scale else np.zeros(x.shape[1], np.float32)
    std = x[train_idx].std(axis=0) if scale else np.ones(x.shape[1], np.float32)
    std = np.where(std < 1e-6, 1.0, std).astype(np.float32)  # constant columns: leave unscaled
    xs = (x - mean) / std if scale else x

    def write(name: str, idx: np.ndarray) -> ShardInfo:
        part = pd.DataFrame(xs[idx], columns=features)
        part[LABEL_COLUMN] = y[idx]
        buf = io.BytesIO()
        part.to_parquet(buf, index=False)
        uri = storage.join(out, f"{name}.parquet")
        sha = storage.write_bytes_atomic(uri, buf.getvalue())
        return ShardInfo(uri=uri, rows=len(idx), sha256=sha)

    manifest = Manifest(
        key=key,
        source_sha256=source_sha256,
        label=label,
        features=features,
        classes=classes,
        spec=spec,
        mean=mean.astype(float).tolist(),
        std=std.astype(float).tolist(),
        train=[
            write(f"train-{i:05d}", part) for i, part in enumerate(np.array_split(train_idx, spec.n_shards))
        ],
        val=write("val", val_idx),
        test=write("test", test_idx),
    )
    # The manifest is written last: its presence means every shard it names is complete.
    storage.write_json_atomic(manifest_uri, manifest.model_dump(mode="json"))
    return manifest_uri


def _features_and_labels(
    df: pd.DataFrame, *, features: list[str], label: str, raw_uri: str
) -> tuple[np.ndarray, np.ndarray, list[int | str]]:
    """Features, label indices and the class list.

    Tabular data: labels become indices into the sorted distinct labels. Token data (ingest put
    ``TOKEN_VOCAB_ATTR`` in the table's metadata, e.g. builtin://pystdlib): ids stay as they are
    and the classes are the whole vocabulary, so id ``i`` is class ``i`` for the input tokens and
    for the label alike (a language model reads both), even for ids the data never uses.
    """
    vocab = df.attrs.get(TOKEN_VOCAB_ATTR)
    if vocab is None:
        classes = sorted(df[label].unique().tolist())
        if len(classes) < 2:
            raise DataError(f"{raw_uri}: label {label!r} has a single class {classes}; need at least two")
        y = df[label].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64)
        return df[features].to_numpy(dtype=np.float32), y, classes
    x, y = df[features].to_numpy(dtype=np.int64), df[label].to_numpy(dtype=np.int64)
    if min(x.min(), y.min()) < 0 or max(x.max(), y.max()) >= vocab:
        raise DataError(f"{raw_uri}: token ids must lie in 0..{vocab - 1} (the table's vocabulary)")
    return x.astype(np.int32), y, list(range(int(vocab)))


def load_manifest(uri: str) -> Manifest:
    try:
        return Manifest.model_validate(storage.read_json(uri))
    except FileNotFoundError:
        raise DataError(f"manifest {uri} not found; run the preprocess step first") from None


def verify(manifest: Manifest) -> None:
    """Check every part's checksum, one part in memory at a time; raises CorruptShardError naming
    the first bad one."""
    for info in [*manifest.train, manifest.val, manifest.test]:
        for part in info.part_list():
            read_part(part)


def read_shard(info: ShardInfo) -> tuple[np.ndarray, np.ndarray]:
    """The whole shard in memory (features float32, labels int64), every part's sha256 checked.
    For small shards only: code that may meet a large one iterates ``iter_shard``."""
    parts = [read_part(p) for p in info.part_list()]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def iter_shard(info: ShardInfo) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The shard part by part: memory bounded by one part."""
    for part in info.part_list():
        yield read_part(part)


def read_part(part: PartInfo) -> tuple[np.ndarray, np.ndarray]:
    """Read one part after checking its sha256; returns (features float32, labels int64)."""
    df = pd.read_parquet(io.BytesIO(_checked_bytes(part)))
    y = df.pop(LABEL_COLUMN).to_numpy(dtype=np.int64)
    return df.to_numpy(dtype=np.float32), y


def read_part_labels(part: PartInfo) -> np.ndarray:
    """One part's labels (int64) only, after the same sha256 check: the features are not decoded."""
    df = pd.read_parquet(io.BytesIO(_checked_bytes(part)), columns=[LABEL_COLUMN])
    return df[LABEL_COLUMN].to_numpy(dtype=np.int64)


def _checked_bytes(part: PartInfo) -> bytes:
    try:
        data = storage.read_bytes(part.uri)
    except FileNotFoundError:
        raise CorruptShardError(
            f"shard part {part.uri} is missing; delete its shard directory and re-run to rebuild it"
        ) from None
    actual = storage.sha256_bytes(data)
    if actual != part.sha256:
        raise CorruptShardError(
            f"shard part {part.uri} is corrupt: sha256 {actual[:12]}... does not match the manifest's "
            f"{part.sha256[:12]}...; delete its shard directory and re-run to rebuild it"
        )
    return data


def shards_for_rank(manifest: Manifest, *, rank: int, world_size: int) -> list[ShardInfo]:
    """Round-robin assignment of training shards to ranks (each rank reads only its own)."""
    if len(manifest.train) < world_size:
        raise DataError(
            f"{len(manifest.train)} training shards cannot feed {world_size} workers; "
            f"set preprocess.n_shards >= {world_size}"
        )
    return manifest.train[rank::world_size]
