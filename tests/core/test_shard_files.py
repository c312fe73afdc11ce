"""mms_core.data.shard_files: a file source split, scaled and sharded on Dask workers, block by
block; the result does not depend on how the source's rows are cut into files and row groups."""

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from distributed import Client, LocalCluster

from mms_core.data.ingest import DataSpec
from mms_core.data.ingest_files import ingest_files, load_table
from mms_core.data.shard import (
    PARTS_MANIFEST_VERSION,
    ShardSpec,
    iter_shard,
    load_manifest,
    read_shard,
    shard_key,
    shards_for_rank,
)
from mms_core.data.shard_files import default_block_rows, shard_files
from mms_core.data.table import SourceFile, SourceTable
from mms_core.errors import DataError

FEATURES = ["id", "a", "b", "k"]  # id: the row index, to recognise rows after scaling; k: constant
N_ROWS = 1500
SPEC = ShardSpec(n_shards=3, seed=11, block_rows=128)  # 12 blocks


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


def _columns(n: int, *, first: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "id": np.arange(first, first + n, dtype=np.float64),
        "a": rng.normal(100.0, 5.0, n).astype(np.float32),
        "b": rng.integers(-50, 50, n).astype(np.int32),  # integer features are read as float32
        "k": np.full(n, 5.0, dtype=np.float32),
        "label": np.array([7, 3, 5])[rng.integers(0, 3, n)],
    }


