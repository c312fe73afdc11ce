"""mms_core.data.shard: seeded split, train-only scaling, checksummed shards, content-addressed manifests."""

import hashlib
import io

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from mms_core.data.ingest import snapshot
from mms_core.data.shard import (
    LABEL_COLUMN,
    ShardSpec,
    load_manifest,
    preprocess_and_shard,
    read_shard,
    shard_key,
    shards_for_rank,
    verify,
)
from mms_core.errors import CorruptShardError, DataError


@pytest.fixture
def raw(tmp_path, small_df):
    """An ingested snapshot of ``small_df`` (90 rows, 4 features, 3 classes)."""
    return snapshot(df=small_df, label="label", root=str(tmp_path))


def _shard(raw, root, **spec):
    return preprocess_and_shard(
        raw_uri=raw.uri, source_sha256=raw.sha256, label="label", spec=ShardSpec(**spec), root=str(root)
    )


def _all_infos(m):
    return [*m.train, m.val, m.test]


def test_manifest_contents(tmp_path, raw, small_df):
    uri = _shard(raw, tmp_path, n_shards=3, seed=5)
    m = load_manifest(uri)

    assert uri.endswith("/manifest.json") and f"/shards/{m.key[:16]}/" in uri
    assert m.source_sha256 == raw.sha256
    assert m.label == "label"
    assert m.features == ["f0", "f1", "f2", "f3"]
    assert m.classes == [0, 1, 2]
    assert m.spec == ShardSpec(n_shards=3, seed=5)
    assert len(m.train) == 3
    assert sum(i.rows for i in _all_infos(m)) == len(small_df)
    assert m.test.rows == round(90 * 0.15) and m.val.rows == round(90 * 0.15)

    for info in _all_infos(m):
        path = info.uri
        with open(path, "rb") as f:
            data = f.read()
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        x, y = read_shard(info)
        assert x.shape == (info.rows, 4) and x.dtype == np.float32
        assert y.shape == (info.rows,) and y.dtype == np.int64
        assert set(y.tolist()) <= {0, 1, 2}

    shard_files = sorted(p.name for p in (tmp_path / "shards" / m.key[:16]).iterdir())
    assert shard_files == [
        "manifest.json",
        "test.parquet",
        "train-00000.parquet",
        "train-00001.parquet",
        "train-00002.parquet",
        "val.parquet",
    ]


def _original_rows(m, info, small_df):
    """Undo the scaling and return the indices of the ``small_df`` rows that one shard holds."""
    x, y = read_shard(info)
    orig = x * np.asarray(m.std, np.float32) + np.asarray(m.mean, np.float32)
    table = small_df.drop(columns="label").to_numpy()
    dist = np.abs(orig[:, None, :] - table[None, :, :]).max(axis=2)
    idx = dist.argmin(axis=1)
    assert dist[np.arange(len(idx)), idx].max() < 1e-3  # every shard row is an input row
    assert (small_df["label"].to_numpy()[idx] == y).all()  # with its own label (classes are 0..2)
    return set(idx.tolist())


def test_splits_are_disjoint_cover_all_rows_and_are_seeded(tmp_path, raw, small_df):
    m = load_manifest(_shard(raw, tmp_path / "a", n_shards=2, seed=3))
    parts = [_original_rows(m, i, small_df) for i in _all_infos(m)]

    assert set().union(*parts) == set(range(90))
    assert sum(len(p) for p in parts) == 90  # disjoint
    assert [len(p) for p in parts] == [i.rows for i in _all_infos(m)]

    same = load_manifest(_shard(raw, tmp_path / "b", n_shards=2, seed=3))
    assert _original_rows(same, same.test, small_df) == parts[-1]

    other = load_manifest(_shard(raw, tmp_path / "c", n_shards=2, seed=4))
    assert _original_rows(other, other.test, small_df) != parts[-1]


