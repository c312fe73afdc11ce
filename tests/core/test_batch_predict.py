"""Batch prediction on a real LocalCluster: same answers as the model, once-per-worker loading,
atomic output, clear errors."""

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import torch
from distributed import Client, LocalCluster
from safetensors.torch import save as st_save
from sklearn.datasets import load_digits

from mms_core.errors import DataError
from mms_core.models import ModelSpec, build_model
from mms_core.packaging import PackageConfig, Predictor
from mms_core.serving.offline import batch, predictors


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as c,
        Client(c) as cl,
    ):
        yield cl


@pytest.fixture(scope="module")
def package():
    digits = load_digits()
    torch.manual_seed(0)
    model = build_model(spec=ModelSpec(), in_features=64, n_classes=10)
    config = PackageConfig(
        format="fp32",
        model=ModelSpec(),
        features=[f"pixel_{i}" for i in range(64)],
        classes=list(range(10)),
        mean=digits.data.mean(0).tolist(),
        std=(digits.data.std(0) + 1).tolist(),
    )
    return config, st_save({k: v.contiguous() for k, v in model.state_dict().items()})


@pytest.fixture
def table(tmp_path):
    digits = load_digits()
    df = pd.DataFrame(digits.data.astype(np.float32), columns=[f"pixel_{i}" for i in range(64)])
    df.insert(0, "image_id", [f"img-{i:04d}" for i in range(len(df))])
    uri = str(tmp_path / "in")
    dd.from_pandas(df, npartitions=6).to_parquet(uri, write_index=False)
    return uri, df


def test_predictions_equal_the_models_and_each_worker_loads_once(client, package, table, tmp_path):
    config, weights = package
    uri, df = table
    out = str(tmp_path / "out")
    result = batch.predict_table(
        client=client,
        config=config,
        weights=weights,
        model_version="7",
        input_uri=uri,
        output_uri=out,
        id_column="image_id",
        probabilities=True,
    )
    got = pd.read_parquet(out)
    direct = Predictor(config=config, weights=weights)
    assert result.rows == len(df) == len(got) and result.partitions == 6
    assert got["id"].tolist() == df["image_id"].tolist()
    assert (got["prediction"].to_numpy() == direct.predict(df)).all()
    proba = got[[f"prob_{c}" for c in range(10)]].to_numpy()
    np.testing.assert_allclose(proba, direct.predict_proba(df), rtol=1e-5, atol=1e-6)
    # 6 partitions on 2 workers: at most one model build per worker process (the shared cache)
    assert sorted(client.run(lambda: len(predictors._PREDICTORS)).values()) in ([1, 1], [0, 1])
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_existing_output_and_missing_columns_fail_clearly_and_write_nothing(client, package, table, tmp_path):
    config, weights = package
    uri, df = table
    bad = str(tmp_path / "bad.csv")
    df.drop(columns=["pixel_5"]).to_csv(bad, index=False)
    out = tmp_path / "out2"
    with pytest.raises(DataError, match=r"missing column\(s\) \['pixel_5'\]"):
        batch.predict_table(
            client=client,
            config=config,
            weights=weights,
            model_version="1",
            input_uri=bad,
            output_uri=str(out),
        )
    assert not out.exists()
    out.mkdir()
    with pytest.raises(DataError, match="already exists"):
        batch.predict_table(
            client=client,
            config=config,
            weights=weights,
            model_version="1",
            input_uri=uri,
            output_uri=str(out),
        )