def _write(path: Path, cols: dict[str, np.ndarray], *, row_groups: list[int]) -> Path:
    """``cols`` as a Parquet file with row groups of the given sizes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = pa.table(cols)
    with pq.ParquetWriter(path, data.schema) as writer:
        start = 0
        for n in row_groups:
            writer.write_table(data.slice(start, n))
            start += n
    return path


def _table(paths: list[Path], *, features: list[str] = FEATURES) -> SourceTable:
    def file(p: Path) -> SourceFile:
        meta = pq.ParquetFile(p).metadata
        rgs = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        sha = hashlib.sha256(p.read_bytes()).hexdigest()
        return SourceFile(uri=str(p), size=p.stat().st_size, sha256=sha, row_groups=rgs)

    return SourceTable(
        source=str(paths[0].parent), label="label", features=features, files=[file(p) for p in paths]
    )


def _shard(client, table: SourceTable, root: Path, spec: ShardSpec = SPEC) -> str:
    return shard_files(client=client, table=table, source_sha256=table.sha256, spec=spec, root=str(root))


@pytest.fixture(scope="module")
def source() -> dict[str, np.ndarray]:
    return _columns(N_ROWS, seed=3)


@pytest.fixture(scope="module")
def tables(tmp_path_factory, source) -> dict[str, SourceTable]:
    """The same rows as (a) one file of one row group, (b) three files with uneven row groups."""
    d = tmp_path_factory.mktemp("sources")
    cut = {k: (v[:400], v[400:1100], v[1100:]) for k, v in source.items()}
    many = [
        _write(d / "many" / "part-0.parquet", {k: v[0] for k, v in cut.items()}, row_groups=[150, 150, 100]),
        _write(d / "many" / "part-1.parquet", {k: v[1] for k, v in cut.items()}, row_groups=[700]),
        _write(d / "many" / "part-2.parquet", {k: v[2] for k, v in cut.items()}, row_groups=[37, 263, 1, 99]),
    ]
    return {"one": _table([_write(d / "one.parquet", source, row_groups=[N_ROWS])]), "many": _table(many)}


@pytest.fixture(scope="module")
def sharded(client, tables, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("shards")
    return {name: _shard(client, t, root) for name, t in tables.items()}


def _relative(uri: str, out: str) -> str:
    assert uri.startswith(out + "/")
    return uri[len(out) + 1 :]


def _comparable(manifest_uri: str) -> dict:
    """The manifest without what names the source (key, sha, locations); part names kept relative."""
    m = load_manifest(manifest_uri).model_dump(mode="json")
    out = manifest_uri.rsplit("/", 1)[0]
    for info in [*m["train"], m["val"], m["test"]]:
        info["uri"] = _relative(info["uri"], out)
        for part in info["parts"]:
            part["uri"] = _relative(part["uri"], out)
    return {k: v for k, v in m.items() if k not in {"key", "source_sha256"}}


def test_partitioning_does_not_change_the_shards(sharded, tables):
    one, many = _comparable(sharded["one"]), _comparable(sharded["many"])
    assert one == many
    assert one["version"] == PARTS_MANIFEST_VERSION and one["classes"] == [3, 5, 7]
    assert {len(info["parts"]) for info in [*one["train"], one["val"], one["test"]]} == {12}
    m = load_manifest(sharded["many"])
    assert m.key == shard_key(
        source_sha256=tables["many"].sha256, label="label", spec=SPEC, version=PARTS_MANIFEST_VERSION
    )
    assert sharded["many"].endswith(f"/shards/{m.key[:16]}/manifest.json")


def test_shards_hold_every_row_once_scaled_with_train_statistics(sharded, source):
    m = load_manifest(sharded["many"])
    mean, std = np.array(m.mean, np.float32), np.array(m.std, np.float32)
    x_all = np.column_stack([source[f].astype(np.float32) for f in FEATURES])
    ids = {}
    for name, info in [*((f"train{i}", t) for i, t in enumerate(m.train)), ("val", m.val), ("test", m.test)]:
        x, y = read_shard(info)
        assert sum(len(px) for px, _ in iter_shard(info)) == info.rows == len(x)
        row = np.rint(x[:, 0] * std[0] + mean[0]).astype(int)
        assert (np.diff(row) > 0).all()  # rows in global order
        np.testing.assert_array_equal(x, (x_all[row] - mean) / std)  # float32, as the workers compute it
        assert (np.array(m.classes)[y] == source["label"][row]).all()
        ids[name] = row
    every = np.concatenate(list(ids.values()))
    assert len(every) == N_ROWS and set(every.tolist()) == set(range(N_ROWS))

    train = np.concatenate([ids[f"train{i}"] for i in range(3)])
    expected = x_all[train].astype(np.float64)
    np.testing.assert_allclose(m.mean, expected.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(m.std[:3], expected.std(axis=0)[:3], rtol=1e-6)
    assert m.std[3] == 1.0  # a constant column stays unscaled
    assert abs(len(ids["val"]) / N_ROWS - 0.15) < 0.05 and abs(len(ids["test"]) / N_ROWS - 0.15) < 0.05
    assert shards_for_rank(m, rank=1, world_size=2) == [m.train[1]]
    assert shards_for_rank(m, rank=0, world_size=2) == [m.train[0], m.train[2]]


def test_split_is_deterministic_per_seed(client, tables, sharded, tmp_path):
    again = _shard(client, tables["many"], tmp_path / "again")
    assert _comparable(again) == _comparable(sharded["many"])
    other = load_manifest(
        _shard(client, tables["many"], tmp_path / "other", SPEC.model_copy(update={"seed": 12}))
    )
    first = load_manifest(sharded["many"])
    assert read_shard(other.val)[0][:, 0].tolist() != read_shard(first.val)[0][:, 0].tolist()


def test_rerun_reuses_the_manifest(client, tables, sharded):
    uri = sharded["one"]
    part = load_manifest(uri).val.parts[0].uri
    before = os.stat(uri).st_mtime_ns, os.stat(part).st_mtime_ns
    time.sleep(0.01)
    assert _shard(client, tables["one"], Path(uri).parents[2]) == uri
    assert (os.stat(uri).st_mtime_ns, os.stat(part).st_mtime_ns) == before


def test_standardize_off_keeps_values(client, tables, source, tmp_path):
    m = load_manifest(
        _shard(client, tables["many"], tmp_path, SPEC.model_copy(update={"standardize": False}))
    )
    assert m.mean == [0.0] * 4 and m.std == [1.0] * 4
    x, _ = read_shard(m.test)
    np.testing.assert_array_equal(x[:, 2], source["b"][x[:, 0].astype(int)].astype(np.float32))


@pytest.mark.parametrize(
    ("column", "expected"),
    [
        ("a", "feature 'a' has 2 NaN or infinite"),
        ("b", "feature 'b' has 2 null"),
        ("label", "label column 'label' has 2 null"),
    ],
)
def test_bad_values_name_file_and_row_group(client, tmp_path, column, expected):
    bad = np.isin(np.arange(200), [110, 130])  # in row group 1 of the second file
    paths = []
    for i in range(3):
        cols = _columns(200, first=200 * i, seed=i)
        if i == 1 and column == "a":
            cols["a"][bad] = [np.nan, np.inf]
        elif i == 1:
            cols[column] = pa.array(cols[column], mask=bad)
        paths.append(_write(tmp_path / "src" / f"part-{i}.parquet", cols, row_groups=[100, 100]))
    with pytest.raises(DataError, match=expected) as err:
        _shard(client, _table(paths), tmp_path / "out")
    assert f"{paths[1]}, row group 1:" in str(err.value) and "re-run" in str(err.value)
    assert not list((tmp_path / "out").rglob("manifest.json"))


def test_too_few_rows_or_classes(client, tmp_path):
    few = _table([_write(tmp_path / "few.parquet", _columns(40), row_groups=[40])])
    with pytest.raises(DataError, match="without rows.*lower preprocess.n_shards"):
        _shard(client, few, tmp_path / "out", ShardSpec(n_shards=30, block_rows=16))
    cols = _columns(40) | {"label": np.zeros(40, dtype=np.int64)}
    single = _table([_write(tmp_path / "single.parquet", cols, row_groups=[40])])
    with pytest.raises(DataError, match="single class"):
        _shard(client, single, tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*.parquet"))  # both fail before pass 2 writes


def test_file_changed_since_ingest(client, tmp_path):
    path = _write(tmp_path / "src.parquet", _columns(300), row_groups=[300])
    table = _table([path])
    _write(path, _columns(200), row_groups=[200])
    with pytest.raises(DataError, match="row group 0: 200 rows.*run ingest again"):
        _shard(client, table, tmp_path / "out")


def test_default_block_rows():
    assert default_block_rows(n_features=20) == 2**19  # 64 MiB / 84 B = 798915 rows
    assert default_block_rows(n_features=1) == 2**20 and default_block_rows(n_features=10**6) == 2**10


def _peak_rss_mib(dask_worker) -> float:
    """The worker's highest RSS its system monitor sampled (every 0.5 s)."""
    return max(dask_worker.monitor.quantities["memory"]) / 2**20