def test_scaler_is_fitted_on_train_only(tmp_path, raw, small_df):
    m = load_manifest(_shard(raw, tmp_path, n_shards=2))
    train = np.concatenate([read_shard(i)[0] for i in m.train])

    np.testing.assert_allclose(train.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(train.std(axis=0), 1.0, atol=1e-4)

    # mean/std are those of the training rows, not of the whole table
    x_train_orig = train * np.asarray(m.std) + np.asarray(m.mean)
    np.testing.assert_allclose(m.mean, x_train_orig.mean(axis=0), rtol=1e-4)
    full_mean = small_df.drop(columns="label").to_numpy().mean(axis=0)
    assert not np.allclose(m.mean, full_mean, rtol=0, atol=1e-6)
    # val/test are scaled with the train stats, so they are not exactly standardised
    val = read_shard(m.val)[0]
    assert not np.allclose(val.mean(axis=0), 0.0, atol=1e-4)


def test_standardize_false_leaves_features_unscaled(tmp_path, raw, small_df):
    m = load_manifest(_shard(raw, tmp_path, n_shards=1, standardize=False))
    assert m.mean == [0.0] * 4 and m.std == [1.0] * 4
    train_x = read_shard(m.train[0])[0]
    assert train_x.mean() > 5  # raw features are centred around 10..40


def test_constant_column_is_not_divided_by_zero(tmp_path, small_df):
    df = small_df.assign(const=np.float32(7.0))
    r = snapshot(df=df, label="label", root=str(tmp_path))
    m = load_manifest(_shard(r, tmp_path, n_shards=1))
    assert m.std[-1] == 1.0
    x = np.concatenate([read_shard(i)[0] for i in _all_infos(m)])
    assert np.isfinite(x).all()
    np.testing.assert_allclose(x[:, -1], 0.0)


def test_string_labels_are_mapped_to_class_indices(tmp_path, small_df):
    df = small_df.assign(label=small_df["label"].map({0: "cat", 1: "dog", 2: "eel"}))
    r = snapshot(df=df, label="label", root=str(tmp_path))
    m = load_manifest(_shard(r, tmp_path, n_shards=1))
    assert m.classes == ["cat", "dog", "eel"]
    ys = np.concatenate([read_shard(i)[1] for i in _all_infos(m)])
    assert sorted(set(ys.tolist())) == [0, 1, 2]
    assert np.bincount(ys).tolist() == [30, 30, 30]


def test_same_input_and_config_reuse_manifest_and_do_not_rewrite(tmp_path, raw):
    uri = _shard(raw, tmp_path, n_shards=2, seed=1)
    m = load_manifest(uri)
    files = sorted((tmp_path / "shards" / m.key[:16]).iterdir())
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}

    again = _shard(raw, tmp_path, n_shards=2, seed=1)

    assert again == uri
    assert load_manifest(again).hash == m.hash
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}
    assert after == before


def test_same_input_and_config_give_same_manifest_hash_in_a_fresh_root(tmp_path, raw):
    a = load_manifest(_shard(raw, tmp_path / "x", n_shards=2, seed=1))
    b = load_manifest(_shard(raw, tmp_path / "x2", n_shards=2, seed=1))
    assert a.key == b.key
    assert [i.sha256 for i in _all_infos(a)] == [i.sha256 for i in _all_infos(b)]
    # URIs differ only by root
    assert a.model_dump(exclude={"train", "val", "test"}) == b.model_dump(exclude={"train", "val", "test"})


def test_different_seed_or_config_gives_a_different_key(tmp_path, raw):
    base = dict(source_sha256=raw.sha256, label="label")
    k0 = shard_key(**base, spec=ShardSpec(seed=0))
    assert k0 == shard_key(**base, spec=ShardSpec(seed=0))
    assert k0 != shard_key(**base, spec=ShardSpec(seed=1))
    assert k0 != shard_key(**base, spec=ShardSpec(n_shards=5))
    assert k0 != shard_key(source_sha256="0" * 64, label="label", spec=ShardSpec())

    u0 = _shard(raw, tmp_path, n_shards=2, seed=0)
    u1 = _shard(raw, tmp_path, n_shards=2, seed=1)
    assert u0 != u1
    assert load_manifest(u0).hash != load_manifest(u1).hash


def test_corrupt_shard_is_detected_with_uri_and_fix(tmp_path, raw):
    m = load_manifest(_shard(raw, tmp_path, n_shards=2))
    victim = m.train[1]
    with open(victim.uri, "r+b") as f:
        f.seek(20)
        byte = f.read(1)
        f.seek(20)
        f.write(bytes([byte[0] ^ 0xFF]))

    with pytest.raises(CorruptShardError) as info:
        read_shard(victim)
    msg = str(info.value)
    assert victim.uri in msg and "corrupt" in msg
    assert "delete its shard directory and re-run to rebuild it" in msg
    assert isinstance(info.value, DataError)

    with pytest.raises(CorruptShardError, match="train-00001"):
        verify(m)
    read_shard(m.train[0])  # the other shards are fine


def test_missing_shard_file(tmp_path, raw):
    m = load_manifest(_shard(raw, tmp_path, n_shards=2))
    (tmp_path / "shards" / m.key[:16] / "val.parquet").unlink()
    with pytest.raises(CorruptShardError) as info:
        verify(m)
    msg = str(info.value)
    assert m.val.uri in msg and "missing" in msg
    assert "re-run to rebuild" in msg


