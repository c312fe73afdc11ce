"""Ingest of a file source (a CSV or Parquet file, a directory or a glob) as Dask work with bounded
memory. The output is a listing of Parquet files (``table.SourceTable``), not a copy of the data.

The flow process lists the files and checks the schema from metadata (Parquet footers; a CSV's
header and first block) before anything heavy runs; it never reads rows. The workers then hash
every file, streaming it in chunks, and convert each CSV file once to Parquet under
``<root>/raw/csv/``, named by the CSV's sha256, so a re-run finds the copy there. Parquet files are
read in place. No process holds a whole file: memory is bounded by a hash chunk or a CSV block.

CSV columns keep the type pyarrow infers from the file's first block (int64, float64, string,
bool), widened where a well-formed file would otherwise fail to convert: a column with no value
in the first block is read as float64, and an int64 column that later holds a fraction is read
again as float64. So integer labels stay integers, and the copy depends on the CSV's bytes alone
(not on data.label), as its content-addressed name promises. NaN/inf checks belong to sharding,
which reads every row group anyway.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from distributed import Client

from mms_core import storage
from mms_core.data.ingest import PUBLIC_STORAGE_OPTIONS, DataSpec, IngestResult, fsspec_options
from mms_core.data.shard import LABEL_COLUMN
from mms_core.data.table import TABLE_VERSION, SourceFile, SourceTable
from mms_core.errors import DataError
from mms_core.secrets import MASK, redact_text, redact_url

HASH_CHUNK_BYTES = 4 << 20  # what a worker holds while hashing a file
CSV_BLOCK_BYTES = 8 << 20  # CSV text per block; one block becomes one row group of the copy
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".csv.gz")
_SUPPORTED = "use .csv, .csv.gz or .parquet"
_GLOB_CHARS = re.compile(r"[*?\[]")
_CSV_COLUMN = re.compile(r"In CSV column #(\d+)")
_MAX_WIDENINGS = 256  # an int64 column widened to float64 per re-read; bounded by the column count


@dataclasses.dataclass(frozen=True)
class _Scan:
    """What a worker learned about one source file (metadata only), or why it failed."""

    source: str  # the source file's URI, redacted: the name messages give
    uri: str = ""  # where its Parquet data lies: the file itself, or the CSV's copy
    schema: pa.Schema | None = None
    size: int = 0
    sha256: str = ""
    row_groups: tuple[int, ...] = ()
    error: str = ""


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
        scans = _gather(client, _parquet_footer, uris, options=options)
        features = _check_schemas(scans, label=spec.label)
        scans = _gather(client, _hash_in_place, scans, options=options)
    else:
        probes = _gather(client, _csv_probe, uris, options=options, block_bytes=block_bytes)
        _check_schemas(probes, label=spec.label)
        scans = _gather(
            client, _csv_copy, uris, options=options, root=root, block_bytes=block_bytes, label=spec.label
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


def _gather(client: Client, fn: Callable[..., _Scan], items: list[Any], **kwargs: Any) -> list[_Scan]:
    """``fn`` over ``items`` on the workers; raises the first failed file's error, in listing order."""
    # pure=False: a file may have changed since another call with the same arguments.
    scans = client.gather(client.map(fn, items, pure=False, **kwargs))
    for scan in scans:
        if scan.error:
            raise DataError(scan.error)
    return scans


# --- schema checks (flow process) ----------------------------------------------------------------


def _check_schemas(scans: list[_Scan], *, label: str) -> list[str]:
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


def _check_schema(scan: _Scan, *, label: str) -> None:
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


# --- worker functions ----------------------------------------------------------------------------


def _parquet_footer(uri: str, *, options: dict[str, str]) -> _Scan:
    """Schema, size and row groups from the footer alone (pyarrow seeks to the end; no row data)."""
    shown = redact_url(uri)
    try:
        fs, path = storage.fs_and_path(uri, **options)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            schema, meta = parquet.schema_arrow, parquet.metadata
        size = fs.size(path)
    except Exception as exc:  # pyarrow and thrift raise many types for a truncated or corrupt file
        return _Scan(
            source=shown,
            error=f"{shown}: not a readable Parquet file ({_why(exc)}); replace or remove the file "
            "(a truncated or partly written file: write it again)",
        )
    groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    return _Scan(source=shown, uri=uri, schema=_without_pandas_index(schema), size=size, row_groups=groups)


def _hash_in_place(scan: _Scan, *, options: dict[str, str]) -> _Scan:
    try:
        return dataclasses.replace(scan, sha256=_sha256_file(scan.uri, options))
    except OSError as exc:
        return dataclasses.replace(
            scan, error=f"{scan.source}: cannot read ({_why(exc)}); check that it exists"
        )


def _csv_probe(uri: str, *, options: dict[str, str], block_bytes: int) -> _Scan:
    """The header and the types pyarrow infers from the first block: a CSV's stand-in for a footer."""
    shown = redact_url(uri)
    try:
        with _csv_reader(uri, options, block_bytes=block_bytes, types={}) as reader:
            schema = reader.schema
    except Exception as exc:  # pyarrow's CSV reader raises ArrowInvalid, OSError, UnicodeDecodeError...
        return _Scan(source=shown, error=f"{shown}: not a readable CSV file ({_why(exc)}); fix or remove it")
    return _Scan(source=shown, uri=uri, schema=_widened(schema))


