"""Ingest of a file source (a CSV or Parquet file, a directory or a glob) as Dask work with bounded
memory. The output is a listing of Parquet files (``table.SourceTable``), not a copy of the data.

The flow process lists the files and checks the schema from metadata (Parquet footers; a CSV's
header and first block) before anything heavy runs; it never reads rows. The workers then hash
every file, streaming it in chunks, and convert each CSV file once to Parquet under
``<root>/raw/csv/``, named by the CSV's sha256, so a re-run finds the copy there. Parquet files are
read in place. No process holds a whole file: memory is bounded by a hash chunk or a CSV block.

The workers' jobs (hashing, CSV conversion, and how a CSV's column types are chosen) are in
source_files.py; this module lists and checks. NaN/inf checks belong to sharding, which reads
every row group anyway.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
from distributed import Client

from mms_core import storage
from mms_core.data.ingest import PUBLIC_STORAGE_OPTIONS, DataSpec, IngestResult, fsspec_options
from mms_core.data.shard import LABEL_COLUMN
from mms_core.data.source_files import (
    CSV_BLOCK_BYTES,
    Scan,
    csv_copy,
    csv_probe,
    hash_in_place,
    parquet_footer,
)
from mms_core.data.table import TABLE_VERSION, SourceFile, SourceTable
from mms_core.errors import DataError
from mms_core.secrets import MASK, redact_text, redact_url

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".csv.gz")
_SUPPORTED = "use .csv, .csv.gz or .parquet"
_GLOB_CHARS = re.compile(r"[*?\[]")


def ingest_files(
    *, client: Client, spec: DataSpec, root: str, csv_block_bytes: int = CSV_BLOCK_BYTES
) -> IngestResult:
    """List, check and hash a file source on the Dask workers; write its table listing.

    Args:
        client: Dask client whose workers read the files (and write the CSV copies under ``root``).
        spec: The data spec; ``spec.source`` is a file, a directory or a glob of CSV or Parquet
            files at an fsspec URI, read with ``spec.storage_options``.
        root: Storage root; the listing goes to ``<root>/raw/<sha>.table.json`` and CSV copies
            to ``<root>/raw/csv/``.
        csv_block_bytes: CSV text read at a time; each block becomes one row group of the copy.

    Returns:
        ``IngestResult`` with ``layout="files"``: ``uri`` is the listing (see ``load_table``).

    Raises:
        DataError: no file matches, mixed or unsupported formats, an unreadable file, a missing
            label, a non-numeric feature, columns that differ between files, no rows.
    """
    options = fsspec_options(spec)
    try:
        return _ingest(client, spec, options=options, root=root, block_bytes=csv_block_bytes)
    except DataError as exc:
        # Backends may echo a credential in their own words (not as a URL that redact_text finds).
        raise DataError(_scrub(str(exc), spec=spec, options=options)) from None


def _ingest(
    client: Client, spec: DataSpec, *, options: dict[str, str], root: str, block_bytes: int
) -> IngestResult:
    """List; check the schema from metadata; hash (and convert CSV) on the workers; write the listing."""
    shown = redact_url(spec.source)
    uris, kind = _list_files(spec.source, options)
    if kind == "parquet":
        scans = _gather(client, parquet_footer, uris, options=options)
        features = _check_schemas(scans, label=spec.label)
        scans = _gather(client, hash_in_place, scans, options=options)
    else:
        probes = _gather(client, csv_probe, uris, options=options, block_bytes=block_bytes)
        _check_schemas(probes, label=spec.label)
        scans = _gather(
            client, csv_copy, uris, options=options, root=root, block_bytes=block_bytes, label=spec.label
        )
        features = _check_schemas(scans, label=spec.label)
    files = [
        SourceFile(uri=s.uri, size=s.size, sha256=s.sha256, row_groups=list(s.row_groups)) for s in scans
    ]
    table = SourceTable(source=shown, label=spec.label, features=features, files=files, copied=kind == "csv")
    if table.rows == 0:
        raise DataError(
            f"{shown}: its {len(files)} file(s) hold no rows; point data.source at a non-empty table"
        )
    uri = storage.join(root, "raw", f"{table.sha256[:16]}.table.json")
    listing = table.model_dump(mode="json")
    # Same content address, other locations (the files moved): the newest listing is the one that reads.
    if not storage.exists(uri) or storage.read_json(uri) != listing:
        storage.write_json_atomic(uri, listing)
    return IngestResult(
        uri=uri, sha256=table.sha256, rows=table.rows, features=features, label=spec.label, layout="files"
    )


def load_table(uri: str) -> SourceTable:
    """The table listing ``ingest_files`` wrote at ``uri``.

    Raises:
        DataError: no listing there, or one written by another version of MMS.
    """
    try:
        data = storage.read_json(uri)
    except FileNotFoundError:
        raise DataError(f"table listing {redact_url(uri)} not found; re-run the ingest step") from None
    if data.get("version") != TABLE_VERSION:
        raise DataError(
            f"table listing {redact_url(uri)} has version {data.get('version')}, this MMS reads "
            f"{TABLE_VERSION}; re-run the ingest step"
        )
    return SourceTable.model_validate(data)


# --- listing (flow process: metadata only) -------------------------------------------------------


def _list_files(source: str, options: dict[str, str]) -> tuple[list[str], str]:
    """The source's table files as URIs, sorted by path, and their format ("parquet" or "csv")."""
    shown = redact_url(source)
    try:
        fs, path = storage.fs_and_path(source, **options)
        if _GLOB_CHARS.search(path):
            found = fs.glob(path, detail=True)
            paths = [
                p for p, info in found.items() if info["type"] == "file" and not _hidden(p.rsplit("/")[-1])
            ]
            if not paths:
                raise DataError(f"{shown}: no file matches this pattern; check data.source")
            odd = [p for p in paths if not _format(p)]
            if odd:
                raise DataError(
                    f"{shown}: matches {redact_url(fs.unstrip_protocol(odd[0]))}, an unsupported file type; "
                    f"{_SUPPORTED} (narrow the pattern, e.g. *.parquet)"
                )
        elif fs.isdir(path):
            found = fs.find(path)
            visible = [p for p in found if not _hidden(p[len(path.rstrip("/")) + 1 :])]
            paths = [p for p in visible if _format(p)]
            if not paths:
                names = ", ".join(p.rsplit("/")[-1] for p in sorted(visible)[:5]) or "nothing"
                raise DataError(f"{shown}: no table files in this directory (found: {names}); {_SUPPORTED}")
        elif fs.exists(path):
            if not _format(path):
                raise DataError(f"{shown}: unsupported file type; {_SUPPORTED}")
            paths = [path]
        else:
            raise DataError(f"{shown}: no such file or directory; check data.source")
    except DataError:
        raise
    except Exception as exc:  # fsspec backends raise their own types (botocore's, for s3://)
        raise DataError(
            f"{shown}: cannot list ({redact_text(str(exc))}); check the URI and storage options"
        ) from exc
    paths = sorted(paths)
    formats = {_format(p): p for p in paths}
    if len(formats) > 1:
        raise DataError(
            f"{shown}: mixes CSV ({redact_url(fs.unstrip_protocol(formats['csv']))}) and Parquet "
            f"({redact_url(fs.unstrip_protocol(formats['parquet']))}) files; point data.source at one "
            "format (e.g. a glob ending in *.parquet)"
        )
    return [fs.unstrip_protocol(p) for p in paths], _format(paths[0])


