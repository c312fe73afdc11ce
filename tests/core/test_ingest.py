"""mms_core.data.ingest: built-in datasets, CSV/Parquet sources, schema checks, snapshots."""

import gzip
import hashlib
import io

import numpy as np
import pandas as pd
import pytest

from mms_core.data.ingest import DataSpec, check_schema, load_source, snapshot
from mms_core.errors import DataError

# ---------------------------------------------------------------- built-ins


def test_builtin_digits_shape_and_label():
    df = load_source(spec=DataSpec(source="builtin://digits"))

    assert df.shape == (1797, 65)
    features = [c for c in df.columns if c != "label"]
    assert len(features) == 64
    assert sorted(df["label"].unique().tolist()) == list(range(10))
    assert all(pd.api.types.is_float_dtype(df[c]) for c in features)
    assert pd.api.types.is_integer_dtype(df["label"])


def test_builtin_digits_uses_configured_label_name():
    df = load_source(spec=DataSpec(source="builtin://digits", label="digit"))
    assert "digit" in df.columns and "label" not in df.columns


def test_builtin_synthetic_honours_query_params():
    df = load_source(spec=DataSpec(source="builtin://synthetic?n_samples=50&n_features=6&n_classes=3&seed=7"))

    assert df.shape == (50, 7)
    assert [c for c in df.columns if c != "label"] == [f"f_{i}" for i in range(6)]
    assert sorted(df["label"].unique().tolist()) == [0, 1, 2]


def test_builtin_synthetic_is_seeded():
    src = "builtin://synthetic?n_samples=40&n_features=4&n_classes=2"
    a = load_source(spec=DataSpec(source=f"{src}&seed=1"))
    b = load_source(spec=DataSpec(source=f"{src}&seed=1"))
    c = load_source(spec=DataSpec(source=f"{src}&seed=2"))
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def test_builtin_synthetic_unknown_param_is_named():
    with pytest.raises(DataError, match="unknown parameter") as info:
        load_source(spec=DataSpec(source="builtin://synthetic?n_rows=10"))
    msg = str(info.value)
    assert "n_rows" in msg
    assert "n_samples" in msg  # the fix: the valid parameter names


def test_builtin_synthetic_non_int_value():
    with pytest.raises(DataError, match="must be integers") as info:
        load_source(spec=DataSpec(source="builtin://synthetic?n_samples=ten"))
    assert "ten" in str(info.value)


@pytest.mark.parametrize(
    "query", ["n_samples=0", "n_samples=-5", "n_features=4&n_classes=8"], ids=["zero", "negative", "too-many"]
)
def test_builtin_synthetic_out_of_range_params_raise_data_error(query):
    with pytest.raises(DataError):
        load_source(spec=DataSpec(source=f"builtin://synthetic?{query}"))


def test_unknown_builtin_names_it_and_lists_choices():
    with pytest.raises(DataError, match="unknown built-in dataset") as info:
        load_source(spec=DataSpec(source="builtin://mnist"))
    msg = str(info.value)
    assert "'mnist'" in msg
    assert "digits" in msg and "synthetic" in msg


# ---------------------------------------------------------------- files


@pytest.fixture
def csv_file(tmp_path, small_df):
    path = tmp_path / "table.csv"
    small_df.to_csv(path, index=False)
    return path


@pytest.fixture
def parquet_file(tmp_path, small_df):
    path = tmp_path / "table.parquet"
    small_df.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_reads_csv_and_parquet(fmt, as_uri, csv_file, parquet_file, small_df):
    path = csv_file if fmt == "csv" else parquet_file
    source = path.as_uri() if as_uri else str(path)
    assert source.startswith("file://") == as_uri

    df = load_source(spec=DataSpec(source=source))

    assert list(df.columns) == list(small_df.columns)
    assert len(df) == len(small_df)
    np.testing.assert_allclose(
        df[["f0", "f1", "f2", "f3"]].to_numpy(), small_df.drop(columns="label"), rtol=1e-6
    )
    assert df["label"].tolist() == small_df["label"].tolist()


def test_reads_gzipped_csv(tmp_path, small_df):
    path = tmp_path / "table.csv.gz"
    path.write_bytes(gzip.compress(small_df.to_csv(index=False).encode()))
    df = load_source(spec=DataSpec(source=str(path)))
    assert df.shape == small_df.shape


def test_missing_label_column_names_it_and_the_fix(csv_file):
    with pytest.raises(DataError) as info:
        load_source(spec=DataSpec(source=str(csv_file), label="target"))
    msg = str(info.value)
    assert "'target'" in msg and "not found" in msg
    assert "f0" in msg  # lists the columns that are there
    assert "set data.label" in msg


