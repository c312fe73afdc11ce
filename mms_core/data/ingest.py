"""Ingest: turn a source (built-in dataset or CSV/Parquet at an fsspec URI) into a checked,
content-addressed Parquet snapshot that later steps read by URI."""

from __future__ import annotations

import io
from typing import Literal
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_serializer

from mms_core import storage
from mms_core.data import text
from mms_core.errors import DataError
from mms_core.secrets import MASK, redact_mapping, redact_text, redact_url

BUILTINS = ("digits", "synthetic", "pystdlib")
_SYNTHETIC_PARAMS = {"n_samples": int, "n_features": int, "n_classes": int, "seed": int}
_PYSTDLIB_PARAMS = {"seq_len": int, "max_bytes": int, "max_files": int, "tokenizer": str, "vocab_size": int}
BPE_TRAIN_BYTES = 2_000_000  # BPE merges are learned on the corpus's first 2 MB: seconds, not minutes
# Storage options known to hold no credential: shown as they are (a URL's password still masked).
PUBLIC_STORAGE_OPTIONS = frozenset({"endpoint_url", "region_name"})


class DataSpec(BaseModel):
    """Where the data comes from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(
        default="builtin://digits",
        description="builtin://digits, builtin://synthetic?n_samples=..&n_features=..&n_classes=.., "
        "builtin://pystdlib?seq_len=..&max_bytes=..&max_files=..&tokenizer=byte|bpe&vocab_size=.. "
        "(token windows of the Python standard library's source, for a language model), "
        "or a .csv/.parquet fsspec URI (file://, s3://, ...).",
    )
    label: str = Field(default="label", description="Name of the label column.")
    storage_options: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="fsspec options for the source (e.g. endpoint_url, key, secret for s3). Secrets: "
        f"stored and shown masked ({MASK}: MLflow params, Prefect parameters, the spec hash), "
        f"except {', '.join(sorted(PUBLIC_STORAGE_OPTIONS))}.",
    )

    # JSON is what leaves the process (MLflow params, Prefect's parameter store, hashes): no
    # credential in it. model_dump() in Python mode keeps the SecretStr values, for code that
    # rebuilds a spec from a spec (tuning).
    @field_serializer("source", when_used="json")
    def _source_without_password(self, source: str) -> str:
        return redact_url(source)

    @field_serializer("storage_options", when_used="json")
    def _options_masked(self, options: dict[str, SecretStr]) -> dict[str, str]:
        return redact_mapping(options, public=PUBLIC_STORAGE_OPTIONS)

    def masked_fields(self) -> list[str]:
        """Fields whose JSON form hides a credential: a spec read back from JSON lacks them."""
        shown = self.model_dump(mode="json")
        options = shown["storage_options"]
        hidden = [
            f"storage_options.{k}"
            for k, v in self.storage_options.items()
            if options[k] != v.get_secret_value()
        ]
        return (["source"] if shown["source"] != self.source else []) + sorted(hidden)


class IngestResult(BaseModel):
    """A validated input: a Parquet snapshot (built-in datasets, ``layout="snapshot"``) or the
    listing of a file source's Parquet files, read in place (``layout="files"``, a
    ``table.SourceTable`` as JSON at ``uri``; see ingest_files.py)."""

    uri: str
    sha256: str
    rows: int
    features: list[str]
    label: str
    layout: Literal["snapshot", "files"] = "snapshot"


def is_builtin(source: str) -> bool:
    """A built-in dataset (generated in memory) rather than files at an fsspec URI."""
    return source.startswith("builtin://")


def load_source(*, spec: DataSpec) -> pd.DataFrame:
    """Load the source as a DataFrame and check its schema.

    Raises:
        DataError: unknown built-in, unreadable/empty file, missing label, non-numeric or NaN feature.
    """
    if is_builtin(spec.source):
        df = _builtin(spec.source, label=spec.label)
    else:
        df = _read_table(spec.source, fsspec_options(spec))
    check_schema(df, label=spec.label, source=redact_url(spec.source))
    return df


def check_schema(df: pd.DataFrame, *, label: str, source: str) -> None:
    """Fail early with a message that names the column (or file) and the fix."""
    if df.empty:
        raise DataError(f"{source}: the file has no rows; point data.source at a non-empty table")
    if label not in df.columns:
        cols = ", ".join(map(str, df.columns[:10]))
        raise DataError(
            f"{source}: label column {label!r} not found (columns: {cols}); "
            f"set data.label to the name of the label column"
        )
    features = [c for c in df.columns if c != label]
    if not features:
        raise DataError(f"{source}: no feature columns besides the label {label!r}")
    for col in features:
        if not pd.api.types.is_numeric_dtype(df[col]) or pd.api.types.is_bool_dtype(df[col]):
            raise DataError(
                f"{source}: feature column {col!r} is not numeric (dtype {df[col].dtype}); "
                f"encode it as numbers or drop it before ingest"
            )
        if df[col].isna().any():
            raise DataError(
                f"{source}: feature column {col!r} has {int(df[col].isna().sum())} missing/NaN values; "
                f"impute or drop those rows before ingest"
            )
    if df[label].isna().any():
        raise DataError(f"{source}: label column {label!r} has missing values; drop those rows")


def snapshot(*, df: pd.DataFrame, label: str, root: str) -> IngestResult:
    """Write ``df`` as Parquet at <root>/raw/<sha>.parquet (content-addressed, idempotent)."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    data = buf.getvalue()
    sha = storage.sha256_bytes(data)
    uri = storage.join(root, "raw", f"{sha[:16]}.parquet")
    if not storage.exists(uri):
        storage.write_bytes_atomic(uri, data)
    features = [c for c in df.columns if c != label]
    return IngestResult(uri=uri, sha256=sha, rows=len(df), features=features, label=label)