def test_missing_manifest(tmp_path):
    uri = str(tmp_path / "shards" / "abc" / "manifest.json")
    with pytest.raises(DataError, match="not found; run the preprocess step first") as info:
        load_manifest(uri)
    assert uri in str(info.value)


def test_shards_for_rank_round_robin(tmp_path, raw):
    m = load_manifest(_shard(raw, tmp_path, n_shards=5))
    assigned = [shards_for_rank(m, rank=r, world_size=2) for r in range(2)]

    assert [i.uri.rsplit("/", 1)[-1] for i in assigned[0]] == [
        "train-00000.parquet",
        "train-00002.parquet",
        "train-00004.parquet",
    ]
    assert [i.uri.rsplit("/", 1)[-1] for i in assigned[1]] == ["train-00001.parquet", "train-00003.parquet"]
    assert shards_for_rank(m, rank=0, world_size=1) == m.train
    all_uris = [i.uri for part in assigned for i in part]
    assert sorted(all_uris) == sorted(i.uri for i in m.train)


def test_shards_for_rank_needs_enough_shards(tmp_path, raw):
    m = load_manifest(_shard(raw, tmp_path, n_shards=2))
    with pytest.raises(DataError) as info:
        shards_for_rank(m, rank=0, world_size=3)
    msg = str(info.value)
    assert "2 training shards cannot feed 3 workers" in msg
    assert "set preprocess.n_shards >= 3" in msg


@pytest.mark.parametrize(("val", "test"), [(0.45, 0.45), (0.5, 0.45), (0.3, 0.65), (0.89, 0.05)])
def test_shard_spec_rejects_too_little_training_data(val, test):
    with pytest.raises(ValidationError, match="leave at least 10% of rows for training"):
        ShardSpec(val_fraction=val, test_fraction=test)


def test_shard_spec_accepts_just_under_the_limit_and_forbids_extras():
    assert ShardSpec(val_fraction=0.4, test_fraction=0.4).val_fraction == 0.4
    with pytest.raises(ValidationError, match="n_shard"):
        ShardSpec(n_shard=2)
    with pytest.raises(ValidationError, match="n_shards"):
        ShardSpec(n_shards=0)


def test_single_class_label_is_a_data_error(tmp_path, small_df):
    r = snapshot(df=small_df.assign(label=1), label="label", root=str(tmp_path))
    with pytest.raises(DataError) as info:
        _shard(r, tmp_path)
    msg = str(info.value)
    assert "single class" in msg and "'label'" in msg and "at least two" in msg
    assert not (tmp_path / "shards").exists() or not any((tmp_path / "shards").rglob("manifest.json"))


def test_too_few_training_rows_for_shards(tmp_path, small_df):
    r = snapshot(df=small_df.head(6), label="label", root=str(tmp_path))
    with pytest.raises(DataError, match="training rows cannot fill 8 shards"):
        _shard(r, tmp_path, n_shards=8)


def test_label_column_with_another_name(tmp_path, small_df):
    df = small_df.rename(columns={"label": "target"})
    r = snapshot(df=df, label="target", root=str(tmp_path))
    uri = preprocess_and_shard(
        raw_uri=r.uri, source_sha256=r.sha256, label="target", spec=ShardSpec(n_shards=1), root=str(tmp_path)
    )
    m = load_manifest(uri)
    assert m.label == "target" and m.features == ["f0", "f1", "f2", "f3"]
    x, y = read_shard(m.train[0])
    assert x.shape[1] == 4 and set(y.tolist()) <= {0, 1, 2}


def test_feature_named_label_is_not_clobbered(tmp_path, small_df):
    df = small_df.rename(columns={"label": "target"}).assign(
        label=np.linspace(100, 200, 90, dtype=np.float32)
    )
    r = snapshot(df=df, label="target", root=str(tmp_path))
    try:
        uri = preprocess_and_shard(
            raw_uri=r.uri,
            source_sha256=r.sha256,
            label="target",
            spec=ShardSpec(n_shards=1),
            root=str(tmp_path),
        )
    except DataError as exc:  # refusing the ambiguous column name with a clear message is also fine
        assert "'label'" in str(exc)
        return
    m = load_manifest(uri)
    x, _ = read_shard(m.train[0])
    assert x.shape[1] == len(m.features) == 5


def test_shard_parquet_layout(tmp_path, raw):
    """Shards are plain Parquet: feature columns named as in the manifest, plus the int label column."""
    m = load_manifest(_shard(raw, tmp_path, n_shards=1))
    with open(m.val.uri, "rb") as f:
        df = pd.read_parquet(io.BytesIO(f.read()))
    assert list(df.columns) == [*m.features, LABEL_COLUMN]
    assert len(df) == m.val.rows
