"""Shard a file source on Dask workers in bounded memory (manifest v2: shards as directories
of parts).

A SourceTable's rows have a global index g (files in order, row groups in order). The split
hashes g with the seed, and parts are cut at fixed global row ranges (blocks), so neither the
split nor the shards' bytes depend on how the rows are cut into files and row groups.

Two passes, one task per group of consecutive blocks. Pass 1 reads and checks the rows and
computes, per block, the train rows' moments, each shard's row count and the distinct labels; a
tree of small tasks merges them. Pass 2 reads again, scales, maps labels to class indices and
writes each block's rows of each shard as one part, from the worker straight to storage. The
driver holds only the merged statistics and per-part metadata; a worker, one decoded row group
and one block. The manifest is written last: its presence means every part is complete.
"""

from __future__ import annotations

import bisect
import io
from dataclasses import dataclass

import distributed
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mms_core import storage
from mms_core.data.blocks import Block, BlockReader
from mms_core.data.shard import (
    LABEL_COLUMN,
    PARTS_MANIFEST_VERSION,
    Manifest,
    PartInfo,
    ShardInfo,
    ShardSpec,
    shard_key,
)
from mms_core.data.table import SourceTable, pieces
from mms_core.errors import DataError
from mms_core.secrets import redact_url

_BLOCK_BYTES = 64 * 2**20  # a derived block is ~64 MiB of float32 features + label
_MIN_BLOCK_ROWS, _MAX_BLOCK_ROWS = 2**10, 2**20
_FAN_IN = 8  # partials merged per reduction task
_MASK64 = 2**64 - 1


def default_block_rows(*, n_features: int) -> int:
    """Rows per block when ShardSpec.block_rows is None: a power of two near 64 MiB of float32.

    Args:
        n_features: Number of feature columns (the label is counted on top).

    Returns:
        2**floor(log2(64 MiB / (4 * (n_features + 1)))), clamped to [2**10, 2**20].
    """
    rows = _BLOCK_BYTES // (4 * (n_features + 1))
    return min(max(1 << max(rows.bit_length() - 1, 0), _MIN_BLOCK_ROWS), _MAX_BLOCK_ROWS)


def shard_files(
    *,
    client: distributed.Client,
    table: SourceTable,
    source_sha256: str,
    spec: ShardSpec,
    root: str,
    storage_options: dict[str, str] | None = None,
) -> str:
    """Split, scale and shard a file source on the cluster; returns the manifest URI.

    Idempotent: if the manifest for the same key exists, it is returned untouched.

    Args:
        client: Client of the cluster whose workers read the source and write the parts.
        table: The source's Parquet files in order (ingest's listing).
        source_sha256: Content address of the source (part of the shards' key).
        spec: How to split, scale and shard; ``block_rows`` sets the rows per part.
        root: Storage root; shards go to ``<root>/shards/<key[:16]>/``.
        storage_options: fsspec options for reading the source files (credentials); the parts are
            written with the storage root's own settings.

    Returns:
        URI of the manifest (version PARTS_MANIFEST_VERSION).

    Raises:
        DataError: A non-finite or null feature, a null label, a non-numeric or missing column,
            fewer than two classes, or a split that leaves a shard, val or test without rows.
    """
    key = shard_key(source_sha256=source_sha256, label=table.label, spec=spec, version=PARTS_MANIFEST_VERSION)
    out = storage.join(root, "shards", key[:16])
    manifest_uri = storage.join(out, "manifest.json")
    if storage.exists(manifest_uri):
        return manifest_uri  # reuse; parts are checksummed where they are read (see shard.py)

    source = redact_url(table.source)
    if LABEL_COLUMN in table.features:
        raise DataError(f"{source}: column name {LABEL_COLUMN!r} is reserved by MMS; rename that column")
    if table.rows == 0:
        raise DataError(f"{source}: the table has no rows; point data.source at files with data")
    job = _Job(
        features=list(table.features), label=table.label, spec=spec, out=out, options=storage_options or {}
    )
    groups = _plan(table, block_rows=spec.block_rows or default_block_rows(n_features=len(table.features)))
    classes, mean, std, infos = _two_passes(client, job, groups, source=source, rows=table.rows)
    manifest = Manifest(
        version=PARTS_MANIFEST_VERSION,
        key=key,
        source_sha256=source_sha256,
        label=table.label,
        features=job.features,
        classes=classes,
        spec=spec,
        mean=mean.astype(float).tolist(),
        std=std.astype(float).tolist(),
        train=infos[: spec.n_shards],
        val=infos[spec.n_shards],
        test=infos[spec.n_shards + 1],
    )
    storage.write_json_atomic(manifest_uri, manifest.model_dump(mode="json"))
    return manifest_uri


