"""Loading a package is a code trust boundary: only the zoo and MMS_TRUSTED_MODEL_MODULES are
imported, kwargs must fit the builder, weights must match the recorded sha256. A run training or
registering its own user model needs no setting."""

import json
import logging
import os
import sys
import textwrap
import uuid

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from mms_core import registry, steps, storage
from mms_core.data.shard import load_manifest, read_shard
from mms_core.errors import ModelLoadError
from mms_core.models import ModelSpec, build_model, trusted_modules, trusting
from mms_core.models.zoo import TRUSTED_ENV, is_trusted, resolve_builder
from mms_core.packaging import CONFIG, WEIGHTS, PackageConfig, Predictor, write_package
from mms_core.training.checkpoint import state_bytes
from mms_core.training.loop import train_rank
from mms_core.training.spec import TrainJob, TrainSpec

IN, OUT, WIDTH = 6, 3, 5


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    """A package ``<pkg>.models`` on sys.path whose import (and each build) leaves a marker file.

    Returns (package name, marker dir). The operator setting starts unset.
    """
    monkeypatch.delenv(TRUSTED_ENV, raising=False)
    pkg = f"mms_trust_{uuid.uuid4().hex[:8]}"
    markers = tmp_path / "markers"
    markers.mkdir()
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / pkg / "models.py").write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path
            from torch import nn

            MARKERS = Path({str(markers)!r})
            (MARKERS / "imported").write_text("the module ran")

            def build(*, in_features, n_classes, width=12):
                (MARKERS / "built").write_text("the builder ran")
                return nn.Sequential(nn.Linear(in_features, width), nn.Tanh(), nn.Linear(width, n_classes))

            def needs_depth(*, in_features, n_classes, depth):
                (MARKERS / "built").write_text("the builder ran")
                return nn.Linear(in_features, n_classes)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield pkg, markers
    for name in (f"{pkg}.models", pkg):
        sys.modules.pop(name, None)


