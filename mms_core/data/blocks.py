"""Blocks of a SourceTable and the worker-side reader that decodes and checks them.

A block is a fixed range of global rows, stored as pieces of row groups (see shard_files.py for
how the table is cut into blocks). The reader turns a block into float32 features and its label
pieces, one decoded row group at a time, so a worker holds one row group and one block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mms_core import storage
from mms_core.errors import DataError
from mms_core.secrets import redact_url

_NUMERIC = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean)


@dataclass(frozen=True)
class Block:
    """Global rows [first_row, first_row + rows) as pieces (file uri, row group, start, stop)."""

    index: int
    first_row: int
    pieces: tuple[tuple[str, int, int, int], ...]

    @property
    def rows(self) -> int:
        return sum(stop - start for _, _, start, stop in self.pieces)


class BlockReader:
    """Reads blocks from the source. Consecutive blocks mostly share a row group, so the last
    file stays open and its last row group decoded (as float32 features + arrow labels).

    Use as a context manager: leaving it closes the open file.

    Args:
        features: The feature columns, in the order of the features array.
        label: The label column.
        options: fsspec options for opening the source files (credentials).
        check: Whether a null label or a null, NaN or infinite feature is a DataError (pass 1
            checks; pass 2 reads the same rows again and skips the check).
    """

    def __init__(self, *, features: list[str], label: str, options: dict[str, str], check: bool):
        self._features, self._label, self._options, self._check = features, label, options, check
        self._file: tuple[str, pq.ParquetFile, object] | None = None
        self._group: tuple[tuple[str, int], np.ndarray, pa.ChunkedArray] | None = None

    def __enter__(self) -> BlockReader:
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file[2].close()
        self._file = self._group = None

    def block(self, block: Block) -> tuple[np.ndarray, list[pa.ChunkedArray]]:
        """Reads one block.

        Args:
            block: The block to read.

        Returns:
            The block's features in a fresh C-ordered float32 array, and its labels by piece.

        Raises:
            DataError: A file changed since ingest (fewer rows, missing columns), a non-numeric
                feature, or (with ``check``) a null label or a null or non-finite feature.
        """
        x = np.empty((block.rows, len(self._features)), dtype=np.float32)
        labels, pos = [], 0
        for uri, group, start, stop in block.pieces:
            gx, gy = self._row_group(uri, group)
            if len(gx) < stop:
                raise DataError(
                    f"{redact_url(uri)}, row group {group}: {len(gx)} rows, the table lists more; the file "
                    "changed since ingest: run ingest again"
                )
            x[pos : pos + stop - start] = gx[start:stop]
            labels.append(gy.slice(start, stop - start))
            pos += stop - start
        return x, labels

    def _row_group(self, uri: str, group: int) -> tuple[np.ndarray, pa.ChunkedArray]:
        if self._group is None or self._group[0] != (uri, group):
            self._group = None  # free the previous one before decoding the next
            data = self._open(uri).read_row_group(group, columns=[*self._features, self._label])
            decoded = _decode(
                data, features=self._features, label=self._label, where=(uri, group), check=self._check
            )
            self._group = ((uri, group), *decoded)
        return self._group[1], self._group[2]

    def _open(self, uri: str) -> pq.ParquetFile:
        if self._file is None or self._file[0] != uri:
            if self._file is not None:
                self._file[2].close()
            fs, path = storage.fs_and_path(uri, **self._options)
            handle = fs.open(path, "rb")
            pf = pq.ParquetFile(handle)
            missing = sorted({*self._features, self._label} - set(pf.schema_arrow.names))
            if missing:
                handle.close()
                raise DataError(
                    f"{redact_url(uri)}: columns {missing} are missing; every file of the source "
                    "must have the table's columns (fix or remove that file)"
                )
            self._file = (uri, pf, handle)
        return self._file[1]


def _decode(
    data: pa.Table, *, features: list[str], label: str, where: tuple[str, int], check: bool
) -> tuple[np.ndarray, pa.ChunkedArray]:
    """A row group as float32 features (rows x features) and its label column; with ``check``, a
    null label or a null, NaN or infinite feature is a DataError naming file, row group and column."""
    at = f"{redact_url(where[0])}, row group {where[1]}"
    labels = data.column(label)
    if check and labels.null_count:
        raise DataError(
            f"{at}: label column {label!r} has {labels.null_count} null values; "
            "drop those rows or fill their labels in the source, then re-run"
        )
    x = np.empty((data.num_rows, len(features)), dtype=np.float32)
    for j, name in enumerate(features):
        col = data.column(name)
        if not any(is_type(col.type) for is_type in _NUMERIC):
            raise DataError(
                f"{at}: feature {name!r} is {col.type}, not numeric; convert or drop it, then re-run"
            )
        values = col.to_numpy().astype(np.float32)  # nulls come back as NaN
        if check:
            _check_finite(values, nulls=col.null_count, at=f"{at}: feature {name!r}")
        x[:, j] = values
    return x, labels


def _check_finite(values: np.ndarray, *, nulls: int, at: str) -> None:
    bad = nulls or int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        kind = "null" if nulls else "NaN or infinite (or beyond float32's range)"
        raise DataError(
            f"{at} has {bad} {kind} values; features must be finite numbers: "
            "clean or impute them in the source (or drop the column), then re-run"
        )