def _format(path: str) -> str:
    name = path.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "csv" if name.endswith(CSV_SUFFIXES) else ""


def _hidden(relative: str) -> bool:
    """Hidden files and the markers and folders Spark/Hive write (_SUCCESS, _metadata,
    _temporary/): what pyarrow's datasets skip too."""
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def _gather(client: Client, fn: Callable[..., Scan], items: list[Any], **kwargs: Any) -> list[Scan]:
    """``fn`` over ``items`` on the workers; raises the first failed file's error, in listing order."""
    # pure=False: a file may have changed since another call with the same arguments.
    scans = client.gather(client.map(fn, items, pure=False, **kwargs))
    for scan in scans:
        if scan.error:
            raise DataError(scan.error)
    return scans


# --- schema checks (flow process) ----------------------------------------------------------------


def _check_schemas(scans: list[Scan], *, label: str) -> list[str]:
    """Check every file's columns against the label and the first file; returns the features."""
    first = scans[0]
    for scan in scans:
        _check_schema(scan, label=label)
        missing = sorted(set(first.schema.names) - set(scan.schema.names))
        extra = sorted(set(scan.schema.names) - set(first.schema.names))
        if missing or extra:
            raise DataError(
                f"{scan.source}: its columns differ from {first.source}'s (missing: {missing}, extra: "
                f"{extra}); every file of a source needs the same columns: fix or exclude this file"
            )
        ours, theirs = scan.schema.field(label).type, first.schema.field(label).type
        if _label_kind(ours) != _label_kind(theirs):
            raise DataError(
                f"{scan.source}: label column {label!r} has type {ours} here but {theirs} in "
                f"{first.source}; give the label one type in every file"
            )
    return [name for name in first.schema.names if name != label]


def _check_schema(scan: Scan, *, label: str) -> None:
    names = scan.schema.names
    if len(set(names)) < len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"{scan.source}: duplicate column names {dup}; give every column its own name")
    if LABEL_COLUMN in names:
        raise DataError(f"{scan.source}: column name {LABEL_COLUMN!r} is reserved by MMS; rename that column")
    if label not in names:
        cols = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        raise DataError(
            f"{scan.source}: label column {label!r} not found (columns: {cols}); "
            "set data.label to the name of the label column"
        )
    if len(names) < 2:
        raise DataError(f"{scan.source}: no feature columns besides the label {label!r}")
    for field in scan.schema:
        if field.name != label and not (pa.types.is_integer(field.type) or pa.types.is_floating(field.type)):
            raise DataError(
                f"{scan.source}: feature column {field.name!r} is not numeric (type {field.type}); "
                "encode it as numbers or drop it before ingest"
            )


def _label_kind(dtype: pa.DataType) -> str:
    """Label types that give comparable classes: any integer width alike, any float alike, text alike."""
    for kind, test in (
        ("integer", pa.types.is_integer),
        ("float", pa.types.is_floating),
        ("text", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
    ):
        if test(dtype):
            return kind
    return str(dtype)


def _scrub(text: str, *, spec: DataSpec, options: dict[str, str]) -> str:
    secrets = [v for k, v in options.items() if k not in PUBLIC_STORAGE_OPTIONS]
    secrets.append(urlsplit(spec.source).password or "")
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:  # shorter strings are no secret and would mask ordinary words
            text = text.replace(secret, MASK)
    return text
