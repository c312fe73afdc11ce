"""fsspec helpers shared by every step: URIs in, atomic writes out, checksums."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs


def fs_and_path(uri: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """Split a URI into (filesystem, path). Plain paths are local files."""
    return url_to_fs(uri, **storage_options)


def join(root: str, *parts: str) -> str:
    """Join URI parts with '/', refusing parts that would climb out of ``root``."""
    for part in parts:
        if part.startswith("/") or ".." in part.split("/"):
            raise ValueError(f"unsafe path component {part!r}: must be relative without '..'")
    return "/".join([root.rstrip("/"), *[p.strip("/") for p in parts]])


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_hash(obj: Any) -> str:
    """Stable sha256 of a JSON-able object (sorted keys, no whitespace)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def read_bytes(uri: str) -> bytes:
    fs, path = fs_and_path(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def sha256_file(uri: str, *, chunk_bytes: int = 1 << 22, **storage_options: Any) -> str:
    """sha256 of a file read in ``chunk_bytes`` pieces: the file need not fit in memory."""
    fs, path = fs_and_path(uri, **storage_options)
    digest = hashlib.sha256()
    with fs.open(path, "rb", block_size=chunk_bytes) as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def is_local(uri: str) -> bool:
    """True for a path on this machine's file system (``file://`` or a plain path)."""
    fs, _ = fs_and_path(uri)
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return bool({"file", "local"} & set(protocols))


def exists(uri: str) -> bool:
    fs, path = fs_and_path(uri)
    return fs.exists(path)


def remove_tree(uri: str) -> None:
    """Delete ``uri`` and everything under it; nothing there is not an error (idempotent)."""
    fs, path = fs_and_path(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def write_bytes_atomic(uri: str, data: bytes) -> str:
    """Write ``data`` to ``uri`` so a reader never sees a partial file.

    Local and POSIX-like filesystems: temp file beside the target, then rename. Object stores
    (s3://) have no rename, but a single PUT is already atomic, so we write directly there.
    Returns the sha256 of ``data``.
    """
    fs, path = fs_and_path(uri)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if _is_object_store(fs):
        with fs.open(path, "wb") as f:
            f.write(data)
    else:
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
        try:
            with fs.open(tmp, "wb") as f:
                f.write(data)
            fs.mv(tmp, path)
        finally:
            if fs.exists(tmp):
                fs.rm(tmp)
    return sha256_bytes(data)


def write_json_atomic(uri: str, obj: Any) -> str:
    return write_bytes_atomic(uri, json.dumps(obj, indent=2, sort_keys=True).encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def _is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return any(p in {"s3", "s3a", "gs", "gcs", "abfs", "az", "memory"} for p in protocols)
