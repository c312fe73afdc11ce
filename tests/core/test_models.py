"""mms_core.models.zoo: built-in models and user models by 'pkg.module:build_fn'."""

import pytest
import torch
from torch import nn

from mms_core.errors import ModelLoadError
from mms_core.models import ModelSpec, build_model
from mms_core.models.zoo import ZOO, resolve_builder


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_zoo_models_map_digits_features_to_logits(name):
    torch.manual_seed(0)
    model = build_model(spec=ModelSpec(name=name), in_features=64, n_classes=10)
    assert isinstance(model, nn.Module)
    out = model(torch.randn(5, 64))
    assert out.shape == (5, 10)
    assert torch.isfinite(out).all()


def test_mlp_hidden_list_from_yaml_is_honoured():
    model = build_model(
        spec=ModelSpec(name="mlp", kwargs={"hidden": [32, 16], "dropout": 0.0}), in_features=8, n_classes=3
    )
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 32), (32, 16), (16, 3)]
    assert model(torch.zeros(2, 8)).shape == (2, 3)


def test_cnn_kwargs_and_other_square_sizes():
    model = build_model(
        spec=ModelSpec(name="cnn", kwargs={"channels": 4, "hidden": 8}), in_features=16, n_classes=2
    )
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8]
    assert model(torch.randn(3, 16)).shape == (3, 2)


@pytest.mark.parametrize("in_features", [63, 10, 2])
def test_cnn_rejects_non_square_features(in_features):
    with pytest.raises(ModelLoadError) as info:
        build_model(spec=ModelSpec(name="cnn"), in_features=in_features, n_classes=10)
    msg = str(info.value)
    assert "square number of features" in msg and f"got {in_features}" in msg
    assert "use 'mlp'" in msg


def test_user_model_by_import_path(user_module):
    model = build_model(
        spec=ModelSpec(name=f"{user_module}:build", kwargs={"width": 5}), in_features=7, n_classes=4
    )
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [5, 4]
    assert model(torch.randn(2, 7)).shape == (2, 4)
    assert resolve_builder(f"{user_module}:build").__module__ == user_module


def test_zoo_names_resolve_to_zoo_builders():
    assert resolve_builder("mlp") is ZOO["mlp"]
    assert resolve_builder("cnn") is ZOO["cnn"]


def test_unknown_zoo_name():
    with pytest.raises(ModelLoadError) as info:
        build_model(spec=ModelSpec(name="transformer"), in_features=64, n_classes=10)
    msg = str(info.value)
    assert "'transformer'" in msg
    assert "cnn" in msg and "mlp" in msg and "pkg.module:build_fn" in msg


def test_missing_module_says_install_or_pythonpath():
    with pytest.raises(ModelLoadError) as info:
        resolve_builder("mms_no_such_pkg_xyz.models:build")
    msg = str(info.value)
    assert "'mms_no_such_pkg_xyz.models'" in msg
    assert "install the package or add it to PYTHONPATH" in msg


@pytest.mark.parametrize("attr", ["nope", "NOT_CALLABLE"])
def test_missing_or_non_callable_attribute(user_module, attr):
    with pytest.raises(ModelLoadError) as info:
        resolve_builder(f"{user_module}:{attr}")
    msg = str(info.value)
    assert f"module {user_module!r} has no callable {attr!r}" in msg


def test_builder_returning_non_module(user_module):
    with pytest.raises(ModelLoadError) as info:
        build_model(spec=ModelSpec(name=f"{user_module}:not_a_module"), in_features=4, n_classes=2)
    msg = str(info.value)
    assert "not_a_module" in msg and "returned dict" in msg and "torch.nn.Module" in msg


@pytest.mark.parametrize("name_fmt", ["mlp", "{mod}:strict"])
def test_builder_rejecting_kwargs(user_module, name_fmt):
    name = name_fmt.format(mod=user_module)
    with pytest.raises(ModelLoadError) as info:
        build_model(spec=ModelSpec(name=name, kwargs={"bogus": 1}), in_features=4, n_classes=2)
    msg = str(info.value)
    assert repr(name) in msg and "rejected its arguments ['bogus']" in msg


@pytest.mark.parametrize("name", [":build", ".relative_mod:build"])
def test_malformed_import_path_is_a_model_load_error(name):
    with pytest.raises(ModelLoadError):
        resolve_builder(name)


def test_model_spec_forbids_unknown_fields():
    with pytest.raises(ValueError, match="kwarg"):
        ModelSpec(name="mlp", kwarg={})


def test_trusted_list_refuses_unlisted_modules_before_importing_them(user_module):
    with pytest.raises(ModelLoadError, match="MMS_TRUSTED_MODEL_MODULES"):
        resolve_builder(f"{user_module}:build", trusted=["some_other_pkg"])
    assert user_module not in __import__("sys").modules
    assert resolve_builder(f"{user_module}:build", trusted=[user_module]).__module__ == user_module
    assert resolve_builder("mlp", trusted=()) is ZOO["mlp"]


def test_kwargs_are_bound_to_the_signature_before_the_call(user_module):
    with pytest.raises(ModelLoadError) as info:
        build_model(
            spec=ModelSpec(name=f"{user_module}:build", kwargs={"widht": 3}), in_features=4, n_classes=2
        )
    msg = str(info.value)
    assert "unknown ['widht']" in msg and "missing" not in msg and "accepts ['width']" in msg
