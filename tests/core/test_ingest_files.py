"""Ingest of file sources on Dask workers: listing, schema from metadata, hashes, CSV copies.

A real LocalCluster of worker processes and, for s3://, a real moto server on 127.0.0.1.
"""

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from distributed import Client, LocalCluster

from mms_core.data.ingest import DataSpec
from mms_core.data.ingest_files import ingest_files, load_table
from mms_core.errors import DataError
from tests.core.test_ingest_s3 import BUCKET, s3, s3_server  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def client():
    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0"
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        # Workers' s3fs instances keep sessions to the moto server open: without this a worker
        # outlives the nanny's 4 s grace and is killed.
        client.run(s3fs.S3FileSystem.clear_instance_cache)
        client.close()
        cluster.close()


def _frame(n: int, *, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {"f0": rng.normal(size=n), "f1": rng.integers(0, 100, size=n), "label": np.arange(n) % 3}
    )


def _parquet(path: Path, df: pd.DataFrame, *, row_group_size: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=row_group_size)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ingest(client, source, root, *, block: int = 1 << 20, **spec):
    spec = DataSpec(source=str(source), **spec)
    return ingest_files(client=client, spec=spec, root=str(root), csv_block_bytes=block)


def _error(client, source, root, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        _ingest(client, source, root, **kwargs)
    return str(info.value)


def test_parquet_directory_is_listed_in_place(client, tmp_path):
    data, root = tmp_path / "data", tmp_path / "root"
    paths = [
        _parquet(data / "b.parquet", _frame(25, seed=1)),
        _parquet(data / "a.parquet", _frame(12, seed=2), row_group_size=5),
        _parquet(data / "sub" / "c.pq", _frame(7, seed=3)),
    ]
    (data / "_SUCCESS").write_bytes(b"")
    (data / "README.txt").write_text("not a table")
    _parquet(data / ".hidden.parquet", _frame(3))
    _parquet(data / "_temporary" / "x.parquet", _frame(3))

    res = _ingest(client, data, root)

    assert res.layout == "files" and res.rows == 44 and res.label == "label"
    assert res.features == ["f0", "f1"]
    table = load_table(res.uri)
    ordered = sorted(paths)  # a.parquet, b.parquet, sub/c.pq
    assert [f.uri for f in table.files] == [p.as_uri() for p in ordered]
    assert [f.row_groups for f in table.files] == [[5, 5, 2], [10, 10, 5], [7]]
    assert [f.sha256 for f in table.files] == [_sha(p) for p in ordered]
    assert [f.size for f in table.files] == [p.stat().st_size for p in ordered]
    assert res.sha256 == table.sha256 and res.uri.endswith(f"raw/{table.sha256[:16]}.table.json")
    assert not list(root.rglob("*.parquet"))  # read in place: nothing copied
    listing = Path(res.uri).read_bytes()

    again = _ingest(client, data, root)

    assert again == res and Path(res.uri).read_bytes() == listing


def test_single_file_glob_and_uri_forms(client, tmp_path):
    data, root = tmp_path / "data", tmp_path / "root"
    one = _parquet(data / "part-0.parquet", _frame(20))
    _parquet(data / "part-1.parquet", _frame(10, seed=5))

    single = _ingest(client, one, root)
    as_uri = _ingest(client, one.as_uri(), root)
    globbed = _ingest(client, f"{data}/part-*.parquet", root)
    globbed_uri = _ingest(client, f"{data.as_uri()}/part-*.parquet", root)

    assert single.rows == 20 and single == as_uri
    assert globbed.rows == 30 and globbed == globbed_uri
    assert [f.uri for f in load_table(globbed.uri).files] == [
        one.as_uri(),
        (data / "part-1.parquet").as_uri(),
    ]


def test_csv_files_are_converted_once_to_parquet(client, tmp_path):
    data, root = tmp_path / "data", tmp_path / "root"
    data.mkdir()
    df = _frame(300)
    text = df.to_csv(index=False).splitlines()
    f0, _, label = text[251].split(",")
    text[251] = f"{f0},2.5,{label}"  # integers in the first blocks, a fraction later: widened to float64
    (data / "t-0.csv").write_text("\n".join(text) + "\n")
    with gzip.open(data / "t-1.csv.gz", "wt") as f:
        _frame(40, seed=9).to_csv(f, index=False)
    sources = [data / "t-0.csv", data / "t-1.csv.gz"]

    res = _ingest(client, f"{data}/t-*.csv*", root, block=1024)

    table = load_table(res.uri)
    assert res.rows == 340 and res.features == ["f0", "f1"]
    assert [f.sha256 for f in table.files] == [_sha(p) for p in sources]  # the CSV's own bytes
    for entry, source in zip(table.files, sources, strict=True):
        copy = Path(entry.uri.removeprefix("file://"))
        assert copy == root / "raw" / "csv" / f"{entry.sha256[:16]}.parquet"
        assert entry.size == copy.stat().st_size and sum(entry.row_groups) == entry.rows
        back, expected = pd.read_parquet(copy), pd.read_csv(source)
        pd.testing.assert_frame_equal(back, expected, check_dtype=False)
        assert back["label"].dtype == np.int64  # the label keeps its inferred type
    assert len(table.files[0].row_groups) > 1  # one row group per CSV block
    assert pq.read_schema(Path(table.files[0].uri.removeprefix("file://"))).field("f1").type == pa.float64()
    mtimes = [p.stat().st_mtime_ns for p in (root / "raw" / "csv").iterdir()]

    assert _ingest(client, f"{data}/t-*.csv*", root, block=1024) == res
    assert [p.stat().st_mtime_ns for p in (root / "raw" / "csv").iterdir()] == mtimes  # not converted again


def test_csv_column_empty_in_its_first_block_becomes_float(client, tmp_path):
    rows = ["f0,f1,label", *[f"{i},{i if i >= 200 else ''},{i % 2}" for i in range(300)]]
    csv = tmp_path / "sparse.csv"
    csv.write_text("\n".join(rows) + "\n")

    res = _ingest(client, csv, tmp_path / "root", block=1024)

    back = pd.read_parquet(load_table(res.uri).files[0].uri)
    assert back["f1"].dtype == np.float64 and back["f1"].isna().sum() == 200
    assert back["f1"].iloc[200:].tolist() == list(range(200, 300)) and back["f0"].dtype == np.int64


def test_schema_errors_name_the_column_file_and_fix(client, tmp_path):
    root = tmp_path / "root"
    ok = _parquet(tmp_path / "ok" / "t.parquet", _frame(10))
    msg = _error(client, ok, root, label="y")
    assert "'y' not found" in msg and "f0, f1, label" in msg and "set data.label" in msg

    for name, column in {"text": ["a", "b"], "flag": [True, False]}.items():
        bad = _parquet(
            tmp_path / name / "t.parquet", pd.DataFrame({"f0": [1.0, 2.0], name: column, "label": [0, 1]})
        )
        msg = _error(client, bad, root)
        assert str(bad) in msg and f"feature column {name!r} is not numeric" in msg
        assert "encode it as numbers" in msg

    reserved = _parquet(tmp_path / "r" / "t.parquet", _frame(4).rename(columns={"f1": "__mms_label__"}))
    assert "'__mms_label__' is reserved" in _error(client, reserved, root)

    mixed = tmp_path / "mismatch"
    _parquet(mixed / "a.parquet", _frame(5))
    odd = _parquet(mixed / "b.parquet", _frame(5).rename(columns={"f1": "g1"}))
    msg = _error(client, mixed, root)
    assert str(odd) in msg and "'f1'" in msg and "'g1'" in msg and "same columns" in msg


def test_unreadable_and_empty_files(client, tmp_path):
    root, data = tmp_path / "root", tmp_path / "data"
    _parquet(data / "a.parquet", _frame(30))
    whole = _parquet(data / "b.parquet", _frame(30)).read_bytes()
    (data / "b.parquet").write_bytes(whole[: len(whole) // 2])  # truncated: no footer
    msg = _error(client, data, root)
    assert str(data / "b.parquet") in msg and "not a readable Parquet file" in msg

    empty = _parquet(tmp_path / "empty" / "t.parquet", _frame(0))
    assert "hold no rows" in _error(client, empty, root)

    rows = ["f0,f1,label", *[f"{i * 0.5},{i},{i % 2}" for i in range(3000)]]
    rows[2700] = "1.0,n/a-here,0"
    csv = tmp_path / "deep.csv"
    csv.write_text("\n".join(rows) + "\n")
    msg = _error(client, csv, root, block=4096)  # the bad row lies many blocks in
    assert str(csv) in msg and "column 'f1' (a feature)" in msg and "n/a-here" in msg
    assert "after data row" in msg and "fix or drop that row" in msg


def test_listing_errors(client, tmp_path):
    root = tmp_path / "root"
    msg = _error(client, f"{tmp_path}/nothing-*.parquet", root)
    assert "nothing-*.parquet" in msg and "no file matches" in msg and "check data.source" in msg
    assert "no such file or directory" in _error(client, tmp_path / "absent.parquet", root)

    mixed = tmp_path / "mixed"
    _parquet(mixed / "a.parquet", _frame(5))
    _frame(5).to_csv(mixed / "b.csv", index=False)
    msg = _error(client, mixed, root)
    assert "mixes CSV" in msg and "b.csv" in msg and "a.parquet" in msg

    (tmp_path / "t.json").write_text("{}")
    assert "use .csv, .csv.gz or .parquet" in _error(client, tmp_path / "t.json", root)


def test_s3_source_reads_on_workers_with_spec_credentials(client, s3, tmp_path):  # noqa: F811
    url, s3_client = s3
    for i in range(2):
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pandas(_frame(15, seed=i), preserve_index=False), buf, row_group_size=8)
        s3_client.put_object(Bucket=BUCKET, Key=f"in/part-{i}.parquet", Body=buf.getvalue().to_pybytes())
    s3_client.put_object(Bucket=BUCKET, Key="csv/t.csv", Body=_frame(12).to_csv(index=False).encode())
    options = {"endpoint_url": url, "key": "testing", "secret": "s3cr3t-never-shown"}

    res = _ingest(client, f"s3://{BUCKET}/in/", tmp_path / "root", storage_options=options)
    csv = _ingest(client, f"s3://{BUCKET}/csv/*.csv", tmp_path / "root", storage_options=options)

    table = load_table(res.uri)
    assert res.rows == 30 and [f.row_groups for f in table.files] == [[8, 7], [8, 7]]
    assert [f.uri for f in table.files] == [f"s3://{BUCKET}/in/part-{i}.parquet" for i in range(2)]
    copy = load_table(csv.uri).files[0].uri  # the CSV's Parquet copy lies under the (local) root
    assert csv.rows == 12 and copy.startswith(str(tmp_path / "root" / "raw" / "csv"))
    for uri in (res.uri, csv.uri):
        text = Path(uri).read_text()
        assert "s3cr3t" not in text and json.loads(text)["source"].startswith(f"s3://{BUCKET}/")

    msg = _error(
        client, f"s3://user:pa55word@{BUCKET}/in/*.parquet", tmp_path / "root", storage_options=options
    )
    assert "pa55word" not in msg and "s3cr3t" not in msg and "check the URI and storage options" in msg
