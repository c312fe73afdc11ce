"""Worker-side jobs on the files of a source: read a Parquet footer, hash a file, probe a CSV and
convert it once to a Parquet copy. Each returns a Scan (metadata only, or the error to report), so
the flow process (ingest_files.py) checks every file before it raises the first failure.

No job holds a whole file: memory is bounded by a hash chunk or a CSV block. The jobs take the file
(or its scan) as their first, positional argument, as ``Client.map`` passes it.

CSV columns keep the type pyarrow infers from the file's first block (int64, float64, string,
bool), widened where a well-formed file would otherwise fail to convert: a column with no value
in the first block is read as float64, and an int64 column that later holds a fraction is read
again as float64. So integer labels stay integers, and the copy depends on the CSV's bytes alone
(not on data.label), as its content-addressed name promises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import uuid
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mms_core import storage
from mms_core.secrets import redact_text, redact_url

HASH_CHUNK_BYTES = 4 << 20  # what a worker holds while hashing a file
CSV_BLOCK_BYTES = 8 << 20  # CSV text per block; one block becomes one row group of the copy
_CSV_COLUMN = re.compile(r"In CSV column #(\d+)")
_MAX_WIDENINGS = 256  # an int64 column widened to float64 per re-read; bounded by the column count


@dataclasses.dataclass(frozen=True)
class Scan:
    """What a worker learned about one source file (metadata only), or why it failed."""

    source: str  # the source file's URI, redacted: the name messages give
    uri: str = ""  # where its Parquet data lies: the file itself, or the CSV's copy
    schema: pa.Schema | None = None
    size: int = 0
    sha256: str = ""
    row_groups: tuple[int, ...] = ()
    error: str = ""


def parquet_footer(uri: str, *, options: dict[str, str]) -> Scan:
    """Schema, size and row groups from the footer alone (pyarrow seeks to the end; no row data).

    Args:
        uri: The Parquet file.
        options: fsspec options for reading it.

    Returns:
        The file's Scan without its sha256, or one with ``error`` set if it cannot be read.
    """
    shown = redact_url(uri)
    try:
        fs, path = storage.fs_and_path(uri, **options)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            schema, meta = parquet.schema_arrow, parquet.metadata
        size = fs.size(path)
    except Exception as exc:  # pyarrow and thrift raise many types for a truncated or corrupt file
        return Scan(
            source=shown,
            error=f"{shown}: not a readable Parquet file ({_why(exc)}); replace or remove the file "
            "(a truncated or partly written file: write it again)",
        )
    groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    return Scan(source=shown, uri=uri, schema=_without_pandas_index(schema), size=size, row_groups=groups)


def hash_in_place(scan: Scan, *, options: dict[str, str]) -> Scan:
    """Hash a Parquet file where it lies, streaming it in HASH_CHUNK_BYTES chunks.

    Args:
        scan: The file's scan from ``parquet_footer``.
        options: fsspec options for reading it.

    Returns:
        ``scan`` with its sha256, or with ``error`` set if the file cannot be read.
    """
    try:
        return dataclasses.replace(
            scan, sha256=storage.sha256_file(scan.uri, chunk_bytes=HASH_CHUNK_BYTES, **options)
        )
    except OSError as exc:
        return dataclasses.replace(
            scan, error=f"{scan.source}: cannot read ({_why(exc)}); check that it exists"
        )


def csv_probe(uri: str, *, options: dict[str, str], block_bytes: int) -> Scan:
    """The header and the types pyarrow infers from the first block: a CSV's stand-in for a footer.

    Args:
        uri: The CSV file.
        options: fsspec options for reading it.
        block_bytes: CSV text read at a time (the first block gives the types).

    Returns:
        A Scan with the schema the copy will have, or one with ``error`` set.
    """
    shown = redact_url(uri)
    try:
        with _csv_reader(uri, options, block_bytes=block_bytes, types={}) as reader:
            schema = reader.schema
    except Exception as exc:  # pyarrow's CSV reader raises ArrowInvalid, OSError, UnicodeDecodeError...
        return Scan(source=shown, error=f"{shown}: not a readable CSV file ({_why(exc)}); fix or remove it")
    return Scan(source=shown, uri=uri, schema=_widened(schema))


def csv_copy(uri: str, *, options: dict[str, str], root: str, block_bytes: int, label: str) -> Scan:
    """Hash the CSV; convert it to ``<root>/raw/csv/<sha>.parquet`` unless that exists (a re-run);
    read the copy's footer.

    Args:
        uri: The CSV file.
        options: fsspec options for reading it (the copy is written with the root's settings).
        root: Storage root of the copies.
        block_bytes: CSV text read at a time; each block becomes one row group of the copy.
        label: The label column, named as such in an error message.

    Returns:
        The copy's Scan (source and sha256 of the CSV), or one with ``error`` set.
    """
    shown = redact_url(uri)
    try:
        sha = storage.sha256_file(uri, chunk_bytes=HASH_CHUNK_BYTES, **options)
        target = storage.join(root, "raw", "csv", f"{sha[:16]}.parquet")
        if not storage.exists(target):
            error = _convert(uri, options, target=target, block_bytes=block_bytes, label=label)
            if error:
                return Scan(source=shown, error=error)
    except OSError as exc:
        return Scan(source=shown, error=f"{shown}: cannot convert ({_why(exc)}); check the file and the root")
    copy = parquet_footer(target, options={})
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


def _without_pandas_index(schema: pa.Schema) -> pa.Schema:
    """Drop the index columns pandas writes (``__index_level_0__``): row labels, not features."""
    index = {c for c in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)}
    return pa.schema([f for f in schema if f.name not in index])


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {redact_text(str(exc))}"