def _two_passes(
    client: distributed.Client, job: _Job, groups: list[list[Block]], *, source: str, rows: int
) -> tuple[list[int | str], np.ndarray, np.ndarray, list[ShardInfo]]:
    """Fit (pass 1), check the split, write the parts (pass 2); a failure cancels what is left."""
    futures: list[distributed.Future] = []
    try:
        job_future = client.scatter(job, hash=False)  # once, not in every task (long feature lists)
        futures.append(job_future)
        stats = _fit(client, job_future, groups, futures).result()
        classes = _classes(stats, source=source, label=job.label)
        _check_counts(stats.counts, source=source, rows=rows, spec=job.spec)
        mean, std = _scaler(stats, spec=job.spec, n_features=len(job.features))
        written = [client.submit(_write_task, job_future, g, mean, std, classes, pure=False) for g in groups]
        futures += written
        parts = [p for batch in client.gather(written) for p in batch]
    except BaseException:
        client.cancel(futures)  # leave no work behind on the shared cluster
        raise
    return classes, mean, std, _shard_infos(parts, job=job, counts=stats.counts, source=source)


@dataclass(frozen=True)
class _Job:
    """What every task needs, scattered once (the feature list can be long)."""

    features: list[str]
    label: str
    spec: ShardSpec
    out: str
    options: dict[str, str]


@dataclass(frozen=True)
class _Stats:
    """Partial statistics of some blocks: moments of the train rows (float64), rows per split
    code (train shards, val, test) and the distinct labels."""

    n: int
    mean: np.ndarray
    m2: np.ndarray
    counts: np.ndarray
    labels: frozenset


def _plan(table: SourceTable, *, block_rows: int) -> list[list[Block]]:
    """The table's blocks, grouped into tasks of consecutive blocks."""
    cut: dict[int, list[tuple[str, int, int, int]]] = {}
    for piece in pieces(table, start=0, stop=table.rows):
        uri, g, pos = table.files[piece.file].uri, piece.first_row, piece.start
        while pos < piece.stop:
            b = g // block_rows
            take = min(piece.stop - pos, (b + 1) * block_rows - g)
            cut.setdefault(b, []).append((uri, piece.row_group, pos, pos + take))
            g, pos = g + take, pos + take
    blocks = [Block(index=b, first_row=b * block_rows, pieces=tuple(cut[b])) for b in sorted(cut)]
    # A task covers about one row group: a row group is decoded once per task that needs it, so
    # this reads the source about once, without making one task of a table of small row groups.
    n_groups = sum(len(f.row_groups) for f in table.files)
    per_task = max(1, round(table.rows / n_groups / block_rows))
    return [blocks[i : i + per_task] for i in range(0, len(blocks), per_task)]


def _split_codes(spec: ShardSpec, *, first_row: int, rows: int) -> np.ndarray:
    """Split code of global rows [first_row, first_row + rows): 0..n_shards-1 a train shard,
    n_shards val, n_shards+1 test. A hash of the row index and seed only (uint64, wrapping)."""
    seed = _splitmix64(np.array([spec.seed & _MASK64], dtype=np.uint64))
    h = _splitmix64(np.arange(first_row, first_row + rows, dtype=np.uint64) ^ seed)
    u = (h >> np.uint64(11)).astype(np.float64) * 2.0**-53  # uniform in [0, 1), 53 bits
    codes = (_splitmix64(h) % np.uint64(spec.n_shards)).astype(np.int64)
    codes[u < spec.test_fraction + spec.val_fraction] = spec.n_shards
    codes[u < spec.test_fraction] = spec.n_shards + 1
    return codes


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _fit(
    client: distributed.Client, job: distributed.Future, groups: list[list[Block]], futures: list
) -> distributed.Future:
    """Pass 1, reduced to one _Stats future.

    The tree has a fixed shape over block indices (aligned runs of _FAN_IN blocks, then of nodes),
    and each block's partial depends only on its rows, so the float64 sums, and the statistics,
    do not depend on how blocks are grouped into tasks. A fan-in of 8 rather than pairs: an
    eighth of the tasks for the same few-KiB partials, still never gathered on the driver.
    """
    tasks = [client.submit(_stats_task, job, g, pure=False) for g in groups]
    futures += tasks
    firsts = [g[0].index for g in groups]
    n_blocks = groups[-1][-1].index + 1
    nodes = []
    for lo in range(0, n_blocks, _FAN_IN):
        hi = min(lo + _FAN_IN, n_blocks)
        a, b = bisect.bisect_right(firsts, lo) - 1, bisect.bisect_left(firsts, hi)
        nodes.append(client.submit(_fold_blocks, lo, hi, *tasks[a:b], pure=False))
    futures += nodes
    while len(nodes) > 1:
        nodes = [
            client.submit(_fold, *nodes[i : i + _FAN_IN], pure=False) for i in range(0, len(nodes), _FAN_IN)
        ]
        futures += nodes
    return nodes[0]