def _package(name: str, *, kwargs: dict | None = None) -> tuple[PackageConfig, bytes]:
    """A config naming ``name`` and weights of the same shape, made without importing ``name``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, OUT))
    config = PackageConfig(
        format="fp32",
        model=ModelSpec(name=name, kwargs={"width": WIDTH} if kwargs is None else kwargs),
        features=[f"f{i}" for i in range(IN)],
        classes=list(range(OUT)),
        mean=[0.0] * IN,
        std=[1.0] * IN,
    )
    return config, state_bytes(net)


def test_untrusted_module_is_refused_before_any_import(user_pkg):
    pkg, markers = user_pkg
    config, weights = _package(f"{pkg}.models:build")
    with pytest.raises(ModelLoadError) as info:
        Predictor(config=config, weights=weights)
    msg = str(info.value)
    assert f"'{pkg}.models:build' is not trusted" in msg
    assert f"add '{pkg}.models' to MMS_TRUSTED_MODEL_MODULES" in msg
    assert not (markers / "imported").exists() and not (markers / "built").exists()
    assert f"{pkg}.models" not in sys.modules and pkg not in sys.modules


@pytest.mark.parametrize("setting", ["{pkg}.models", "{pkg}", "other.models, {pkg} ,"])
def test_module_listed_by_the_operator_loads(user_pkg, monkeypatch, tmp_path, setting):
    pkg, markers = user_pkg
    monkeypatch.setenv(TRUSTED_ENV, setting.format(pkg=pkg))
    config, weights = _package(f"{pkg}.models:build")
    predictor = Predictor.from_directory(
        write_package(directory=tmp_path / "p", config=config, weights=weights)
    )
    assert (markers / "built").exists()
    x = np.random.default_rng(0).normal(size=(4, IN)).astype(np.float32)
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, OUT)).eval()
    assert torch.allclose(predictor.logits_array(x), reference(torch.from_numpy(x)))


def test_prefix_matches_whole_package_names_only():
    assert is_trusted("mypkg.models", trusted=["mypkg"])
    assert is_trusted("mypkg", trusted=["mypkg"])
    assert not is_trusted("mypkgevil.models", trusted=["mypkg"])
    assert not is_trusted("mypkg", trusted=["mypkg.models"])
    assert not is_trusted("os", trusted=[])


def test_zoo_loads_with_an_empty_list_and_explicit_trusted_overrides_the_setting(user_pkg, monkeypatch):
    pkg, markers = user_pkg
    assert resolve_builder("gpt", trusted=()).__name__ == "gpt"
    monkeypatch.setenv(TRUSTED_ENV, pkg)
    config, weights = _package(f"{pkg}.models:build")
    with pytest.raises(ModelLoadError, match="is not trusted"):
        Predictor(config=config, weights=weights, trusted=["something.else"])
    assert not (markers / "imported").exists()


def test_setting_is_read_from_the_environment_at_each_load(monkeypatch):
    monkeypatch.setenv(TRUSTED_ENV, "a.b, c")
    assert trusted_modules() == ("a.b", "c")
    monkeypatch.setenv(TRUSTED_ENV, "evil.mod:build")
    with pytest.raises(ModelLoadError, match="not a module name"):
        trusted_modules()
    monkeypatch.delenv(TRUSTED_ENV)
    assert trusted_modules() == ()


def test_trusting_block_extends_the_list_only_inside_it(user_pkg):
    pkg, _ = user_pkg
    config, weights = _package(f"{pkg}.models:build")
    with trusting(modules=[pkg]):
        assert pkg in trusted_modules()
        Predictor(config=config, weights=weights)
    assert trusted_modules() == ()
    with pytest.raises(ModelLoadError, match="is not trusted"):
        Predictor(config=config, weights=weights)


def test_unknown_and_missing_kwargs_are_refused_by_name(user_pkg, monkeypatch):
    pkg, markers = user_pkg
    monkeypatch.setenv(TRUSTED_ENV, pkg)
    config, weights = _package("mlp", kwargs={"hiden": [8], "dropout": 0.0})
    with pytest.raises(ModelLoadError) as info:
        Predictor(config=config, weights=weights)
    assert "unknown ['hiden']" in str(info.value) and "'hidden'" in str(info.value)
    config, weights = _package(f"{pkg}.models:needs_depth", kwargs={})
    with pytest.raises(ModelLoadError) as info:
        Predictor(config=config, weights=weights)
    assert "missing ['depth']" in str(info.value)
    assert not (markers / "built").exists()  # refused before the builder was called


def test_tampered_weights_fail_and_unhashed_packages_load(tmp_path):
    config, _ = _package("mlp", kwargs={"hidden": [WIDTH], "dropout": 0.0})
    weights = state_bytes(build_model(spec=config.model, in_features=IN, n_classes=OUT))
    pkg = write_package(directory=tmp_path / "pkg", config=config, weights=weights)
    recorded = json.loads((pkg / CONFIG).read_text())["weights_sha256"]
    assert recorded == storage.sha256_bytes(weights)
    Predictor.from_directory(pkg)

    torch.manual_seed(1)
    other = state_bytes(build_model(spec=config.model, in_features=IN, n_classes=OUT))
    (pkg / WEIGHTS).write_bytes(other)
    with pytest.raises(ModelLoadError) as info:
        Predictor.from_directory(pkg)
    msg = str(info.value)
    assert "'mlp' (fp32)" in msg and recorded in msg and storage.sha256_bytes(other) in msg

    legacy = json.loads((pkg / CONFIG).read_text())
    del legacy["weights_sha256"]  # a version registered before packages recorded the hash
    (pkg / CONFIG).write_text(json.dumps(legacy))
    assert Predictor.from_directory(pkg).config.weights_sha256 is None


def test_write_package_refuses_a_config_made_for_other_weights(tmp_path):
    config, weights = _package("mlp")
    with pytest.raises(ValueError, match="records weights sha256"):
        write_package(
            directory=tmp_path / "p",
            config=config.model_copy(update={"weights_sha256": "0" * 64}),
            weights=weights,
        )


def test_training_run_builds_its_own_user_model_without_the_setting(user_pkg, digits_manifest, tmp_path):
    pkg, markers = user_pkg
    spec = ModelSpec(name=f"{pkg}.models:build", kwargs={"width": 16})
    manifest_uri = digits_manifest(2)
    steps.check_model(spec=spec)
    job = TrainJob(
        manifest_uri=manifest_uri,
        model=spec,
        train=TrainSpec(epochs=1, checkpoint_every=0),
        output_uri=f"{tmp_path}/model/model.safetensors",
        checkpoint_uri=f"{tmp_path}/ckpt",
    )
    weights_uri = train_rank(job=job, rank=0, world_size=1).weights_uri
    assert (markers / "built").exists()
    result = steps.evaluate_trained(manifest_uri=manifest_uri, model=spec, weights_uri=weights_uri)
    assert 0.0 <= result.accuracy <= 1.0
    assert os.environ.get(TRUSTED_ENV) is None


@pytest.fixture
def tracking(tmp_path, global_tracking_uri):
    """A fresh MLflow sqlite store; the global tracking URI is put back afterwards."""
    with global_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db") as uri:
        yield uri, (tmp_path / "artifacts").as_uri()


def test_run_registers_its_user_model_but_loading_it_needs_the_setting(
    user_pkg, digits_manifest, tracking, monkeypatch, caplog
):
    pkg, _ = user_pkg
    uri, artifacts = tracking
    manifest = load_manifest(digits_manifest(2))
    spec = ModelSpec(name=f"{pkg}.models:build", kwargs={"width": 16})
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    x, _ = read_shard(manifest.test)
    example = pd.DataFrame(x[:3] * manifest.std + manifest.mean, columns=manifest.features).astype(np.float32)
    exp = registry.ensure_experiment(tracking_uri=uri, name="exp-trust", artifact_root=artifacts)
    run_id = registry.start_run(tracking_uri=uri, experiment_id=exp, run_name="own", tags={}, params={})
    mlflow_logger = logging.getLogger("mlflow")  # MLflow's loggers do not propagate to caplog's root handler
    mlflow_logger.addHandler(caplog.handler)
    try:
        version = registry.register_package(
            tracking_uri=uri,
            run_id=run_id,
            name="trust-model",
            config=PackageConfig.from_manifest(manifest, model=spec, format="fp32"),
            weights=state_bytes(net),
            example=example,
            tags={registry.TAG_VARIANT: "fp32"},
        )
    finally:
        mlflow_logger.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if "not trusted" in r.getMessage()]  # MLflow's check loaded it
    assert trusted_modules() == ()

    config, weights, _ = registry.load_package(tracking_uri=uri, model=f"trust-model/{version}")
    assert config.weights_sha256 == storage.sha256_bytes(weights)
    with pytest.raises(ModelLoadError, match="MMS_TRUSTED_MODEL_MODULES"):
        Predictor(config=config, weights=weights)
    monkeypatch.setenv(TRUSTED_ENV, pkg)
    assert Predictor(config=config, weights=weights).predict(example).shape == (3,)