def test_non_numeric_feature_is_named(tmp_path, small_df):
    df = small_df.assign(colour=["red", "green", "blue"] * 30)
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    with pytest.raises(DataError, match="not numeric") as info:
        load_source(spec=DataSpec(source=str(path)))
    msg = str(info.value)
    assert "'colour'" in msg
    assert "encode it as numbers or drop it" in msg


def test_bool_feature_is_rejected(small_df):
    df = small_df.assign(flag=[True, False] * 45)
    with pytest.raises(DataError, match="'flag'.*not numeric"):
        check_schema(df, label="label", source="mem")


def test_nan_feature_is_named_with_count(tmp_path, small_df):
    df = small_df.copy()
    df.loc[[3, 7], "f2"] = np.nan
    path = tmp_path / "t.parquet"
    df.to_parquet(path, index=False)
    with pytest.raises(DataError) as info:
        load_source(spec=DataSpec(source=str(path)))
    msg = str(info.value)
    assert "'f2'" in msg and "2 missing/NaN" in msg
    assert "impute or drop" in msg


def test_missing_label_value_is_rejected(small_df):
    df = small_df.astype({"label": "float64"})
    df.loc[0, "label"] = np.nan
    with pytest.raises(DataError, match="label column 'label' has missing values"):
        check_schema(df, label="label", source="mem")


def test_label_only_table_is_rejected(small_df):
    with pytest.raises(DataError, match="no feature columns"):
        check_schema(small_df[["label"]], label="label", source="mem")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(DataError) as info:
        load_source(spec=DataSpec(source=str(path)))
    msg = str(info.value)
    assert str(path) in msg and "empty" in msg
    assert "non-empty table" in msg


def test_header_only_csv_has_no_rows(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("f0,f1,label\n")
    with pytest.raises(DataError, match="no rows") as info:
        load_source(spec=DataSpec(source=str(path)))
    assert str(path) in str(info.value)


def test_file_not_found(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError) as info:
        load_source(spec=DataSpec(source=missing.as_uri()))
    msg = str(info.value)
    assert "nope.csv" in msg and "no such file" in msg
    assert "check data.source" in msg


def test_unsupported_extension(tmp_path, small_df):
    path = tmp_path / "table.json"
    small_df.to_json(path)
    with pytest.raises(DataError, match="unsupported file type") as info:
        load_source(spec=DataSpec(source=str(path)))
    msg = str(info.value)
    assert "table.json" in msg and ".csv" in msg and ".parquet" in msg


def test_malformed_parquet_is_a_data_error(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match="not a readable table") as info:
        load_source(spec=DataSpec(source=str(path)))
    assert "bad.parquet" in str(info.value)


def test_data_spec_forbids_unknown_fields():
    with pytest.raises(ValueError, match="labels"):
        DataSpec(labels="y")


# ---------------------------------------------------------------- snapshot


def test_snapshot_is_content_addressed(tmp_path, small_df):
    root = str(tmp_path / "store")
    res = snapshot(df=small_df, label="label", root=root)

    written = (tmp_path / "store" / "raw").iterdir()
    (path,) = list(written)
    data = path.read_bytes()
    assert res.sha256 == hashlib.sha256(data).hexdigest()
    assert res.uri == f"{root}/raw/{res.sha256[:16]}.parquet"
    assert path.name == f"{res.sha256[:16]}.parquet"
    assert res.rows == 90
    assert res.features == ["f0", "f1", "f2", "f3"]
    assert res.label == "label"
    pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(data)), small_df)


def test_snapshot_is_idempotent_and_written_once(tmp_path, small_df):
    root = str(tmp_path)
    first = snapshot(df=small_df, label="label", root=root)
    path = tmp_path / "raw" / f"{first.sha256[:16]}.parquet"
    before = path.stat()

    second = snapshot(df=small_df.copy(), label="label", root=root)

    assert second == first
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert len(list((tmp_path / "raw").iterdir())) == 1


def test_snapshot_differs_for_different_data(tmp_path, small_df):
    a = snapshot(df=small_df, label="label", root=str(tmp_path))
    changed = small_df.copy()
    changed.loc[0, "f0"] += 1.0
    b = snapshot(df=changed, label="label", root=str(tmp_path))
    assert a.sha256 != b.sha256 and a.uri != b.uri
    assert len(list((tmp_path / "raw").iterdir())) == 2