def _write_random(path: Path, *, features: list[str], rows: int, seed: int) -> Path:
    """``rows`` random rows written chunk by chunk: the test process never holds the table either."""
    rng, chunk = np.random.default_rng(seed), 2**16
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([*(pa.field(f, pa.float32()) for f in features), pa.field("label", pa.int64())])
    with pq.ParquetWriter(path, schema, compression="none", use_dictionary=False) as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            x = rng.random((len(features), n), dtype=np.float32)
            writer.write_table(pa.table([*x, rng.integers(0, 2, n)], schema=schema))
    return path


@pytest.mark.slow
def test_table_larger_than_worker_memory(tmp_path):
    """~390 MiB of float32 ingested and sharded by workers limited to 350 MiB each, and nothing is
    restarted (the flow's two data steps: ingest_files, then shard_files on its listing).

    Why not lower: a worker holds ~140 MiB of libraries (pyarrow, pandas, distributed) before any
    data and ~185 MiB once it has run a task, and Dask pauses a worker at 80% of its limit; a
    150 MiB limit stalls on the libraries alone. The bound that matters: a worker's peak RSS stays
    ~40 MiB above that baseline (one row group + one block), far below the table's size.
    """
    features = [f"f{i}" for i in range(32)]
    for i in range(2):
        _write_random(tmp_path / "src" / f"part-{i}.parquet", features=features, rows=1_500_000, seed=i)
    limit_mib = 350
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",
            memory_limit=f"{limit_mib}MiB",
        ) as cluster,
        Client(cluster) as c,
    ):
        pids = c.run(os.getpid)
        ingested = ingest_files(client=c, spec=DataSpec(source=str(tmp_path / "src")), root=str(tmp_path))
        table = load_table(ingested.uri)
        spec = ShardSpec(n_shards=2, block_rows=2**16)
        uri = shard_files(client=c, table=table, source_sha256=ingested.sha256, spec=spec, root=str(tmp_path))
        peaks = c.run(_peak_rss_mib)
        assert c.run(os.getpid) == pids  # no worker was killed for memory and replaced
    assert table.rows * (len(features) + 2) * 4 / 2**20 > limit_mib
    assert max(peaks.values()) < 0.8 * limit_mib, peaks  # never paused
    m = load_manifest(uri)
    assert sum(i.rows for i in [*m.train, m.val, m.test]) == table.rows
