"""A source table as ingest leaves it for sharding: an ordered list of Parquet files, read in place.

Ingest of an fsspec source (a file, a directory or a glob of CSV or Parquet) writes this listing
instead of a copy of the data: Parquet files are read where they are; CSV files are converted
once to Parquet under the storage root. The listing holds what reproducibility needs (each
file's size, sha256 and row-group sizes), so the table's content address comes from metadata
and per-file hashes, never from the rows themselves.

Rows have a global index: files in listing order, row groups in file order. That index is the
stable row key sharding hashes, so the split does not depend on how the rows are partitioned.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict, Field

from mms_core import storage

TABLE_VERSION = 1


class SourceFile(BaseModel):
    """One Parquet file of the table."""

    model_config = ConfigDict(frozen=True)

    uri: str = Field(description="Where the Parquet file is read (the source's own, or ingest's CSV copy).")
    size: int = Field(description="Bytes on storage.")
    sha256: str = Field(description="sha256 of the file's bytes (of the source file for a CSV).")
    row_groups: list[int] = Field(description="Rows in each row group, in file order.")

    @property
    def rows(self) -> int:
        return sum(self.row_groups)


class SourceTable(BaseModel):
    """The files of a table, in the order that defines the global row index."""

    model_config = ConfigDict(frozen=True)

    version: int = TABLE_VERSION
    source: str = Field(description="The data.source it came from (credentials redacted).")
    label: str
    features: list[str]
    files: list[SourceFile]
    copied: bool = Field(
        default=False,
        description="The files are ingest's Parquet copies under the storage root (a CSV source): "
        "read with the root's settings, not the source's storage options.",
    )

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def sha256(self) -> str:
        """Content address: the files' hashes and row groups in order, the label and the features.
        Locations are left out: the same bytes moved elsewhere are the same table."""
        return storage.canonical_hash(
            {
                "v": TABLE_VERSION,
                "label": self.label,
                "features": self.features,
                "files": [[f.sha256, f.row_groups] for f in self.files],
            }
        )


class Piece(BaseModel):
    """Rows ``[start, stop)`` of one row group of one file (offsets within the row group)."""

    model_config = ConfigDict(frozen=True)

    file: int
    row_group: int
    start: int
    stop: int
    first_row: int = Field(description="Global index of this piece's first row.")


def pieces(table: SourceTable, *, start: int, stop: int) -> Iterator[Piece]:
    """The row-group pieces that hold global rows ``[start, stop)``, in order."""
    offsets = itertools.accumulate((n for f in table.files for n in f.row_groups), initial=0)
    groups = ((i, g) for i, f in enumerate(table.files) for g in range(len(f.row_groups)))
    for (file, group), first in zip(groups, offsets, strict=False):
        n = table.files[file].row_groups[group]
        lo, hi = max(start, first), min(stop, first + n)
        if lo < hi:
            yield Piece(file=file, row_group=group, start=lo - first, stop=hi - first, first_row=lo)
        if first >= stop:
            return