def _fold_blocks(lo: int, hi: int, *task_results: list[tuple[int, _Stats]]) -> _Stats:
    """Merge the partials of blocks [lo, hi), in block order."""
    partials = sorted((b, s) for result in task_results for b, s in result if lo <= b < hi)
    return _fold(*(s for _, s in partials))


def _fold(a: _Stats, *rest: _Stats) -> _Stats:
    """Merge partials left to right: Chan et al.'s parallel merge of count, mean and M2."""
    for b in rest:
        n = a.n + b.n
        mean, m2 = (b.mean, b.m2) if a.n == 0 else (a.mean, a.m2)
        if a.n and b.n:
            delta = b.mean - a.mean
            mean, m2 = a.mean + delta * (b.n / n), a.m2 + b.m2 + delta**2 * (a.n * b.n / n)
        a = _Stats(n=n, mean=mean, m2=m2, counts=a.counts + b.counts, labels=a.labels | b.labels)
    return a


def _stats_task(job: _Job, blocks: list[Block]) -> list[tuple[int, _Stats]]:
    """Pass 1 on the worker: check every row group read; one _Stats per block."""
    spec, out = job.spec, []
    with _reader(job, check=True) as reader:
        for block in blocks:
            x, labels = reader.block(block)
            codes = _split_codes(spec, first_row=block.first_row, rows=len(x))
            n, mean, m2 = _moments(x, train=codes < spec.n_shards)
            distinct = frozenset(v for piece in labels for v in pc.unique(piece).to_pylist())
            counts = np.bincount(codes, minlength=spec.n_shards + 2)
            out.append((block.index, _Stats(n=n, mean=mean, m2=m2, counts=counts, labels=distinct)))
    return out


def _moments(x: np.ndarray, *, train: np.ndarray, chunk: int = 2**14) -> tuple[int, np.ndarray, np.ndarray]:
    """Count, mean and M2 of the train rows in float64, without a float64 copy of the block: a
    masked reduction for the mean, row chunks for M2. Reductions along axis 0 add row after row,
    so equal blocks give bit-equal results wherever their rows came from."""
    n = int(np.count_nonzero(train))
    if n == 0:
        return 0, np.zeros(x.shape[1]), np.zeros(x.shape[1])
    mean = x.sum(axis=0, dtype=np.float64, where=train[:, None]) / n
    m2 = np.zeros(x.shape[1])
    for i in range(0, len(x), chunk):
        m2 += ((x[i : i + chunk] - mean) ** 2).sum(axis=0, where=train[i : i + chunk, None])
    return n, mean, m2


def _write_task(
    job: _Job, blocks: list[Block], mean: np.ndarray, std: np.ndarray, classes: list
) -> list[tuple[int, int, str, int, str]]:
    """Pass 2 on the worker: per block, scale, map labels and write one part per shard that has
    rows; returns (block, split code, uri, rows, sha256) per part."""
    spec, value_set, written = job.spec, pa.array(classes), []
    with _reader(job, check=False) as reader:
        for block in blocks:
            x, labels = reader.block(block)
            if spec.standardize:
                x -= mean  # in place: the block is a fresh copy, and no second one is needed
                x /= std
            y = np.concatenate([_class_indices(piece, value_set) for piece in labels])
            codes = _split_codes(spec, first_row=block.first_row, rows=len(x))
            for code in np.unique(codes).tolist():
                sel = codes == code
                name = _shard_name(code, spec.n_shards)
                uri = storage.join(job.out, name, f"part-{block.index:06d}.parquet")
                sha = storage.write_bytes_atomic(uri, _part_bytes(x[sel], y[sel], job.features))
                written.append((block.index, code, uri, int(sel.sum()), sha))
    return written