def _csv_copy(uri: str, *, options: dict[str, str], root: str, block_bytes: int, label: str) -> _Scan:
    """Hash the CSV; convert it to ``<root>/raw/csv/<sha>.parquet`` unless that exists (a re-run);
    read the copy's footer."""
    shown = redact_url(uri)
    try:
        sha = _sha256_file(uri, options)
        target = storage.join(root, "raw", "csv", f"{sha[:16]}.parquet")
        if not storage.exists(target):
            error = _convert(uri, options, target=target, block_bytes=block_bytes, label=label)
            if error:
                return _Scan(source=shown, error=error)
    except OSError as exc:
        return _Scan(
            source=shown, error=f"{shown}: cannot convert ({_why(exc)}); check the file and the root"
        )
    copy = _parquet_footer(target, options={})
    return dataclasses.replace(copy, source=shown, sha256=sha)


def _convert(uri: str, options: dict[str, str], *, target: str, block_bytes: int, label: str) -> str:
    """Stream the CSV into a Parquet copy; returns "" or the error to report."""
    shown, types = redact_url(uri), dict[str, pa.DataType]()
    for _ in range(_MAX_WIDENINGS):
        rows, schema = [0], None  # rows converted before the failing block, for the message
        try:
            with _csv_reader(uri, options, block_bytes=block_bytes, types=types) as reader:
                schema = reader.schema
                empty = {f.name: pa.float64() for f in schema if pa.types.is_null(f.type)}
                if empty:  # no value in the first block: float64, so later values convert
                    types = {**types, **empty}
                    continue
                _write_parquet_atomic(target, schema=schema, batches=_counted(reader, rows))
            return ""
        except pa.ArrowInvalid as exc:
            match = _CSV_COLUMN.search(str(exc))
            if schema is None or not match:
                return f"{shown}: malformed CSV after data row {rows[0]} ({_why(exc)}); fix that row"
            column = schema.names[int(match.group(1))]
            if not pa.types.is_integer(schema.field(column).type):
                dtype = schema.field(column).type
                return _bad_value(shown, column=column, dtype=dtype, rows=rows[0], exc=exc, label=label)
            types = {**types, column: pa.float64()}  # a fraction after integers: read it again as float64
    return f"{shown}: too many columns changed type while converting; fix the CSV's column types"


def _bad_value(shown: str, *, column: str, dtype: pa.DataType, rows: int, exc: Exception, label: str) -> str:
    role = "the label" if column == label else "a feature"
    return (
        f"{shown}: column {column!r} ({role}) holds a value that does not fit its type {dtype}, inferred "
        f"from the first rows ({_why(exc)}), in the CSV block after data row {rows}; a feature must hold "
        "numbers only and a label one kind of value: fix or drop that row (or the column) before ingest"
    )


@contextlib.contextmanager
def _csv_reader(
    uri: str, options: dict[str, str], *, block_bytes: int, types: dict[str, pa.DataType]
) -> Iterator[pacsv.CSVStreamingReader]:
    fs, path = storage.fs_and_path(uri, **options)
    compression = "gzip" if path.lower().endswith(".gz") else None
    with fs.open(path, "rb", compression=compression) as f:
        # One thread: no read-ahead of further blocks, so memory stays at about one block.
        read = pacsv.ReadOptions(block_size=block_bytes, use_threads=False)
        yield pacsv.open_csv(f, read_options=read, convert_options=pacsv.ConvertOptions(column_types=types))


def _widened(schema: pa.Schema) -> pa.Schema:
    """The schema the copy will have: a column with no value in the first block becomes float64."""
    return pa.schema([pa.field(f.name, pa.float64() if pa.types.is_null(f.type) else f.type) for f in schema])


def _counted(reader: pacsv.CSVStreamingReader, rows: list[int]) -> Iterator[pa.RecordBatch]:
    for batch in reader:
        yield batch
        rows[0] += batch.num_rows


def _write_parquet_atomic(target: str, *, schema: pa.Schema, batches: Iterator[pa.RecordBatch]) -> None:
    """One row group per batch, written under a temporary name and renamed: a reader (or a
    re-run's existence check) never sees a partial copy, even on an object store."""
    fs, path = storage.fs_and_path(target)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}.parquet"
    try:
        with fs.open(tmp, "wb") as sink, pq.ParquetWriter(sink, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def _sha256_file(uri: str, options: dict[str, str]) -> str:
    fs, path = storage.fs_and_path(uri, **options)
    digest = hashlib.sha256()
    with fs.open(path, "rb", block_size=HASH_CHUNK_BYTES) as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _without_pandas_index(schema: pa.Schema) -> pa.Schema:
    """Drop the index columns pandas writes (``__index_level_0__``): row labels, not features."""
    index = {c for c in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)}
    return pa.schema([f for f in schema if f.name not in index])


def _scrub(text: str, *, spec: DataSpec, options: dict[str, str]) -> str:
    secrets = [v for k, v in options.items() if k not in PUBLIC_STORAGE_OPTIONS]
    secrets.append(urlsplit(spec.source).password or "")
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:  # shorter strings are no secret and would mask ordinary words
            text = text.replace(secret, MASK)
    return text


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {redact_text(str(exc))}"
