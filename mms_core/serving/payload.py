"""Turn a request body into a float32 matrix in the model's feature order, or refuse it with a
message that names the problem. Shared by the online server and the stream predictor, so that
nothing malformed ever reaches a replica.

Accepted shapes (MLflow's scoring protocol plus our own ``inputs``):
  {"inputs": [[...], ...]}                    rows in feature order
  {"inputs": {"col": [...], ...}}             columns by name
  {"instances": [[...], ...] | [{"col": v}]}  TF-serving style rows
  {"dataframe_split": {"columns": [...], "data": [[...]]}}
  {"dataframe_records": [{"col": v}, ...]}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mms_core.errors import MMSError

NanPolicy = Literal["reject", "impute"]
FORMATS = ("inputs", "instances", "dataframe_split", "dataframe_records")


class PayloadError(MMSError):
    """The client's request is unusable; ``status`` is the HTTP code to answer with."""

    def __init__(self, message: str, *, status: int = 422, code: str = "invalid_input") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class InputSchema:
    """What a model accepts: feature names in order, the training means (for NaN imputation)."""

    features: list[str]
    mean: list[float]
    max_rows: int = 10_000
    nan_policy: NanPolicy = "reject"


def parse_body(body: Any, schema: InputSchema) -> np.ndarray:
    """Rows of ``body`` (one of :data:`FORMATS`) as float32 ``[rows, features]``.

    Raises:
        PayloadError: unknown format, wrong shape, missing column, non-numeric value, empty batch,
            too many rows, or NaN/inf under the ``reject`` policy.
    """
    if not isinstance(body, dict):
        raise PayloadError(f"request body must be a JSON object with one of the keys {list(FORMATS)}")
    keys = [k for k in FORMATS if k in body]
    if len(keys) != 1:
        raise PayloadError(
            f"request body must have exactly one of the keys {list(FORMATS)}, got {sorted(body)[:5]}"
        )
    key = keys[0]
    value = body[key]
    if key == "dataframe_split":
        if not isinstance(value, dict) or "data" not in value:
            raise PayloadError('dataframe_split must be {"columns": [...], "data": [[...], ...]}')
        rows = value["data"]
        columns = value.get("columns")
        x = _from_rows(rows, schema) if columns is None else _from_named_rows(rows, columns, schema)
    elif key == "dataframe_records" or (
        isinstance(value, list) and value and all(isinstance(r, dict) for r in value)
    ):
        x = _from_records(value, schema)
    elif isinstance(value, dict):
        x = _from_columns(value, schema)
    else:
        x = _from_rows(value, schema)
    return _check_values(x, schema)


def _as_matrix(rows: Any, width: int, what: str) -> np.ndarray:
    """``rows`` as float32 ``[n, width]``: a flat list of plain numbers per row, nothing else.

    The element types are checked before numpy sees them: ``np.asarray`` would silently turn bools
    into numbers and a row of lists into a 3-D array that passes a width check and then breaks a
    batch it joins.
    """
    if not isinstance(rows, list):
        raise PayloadError(f"{what} must be a list of rows, got {type(rows).__name__}")
    if not rows:
        raise PayloadError(f"{what} is empty: send at least one row")
    if not all(isinstance(r, list) for r in rows):
        if any(isinstance(r, list) for r in rows):
            raise PayloadError(f"{what} mixes rows and single values: send a list of rows of {width} numbers")
        rows = [rows]  # a single row sent without the outer list
    bad = next((i for i, r in enumerate(rows) if len(r) != width), None)
    if bad is not None:
        raise PayloadError(
            f"{what}: row {bad} has {len(rows[bad])} values but the model takes {width} features"
        )
    kinds = {type(v) for r in rows for v in r}
    if not kinds <= _NUMBERS:
        names = sorted({_JSON_NAMES.get(k, k.__name__) for k in kinds - _NUMBERS})
        raise PayloadError(
            f"{what}: every value must be a number (int or float), not {', '.join(names)}; "
            f"send one flat list of {width} numbers per row"
        )
    try:
        x = np.asarray(rows, dtype=np.float64)
    except OverflowError:
        raise PayloadError(
            f"{what}: a number is too large for a float; send values within +-3.4e38"
        ) from None
    with np.errstate(over="ignore"):  # beyond float32's range becomes inf, which the NaN policy handles
        return x.astype(np.float32)


_NUMBERS = {int, float}
_JSON_NAMES = {str: "a string", bool: "a bool", type(None): "null", list: "a list", dict: "an object"}


def _from_rows(rows: Any, schema: InputSchema) -> np.ndarray:
    _check_count(rows, schema)
    return _as_matrix(rows, len(schema.features), "inputs")


def _from_named_rows(rows: Any, columns: Any, schema: InputSchema) -> np.ndarray:
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise PayloadError("dataframe_split.columns must be a list of column names")
    _check_count(rows, schema)
    full = _as_matrix(rows, len(columns), "dataframe_split.data")
    index = {c: i for i, c in enumerate(columns)}
    return full[:, [index[f] for f in _require(index, schema)]]


def _from_records(records: Any, schema: InputSchema) -> np.ndarray:
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise PayloadError("records must be a list of {column: value} objects")
    _check_count(records, schema)
    for i, record in enumerate(records):
        missing = [f for f in schema.features if f not in record]
        if missing:
            raise PayloadError(f"record {i} is missing feature(s) {missing[:5]} the model needs")
    rows = [[r[f] for f in schema.features] for r in records]
    return _as_matrix(rows, len(schema.features), "records")


def _from_columns(columns: dict[str, Any], schema: InputSchema) -> np.ndarray:
    _require(columns, schema)
    data = [columns[f] for f in schema.features]
    if not all(isinstance(c, list) for c in data) or len({len(c) for c in data}) != 1:
        raise PayloadError("inputs as columns must map each feature to a list, all of the same length")
    _check_count(data[0], schema)
    return _as_matrix([list(r) for r in zip(*data, strict=True)], len(schema.features), "inputs")


def _require(names: dict[str, Any], schema: InputSchema) -> list[str]:
    missing = [f for f in schema.features if f not in names]
    if missing:
        raise PayloadError(
            f"missing {len(missing)} feature column(s) the model needs, e.g. {missing[:5]}; "
            f"expected: {schema.features[:5]}..."
        )
    return schema.features


def _check_count(rows: Any, schema: InputSchema) -> None:
    if isinstance(rows, list) and len(rows) > schema.max_rows:
        raise PayloadError(
            f"{len(rows)} rows in one request; the limit is {schema.max_rows}: split the batch",
            status=413,
            code="too_many_rows",
        )


def _check_values(x: np.ndarray, schema: InputSchema) -> np.ndarray:
    bad = ~np.isfinite(x)
    if not bad.any():
        return x
    if schema.nan_policy == "reject":
        row, col = map(int, np.argwhere(bad)[0])
        raise PayloadError(
            f"row {row} feature {schema.features[col]!r} is NaN or infinite; send finite numbers "
            "(or set nan_policy=impute to replace them with the training mean)"
        )
    mean = np.broadcast_to(np.asarray(schema.mean, dtype=np.float32), x.shape)
    return np.where(bad, mean, x)