def _class_indices(labels: pa.ChunkedArray, value_set: pa.Array) -> np.ndarray:
    if labels.type != value_set.type:
        labels = labels.cast(value_set.type)
    idx = pc.index_in(labels, value_set=value_set)
    if idx.null_count:
        raise DataError("the source changed while it was being sharded (a label unseen in pass 1); re-run")
    return idx.to_numpy().astype(np.int64)


def _part_bytes(x: np.ndarray, y: np.ndarray, features: list[str]) -> bytes:
    """One part: the features (float32) + LABEL_COLUMN (int64), no pandas metadata."""
    cols = np.ascontiguousarray(x.T)  # one contiguous row per column: zero-copy into Arrow
    part = pa.Table.from_arrays([*(pa.array(c) for c in cols), pa.array(y)], names=[*features, LABEL_COLUMN])
    buf = io.BytesIO()
    # A dictionary that outgrows 16 KiB (~4k distinct float32) falls back to plain encoding early:
    # continuous features were ~10x slower to write and ~40% larger with the 1 MiB default, while
    # low-cardinality columns (pixels, one-hot, labels) keep their small dictionaries.
    pq.write_table(part, buf, dictionary_pagesize_limit=2**14)
    return buf.getvalue()


def _shard_name(code: int, n_shards: int) -> str:
    return f"train-{code:05d}" if code < n_shards else ("val" if code == n_shards else "test")


def _reader(job: _Job, *, check: bool) -> BlockReader:
    """The job's block reader: pass 1 checks the values, pass 2 reads the same rows unchecked."""
    return BlockReader(features=job.features, label=job.label, options=job.options, check=check)


def _classes(stats: _Stats, *, source: str, label: str) -> list[int | str]:
    try:
        classes = sorted(stats.labels)
    except TypeError:
        raise DataError(f"{source}: label {label!r} mixes types across files; give it one type") from None
    if len(classes) < 2:
        raise DataError(f"{source}: label {label!r} has a single class {classes}; need at least two")
    return classes


def _check_counts(counts: np.ndarray, *, source: str, rows: int, spec: ShardSpec) -> None:
    """Fail before pass 2 writes anything if a train shard, val or test would get no rows."""
    empty = [_shard_name(code, spec.n_shards) for code in np.flatnonzero(counts == 0).tolist()]
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DataError(
            f"{source}: the split of {rows} rows leaves {shown} without rows (n_shards={spec.n_shards}, "
            f"val_fraction={spec.val_fraction}, test_fraction={spec.test_fraction}); lower "
            "preprocess.n_shards, raise preprocess.val_fraction/test_fraction, or use more rows"
        )


def _scaler(stats: _Stats, *, spec: ShardSpec, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Train mean and population std as float32, like the snapshot path (std < 1e-6 -> 1)."""
    if not spec.standardize:
        return np.zeros(n_features, np.float32), np.ones(n_features, np.float32)
    std = np.sqrt(stats.m2 / stats.n).astype(np.float32)
    return stats.mean.astype(np.float32), np.where(std < 1e-6, 1.0, std).astype(np.float32)


def _shard_infos(
    parts: list[tuple[int, int, str, int, str]], *, job: _Job, counts: np.ndarray, source: str
) -> list[ShardInfo]:
    """One ShardInfo per split code (train shards, val, test), parts in block order."""
    n_shards = job.spec.n_shards
    by_code: list[list[PartInfo]] = [[] for _ in range(n_shards + 2)]
    for _, code, uri, rows, sha in sorted(parts):
        by_code[code].append(PartInfo(uri=uri, rows=rows, sha256=sha))
    infos = []
    for code, found in enumerate(by_code):
        rows = sum(p.rows for p in found)
        if rows != counts[code]:  # pass 2 read other rows than pass 1 counted
            raise DataError(f"{source}: the source changed while it was being sharded; re-run")
        sha = storage.canonical_hash([p.sha256 for p in found])
        infos.append(
            ShardInfo(
                uri=storage.join(job.out, _shard_name(code, n_shards)), rows=rows, sha256=sha, parts=found
            )
        )
    return infos
