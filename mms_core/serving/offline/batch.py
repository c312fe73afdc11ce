"""Batch prediction on Dask: read a table from any fsspec URI, predict partition by partition,
write Parquet atomically. The model's bytes are broadcast to the workers once and each worker
builds the network once (the shared :func:`~mms_core.serving.offline.predictors.cached_predictor`), not once
per partition."""

from __future__ import annotations

import uuid

import dask.dataframe as dd
import pandas as pd
import pyarrow.parquet as pq
from distributed import Client
from pydantic import BaseModel

from mms_core import storage
from mms_core.errors import DataError
from mms_core.packaging import PackageConfig
from mms_core.serving.offline.predictors import cached_predictor, package_key


class BatchResult(BaseModel):
    output_uri: str
    rows: int
    partitions: int
    model_version: str


def predict_table(
    *,
    client: Client,
    config: PackageConfig,
    weights: bytes,
    model_version: str,
    input_uri: str,
    output_uri: str,
    id_column: str | None = None,
    probabilities: bool = False,
    storage_options: dict[str, str] | None = None,
) -> BatchResult:
    """Predict every row of ``input_uri`` (CSV or Parquet) and write Parquet at ``output_uri``.

    The output holds ``id`` (the input's ``id_column``, when given), ``prediction`` and, on request, one
    ``prob_<class>`` column per class, in input order. A failed run leaves nothing at ``output_uri``.

    Raises:
        DataError: unreadable input, missing feature or id column, or an output that exists.
    """
    opts = storage_options or {}
    if storage.exists(output_uri):
        raise DataError(f"output {output_uri} already exists; choose a new --output or delete it first")
    frame = _read(input_uri, opts)
    missing = [c for c in [*config.features, *([id_column] if id_column else [])] if c not in frame.columns]
    if missing:
        raise DataError(f"{input_uri}: missing column(s) {missing[:5]} that the model (or --id-column) needs")
    package = client.scatter([(config, weights)], broadcast=True, hash=False)[0]  # a tuple would be split
    meta = _meta(
        config, id_dtype=frame._meta[id_column].dtype if id_column else None, probabilities=probabilities
    )
    key = package_key(config=config, weights=weights)
    preds = frame.map_partitions(_predict_partition, package, key, id_column, probabilities, meta=meta)
    tmp = f"{output_uri.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
    fs, tmp_path = storage.fs_and_path(tmp, **opts)
    try:
        preds.to_parquet(tmp, write_index=False, storage_options=opts)
        # Row count from the Parquet footers: no second pass over the data.
        rows = sum(pq.ParquetFile(fs.open(f)).metadata.num_rows for f in fs.glob(f"{tmp_path}/*.parquet"))
        fs.mv(tmp_path, storage.fs_and_path(output_uri, **opts)[1], recursive=True)
    finally:
        if fs.exists(tmp_path):
            fs.rm(tmp_path, recursive=True)
    return BatchResult(
        output_uri=output_uri, rows=rows, partitions=preds.npartitions, model_version=model_version
    )


def _read(uri: str, opts: dict[str, str]) -> dd.DataFrame:
    path = uri.split("?", 1)[0]
    try:
        if path.endswith((".csv", ".csv.gz")):
            return dd.read_csv(uri, storage_options=opts, blocksize="16MiB")
        return dd.read_parquet(uri, storage_options=opts)
    except (OSError, ValueError) as exc:
        raise DataError(f"{uri}: cannot read as a table ({exc}); use .csv or Parquet") from exc


def _meta(config: PackageConfig, *, id_dtype: object | None, probabilities: bool) -> pd.DataFrame:
    columns: dict[str, pd.Series] = {}
    if id_dtype is not None:
        columns["id"] = pd.Series(dtype=id_dtype)
    columns["prediction"] = pd.Series(dtype=pd.Series(config.classes).dtype)
    if probabilities:
        columns |= {f"prob_{c}": pd.Series(dtype="float32") for c in config.classes}
    return pd.DataFrame(columns)


def _predict_partition(
    part: pd.DataFrame,
    package: tuple[PackageConfig, bytes],
    key: str,
    id_column: str | None,
    probabilities: bool,
) -> pd.DataFrame:
    predictor = cached_predictor(config=package[0], weights=package[1], key=key)
    out = pd.DataFrame({"id": part[id_column].to_numpy()} if id_column else {}, index=range(len(part)))
    out["prediction"] = predictor.predict(part)
    if probabilities:
        proba = predictor.predict_proba(part)
        for i, c in enumerate(predictor.config.classes):
            out[f"prob_{c}"] = proba[:, i]
    return out


def predict_registered(
    *, client: Client, tracking_uri: str, model: str, input_uri: str, output_uri: str, **options: object
) -> BatchResult:
    """:func:`predict_table` for a registered model given as ``NAME@ALIAS`` or ``NAME/VERSION``."""
    from mms_core.registry import load_package

    config, weights, version = load_package(tracking_uri=tracking_uri, model=model)
    return predict_table(
        client=client,
        config=config,
        weights=weights,
        model_version=version,
        input_uri=input_uri,
        output_uri=output_uri,
        **options,
    )