def _builtin(source: str, *, label: str) -> pd.DataFrame:
    parts = urlsplit(source)
    name, params = parts.netloc, dict(parse_qsl(parts.query))
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        df = pd.DataFrame(bunch.data.astype(np.float32), columns=[f"pixel_{i}" for i in range(64)])
        df[label] = bunch.target.astype(np.int64)
        return df
    if name == "synthetic":
        return _synthetic(params, label=label, source=source)
    if name == "pystdlib":
        return _pystdlib(params, label=label, source=source)
    raise DataError(f"unknown built-in dataset {name!r} in {source!r}; choose one of {BUILTINS}")


def _parse_params(params: dict[str, str], schema: dict[str, type], *, source: str) -> dict:
    unknown = set(params) - set(schema)
    if unknown:
        raise DataError(f"{source}: unknown parameter(s) {sorted(unknown)}; use {sorted(schema)}")
    try:
        return {k: schema[k](v) for k, v in params.items()}
    except ValueError as exc:
        raise DataError(f"{source}: parameters must be integers ({exc})") from None


def _synthetic(params: dict[str, str], *, label: str, source: str) -> pd.DataFrame:
    p = _parse_params(params, _SYNTHETIC_PARAMS, source=source)
    from sklearn.datasets import make_classification

    n_samples, n_features, n_classes = (
        p.get("n_samples", 2000),
        p.get("n_features", 20),
        p.get("n_classes", 4),
    )
    n_informative = max(2, n_features // 2)
    if n_samples < 2 * n_classes or n_features < 2 or n_classes < 2:
        raise DataError(f"{source}: need n_samples >= 2*n_classes, n_features >= 2, n_classes >= 2")
    if n_classes * 2 > 2**n_informative:  # make_classification: 2 clusters per class fit the informative dims
        raise DataError(
            f"{source}: n_classes={n_classes} needs more features (n_features={n_features} gives "
            f"{n_informative} informative); raise n_features to >= {2 * (n_classes - 1).bit_length() + 2}"
        )
    x, y = make_classification(
        n_samples=n_samples,
        n_features=n_features,
        n_informative=n_informative,
        n_classes=n_classes,
        random_state=p.get("seed", 0),
    )
    df = pd.DataFrame(x.astype(np.float32), columns=[f"f_{i}" for i in range(n_features)])
    df[label] = y.astype(np.int64)
    return df


def _pystdlib(params: dict[str, str], *, label: str, source: str) -> pd.DataFrame:
    """Token windows of the standard library's source: columns t_0..t_{L-1} and the next token as
    the label; the vocabulary size rides along in the table's metadata (see shard.py)."""
    p = _parse_params(params, _PYSTDLIB_PARAMS, source=source)
    seq_len, kind = p.get("seq_len", 64), p.get("tokenizer", "byte")
    max_bytes, max_files = p.get("max_bytes", 1_000_000), p.get("max_files") or None
    if seq_len < 2 or max_bytes < 0:
        raise DataError(f"{source}: need seq_len >= 2 and max_bytes >= 0 (0: the whole library)")
    corpus = text.read_corpus(max_bytes=max_bytes or None, max_files=max_files)
    if kind == "byte":
        if "vocab_size" in p:
            raise DataError(f"{source}: vocab_size applies to tokenizer=bpe only (bytes: always 256)")
        tokenizer: text.ByteTokenizer | text.BpeTokenizer = text.ByteTokenizer()
    elif kind == "bpe":
        vocab = p.get("vocab_size", 1024)
        if not 256 < vocab <= 65536:
            raise DataError(f"{source}: vocab_size must be within 257..65536 for tokenizer=bpe")
        tokenizer = text.BpeTokenizer.train(data=corpus[:BPE_TRAIN_BYTES], vocab_size=vocab)
    else:
        raise DataError(f"{source}: unknown tokenizer {kind!r}; use 'byte' or 'bpe'")
    x, y = text.token_windows(tokens=tokenizer.encode(corpus), seq_len=seq_len)
    if len(x) < 10:
        raise DataError(
            f"{source}: {len(corpus)} bytes give only {len(x)} windows of {seq_len} tokens; "
            f"raise max_bytes or lower seq_len"
        )
    df = pd.DataFrame(x, columns=[f"t_{i}" for i in range(seq_len)])
    df[label] = y
    df.attrs[text.TOKEN_VOCAB_ATTR] = tokenizer.vocab_size
    return df


def fsspec_options(spec: DataSpec) -> dict[str, str]:
    """The real storage options, revealed here, for the fsspec call only.

    Raises:
        DataError: an option holds the mask: the spec was read back from where secrets are stored
            masked (MLflow params, a Prefect deployment's parameters).
    """
    options = {key: value.get_secret_value() for key, value in spec.storage_options.items()}
    masked = sorted(key for key, value in options.items() if value == MASK)
    if masked:
        raise DataError(
            f"data.storage_options {masked} hold the mask {MASK!r}, not credentials: this spec was read "
            "back from a store that keeps secrets masked (MLflow params, Prefect parameters); give the "
            "credentials to the process that runs the flow instead (e.g. AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY for s3://) and drop them from the spec, or set them again with --set"
        )
    return options


def _read_table(uri: str, storage_options: dict[str, str]) -> pd.DataFrame:
    path, shown = urlsplit(uri).path or uri, redact_url(uri)
    try:
        fs, fpath = storage.fs_and_path(uri, **storage_options)
        if not fs.exists(fpath):
            raise DataError(f"{shown}: no such file; check data.source")
        with fs.open(fpath, "rb") as f:
            raw = f.read()
    except DataError:
        raise
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{shown}: cannot read ({redact_text(str(exc))}); check the URI and storage options"
        ) from exc
    if not raw:
        raise DataError(f"{shown}: the file is empty; point data.source at a non-empty table")
    try:
        if path.endswith(".parquet") or path.endswith(".pq"):
            return pd.read_parquet(io.BytesIO(raw))
        if path.endswith(".csv") or path.endswith(".csv.gz"):
            return pd.read_csv(io.BytesIO(raw), compression="gzip" if path.endswith(".gz") else None)
    except Exception as exc:  # pandas/pyarrow raise many types for malformed files
        raise DataError(f"{shown}: not a readable table ({type(exc).__name__}: {exc})") from exc
    raise DataError(f"{shown}: unsupported file type; use .csv, .csv.gz or .parquet")
