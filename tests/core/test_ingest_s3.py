"""Ingest from s3:// against a real moto S3 server on 127.0.0.1 (no network, no mocks)."""

import io
import socket

import boto3
import pytest
import s3fs
from moto.server import ThreadedMotoServer

from mms_core.data.ingest import DataSpec, load_source, snapshot
from mms_core.errors import DataError

BUCKET = "mms-data"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket on the moto server; returns (endpoint_url, boto3 client)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    # s3fs caches filesystem instances (and their listings) per argument set: start each test clean.
    s3fs.S3FileSystem.clear_instance_cache()
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield s3_server, client
    for obj in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    client.delete_bucket(Bucket=BUCKET)
    s3fs.S3FileSystem.clear_instance_cache()


def test_ingest_csv_from_s3(s3, small_df, tmp_path):
    url, client = s3
    client.put_object(Bucket=BUCKET, Key="in/table.csv", Body=small_df.to_csv(index=False).encode())

    spec = DataSpec(source=f"s3://{BUCKET}/in/table.csv", storage_options={"endpoint_url": url})
    df = load_source(spec=spec)

    assert list(df.columns) == ["f0", "f1", "f2", "f3", "label"]
    assert len(df) == 90
    assert df["label"].tolist() == small_df["label"].tolist()

    res = snapshot(df=df, label=spec.label, root=str(tmp_path))
    assert res.rows == 90 and res.features == ["f0", "f1", "f2", "f3"]


def test_ingest_parquet_from_s3(s3, small_df):
    url, client = s3
    buf = io.BytesIO()
    small_df.to_parquet(buf, index=False)
    client.put_object(Bucket=BUCKET, Key="t.parquet", Body=buf.getvalue())

    df = load_source(spec=DataSpec(source=f"s3://{BUCKET}/t.parquet", storage_options={"endpoint_url": url}))

    assert df.shape == (90, 5)
    assert df["f0"].tolist() == small_df["f0"].tolist()


def test_missing_s3_key_is_a_data_error(s3, small_df):
    url, client = s3
    client.put_object(Bucket=BUCKET, Key="present.csv", Body=small_df.to_csv(index=False).encode())

    with pytest.raises(DataError) as info:
        load_source(spec=DataSpec(source=f"s3://{BUCKET}/absent.csv", storage_options={"endpoint_url": url}))
    msg = str(info.value)
    assert f"s3://{BUCKET}/absent.csv" in msg and "no such file" in msg
    assert "check data.source" in msg


def test_label_check_applies_to_s3_sources(s3, small_df):
    url, client = s3
    client.put_object(Bucket=BUCKET, Key="t.csv", Body=small_df.to_csv(index=False).encode())
    with pytest.raises(DataError, match="'y' not found.*set data.label"):
        load_source(
            spec=DataSpec(source=f"s3://{BUCKET}/t.csv", label="y", storage_options={"endpoint_url": url})
        )
