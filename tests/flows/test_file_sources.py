"""The training pipeline on file sources, the path for data larger than memory: ingest and shard
as Dask work on the flow's LocalCluster, ranks streaming their shards' parts (Prefect harness,
real MLflow sqlite store)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from sklearn.datasets import load_digits

from flows.training_pipeline import training_pipeline
from mms_core.data.shard import PARTS_MANIFEST_VERSION, load_manifest
from mms_core.errors import DataError
from mms_core.spec import load_spec

SMALL = [
    "training.epochs=3",
    "training.shuffle_buffer_rows=300",
    "preprocess.n_shards=2",
    "preprocess.block_rows=256",
    "compress.quantize=false",
    "evaluate.min_accuracy=0.8",
    "registry.model_name=files-classifier",
    "registry.experiment=test-file-sources",
]


def _digits_directory(directory, *, nan_in: tuple[int, int] | None = None):
    """The digits table as 3 Parquet files of row groups of 200 rows; ``nan_in=(file, row_group)``
    puts a NaN into one feature of that row group."""
    bunch = load_digits()
    df = pd.DataFrame(bunch.data.astype(np.float32), columns=[f"pixel_{i}" for i in range(64)])
    df["label"] = bunch.target.astype(np.int64)
    directory.mkdir()
    for i, part in enumerate(np.array_split(np.arange(len(df)), 3)):
        chunk = df.iloc[part].reset_index(drop=True)
        if nan_in is not None and nan_in[0] == i:
            chunk.loc[nan_in[1] * 200 + 7, "pixel_20"] = np.nan
        pq.write_table(pa.Table.from_pandas(chunk, preserve_index=False), directory / f"part-{i}.parquet",
                       row_group_size=200)  # fmt: skip
    return directory


def _versions(home, name="files-classifier"):
    try:
        return MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}").search_model_versions(
            f"name='{name}'"
        )
    except Exception:  # no database or no such model yet
        return []


@pytest.mark.slow
def test_pipeline_trains_from_a_directory_of_parquet_files_and_registers(mms_home):
    source = _digits_directory(mms_home / "table")
    spec = load_spec("examples/digits.yaml", overrides=[f"data.source={source.as_uri()}", *SMALL])

    result = training_pipeline(spec=spec)

    manifest = load_manifest(result.manifest_uri)
    assert manifest.version == PARTS_MANIFEST_VERSION
    assert sum(i.rows for i in [*manifest.train, manifest.val, manifest.test]) == 1797
    assert all(len(i.parts) > 1 for i in manifest.train)  # 8 blocks of 256 rows: several parts each
    assert not list((mms_home / "data" / "raw").glob("**/*.parquet"))  # Parquet is read in place
    assert result.registration.alias == "champion" and result.evaluation.accuracy > 0.8
    assert result.evaluation.rows == manifest.test.rows
    registered = {str(v.version) for v in _versions(mms_home)}
    assert registered == {result.registration.version, result.registration.compressed_version} - {None}


@pytest.mark.slow
def test_a_corrupt_partition_fails_naming_its_file_and_row_group_and_registers_nothing(mms_home):
    source = _digits_directory(mms_home / "table", nan_in=(1, 2))
    spec = load_spec("examples/digits.yaml", overrides=[f"data.source={source.as_uri()}", *SMALL])

    with pytest.raises(DataError, match=r"part-1\.parquet.*row group 2") as err:
        training_pipeline(spec=spec)

    assert "pixel_20" in str(err.value)
    assert _versions(mms_home) == []
    assert not list((mms_home / "data" / "shards").glob("*/manifest.json"))
