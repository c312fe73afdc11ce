"""mms_core.storage: safe joins, atomic writes, stable hashes."""

import hashlib
import json

import pytest

from mms_core import storage


@pytest.mark.parametrize(
    "part",
    ["..", "../etc", "a/../../b", "a/..", "/abs", "/etc/passwd"],
)
def test_join_refuses_parent_and_absolute_parts(part):
    with pytest.raises(ValueError, match="unsafe path component") as info:
        storage.join("/root/dir", "ok", part)
    assert repr(part) in str(info.value)
    assert "relative without '..'" in str(info.value)


def test_join_accepts_relative_parts_and_normalises_slashes():
    assert storage.join("/root/dir/", "raw", "x/y.parquet") == "/root/dir/raw/x/y.parquet"
    assert storage.join("s3://bucket/prefix", "shards/", "m.json") == "s3://bucket/prefix/shards/m.json"
    # dots inside a name are not a parent reference
    assert storage.join("/r", "a..b", "..hidden") == "/r/a..b/..hidden"


def test_write_bytes_atomic_returns_sha256_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "deep" / "nested" / "blob.bin"
    data = b"\x00\x01hello mms\xff" * 100

    sha = storage.write_bytes_atomic(str(target), data)

    assert sha == hashlib.sha256(data).hexdigest()
    assert target.read_bytes() == data
    assert sorted(p.name for p in target.parent.iterdir()) == ["blob.bin"]


def test_write_bytes_atomic_overwrites_and_accepts_file_uri(tmp_path):
    target = tmp_path / "blob.bin"
    storage.write_bytes_atomic(target.as_uri(), b"first version")
    sha = storage.write_bytes_atomic(target.as_uri(), b"second")

    assert target.read_bytes() == b"second"
    assert sha == hashlib.sha256(b"second").hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["blob.bin"]
    assert storage.exists(target.as_uri())
    assert storage.read_bytes(str(target)) == b"second"


def test_json_round_trip_and_exists(tmp_path):
    uri = str(tmp_path / "m" / "manifest.json")
    assert not storage.exists(uri)
    obj = {"b": [1, 2.5, "x"], "a": {"nested": True}}

    sha = storage.write_json_atomic(uri, obj)

    assert storage.exists(uri)
    assert storage.read_json(uri) == obj
    assert sha == hashlib.sha256((tmp_path / "m" / "manifest.json").read_bytes()).hexdigest()


def test_canonical_hash_ignores_dict_key_order_but_not_values():
    a = {"x": 1, "y": {"p": [1, 2], "q": "s"}}
    b = {"y": {"q": "s", "p": [1, 2]}, "x": 1}
    assert storage.canonical_hash(a) == storage.canonical_hash(b)
    assert (
        storage.canonical_hash(a)
        == hashlib.sha256(json.dumps(a, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    )

    assert storage.canonical_hash({**a, "x": 2}) != storage.canonical_hash(a)
    # list order is meaningful
    assert storage.canonical_hash({"y": [2, 1]}) != storage.canonical_hash({"y": [1, 2]})
