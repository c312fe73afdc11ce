"""mms_core.spec: YAML specs, --set overrides, validation errors, spec hashes."""

from pathlib import Path

import pytest
import yaml

from mms_core.errors import SpecError
from mms_core.spec import PipelineSpec, load_spec
from mms_core.tuning.space import load_tuning

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"digits.yaml", "synthetic.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_loads(path):
    raw = yaml.safe_load(path.read_text())
    if "tuning" in raw:  # a study: `mms tune` reads it, `mms run` says so
        with pytest.raises(SpecError, match="mms tune"):
            load_spec(path)
        spec, tune = load_tuning(path)
        assert tune.trials == raw["tuning"]["trials"] and set(tune.params) == set(raw["tuning"]["params"])
    else:
        spec = load_spec(path)

    assert isinstance(spec, PipelineSpec)
    assert spec.name == raw["name"]
    assert spec.data.source == raw["data"]["source"]
    dumped = spec.training.model_dump()
    for key, value in raw["training"].items():  # every field the file sets, nested sections too
        expected = value if not isinstance(value, dict) else {**dumped[key], **value}
        assert dumped[key] == expected, key
    assert spec.registry.model_name == raw["registry"]["model_name"]


def test_digits_example_values():
    spec = load_spec(next(p for p in EXAMPLES if p.name == "digits.yaml"))
    assert spec.preprocess.n_shards == 4
    assert spec.model.name == "mlp" and spec.model.kwargs == {"hidden": [256, 128], "dropout": 0.1}
    assert spec.training.lr == pytest.approx(0.002)
    assert spec.evaluate.min_accuracy == pytest.approx(0.95)


def test_defaults_without_a_file():
    spec = load_spec()
    assert spec == PipelineSpec()
    assert spec.data.source == "builtin://digits"


def test_override_replaces_yaml_value(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: run\ntraining:\n  epochs: 30\n  batch_size: 16\n")
    spec = load_spec(path, overrides=["training.epochs=3"])
    assert spec.training.epochs == 3
    assert spec.training.batch_size == 16  # siblings are kept


def test_overrides_are_typed_via_yaml():
    spec = load_spec(
        overrides=[
            "training.epochs=7",
            "training.lr=0.05",
            "preprocess.standardize=false",
            "model.kwargs.hidden=[32, 16]",
            "name=my-run",
        ]
    )
    assert spec.training.epochs == 7 and type(spec.training.epochs) is int
    assert spec.training.lr == pytest.approx(0.05) and type(spec.training.lr) is float
    assert spec.preprocess.standardize is False
    assert spec.model.kwargs == {"hidden": [32, 16]}
    assert spec.name == "my-run"


def test_override_creates_nested_new_keys():
    spec = load_spec(
        overrides=[
            "data.storage_options.endpoint_url=http://127.0.0.1:9000",
            "model.kwargs.dropout=0.25",
            "model.kwargs.extra.depth=2",
        ]
    )
    options = {k: v.get_secret_value() for k, v in spec.data.storage_options.items()}  # SecretStr values
    assert options == {"endpoint_url": "http://127.0.0.1:9000"}
    assert spec.model.kwargs == {"dropout": 0.25, "extra": {"depth": 2}}


def test_override_value_may_contain_equals_signs():
    src = "builtin://synthetic?n_samples=100&n_features=8"
    spec = load_spec(overrides=[f"data.source={src}"])
    assert spec.data.source == src


def test_later_override_wins():
    assert load_spec(overrides=["training.epochs=2", "training.epochs=9"]).training.epochs == 9


@pytest.mark.parametrize("bad", ["foo", "=3", "training.epochs"])
def test_malformed_override(bad):
    with pytest.raises(SpecError) as info:
        load_spec(overrides=[bad])
    msg = str(info.value)
    assert repr(bad) in msg
    assert "section.key=value" in msg and "training.epochs=5" in msg


@pytest.mark.parametrize("bad", ["training.lr=[", "name=a: b: c"])
def test_unparsable_override_value_is_a_spec_error(bad):
    with pytest.raises(SpecError, match=bad.split("=")[0]):
        load_spec(overrides=[bad])


def test_override_into_a_scalar_is_a_spec_error(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("training:\n  epochs: 30\n")
    with pytest.raises(SpecError, match="cannot set training.epochs.x: epochs is not a section"):
        load_spec(path, overrides=["training.epochs.x=1"])


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("training.epochs_total=3", "training.epochs_total"),
        ("trainig.epochs=3", "trainig"),
        ("data.labels=y", "data.labels"),
    ],
)
def test_unknown_key_names_the_field(override, field):
    with pytest.raises(SpecError) as info:
        load_spec(overrides=[override])
    msg = str(info.value)
    assert f"{field}:" in msg
    assert "Extra inputs are not permitted" in msg


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("training.epochs=0", "training.epochs"),
        ("training.epochs=many", "training.epochs"),
        ("training.optimizer=lbfgs", "training.optimizer"),
        ("training.lr=-1", "training.lr"),
        ("preprocess.val_fraction=1.5", "preprocess.val_fraction"),
        ("registry.model_name=has space", "registry.model_name"),
    ],
)
def test_invalid_value_names_the_field(override, field):
    with pytest.raises(SpecError, match="invalid spec") as info:
        load_spec(overrides=[override])
    assert f"{field}:" in str(info.value)


def test_invalid_value_in_file_names_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("preprocess:\n  val_fraction: 0.5\n  test_fraction: 0.45\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    msg = str(info.value)
    assert str(path) in msg and "preprocess" in msg and "10% of rows for training" in msg


def test_unreadable_and_non_mapping_files(tmp_path):
    with pytest.raises(SpecError, match="cannot read spec .*missing.yaml"):
        load_spec(tmp_path / "missing.yaml")

    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="cannot read spec .*broken.yaml"):
        load_spec(broken)

    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="must be a YAML mapping, got list"):
        load_spec(listy)


def test_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_spec(path) == PipelineSpec()


def test_hash_is_stable_and_tracks_changes(tmp_path):
    a = load_spec(overrides=["training.epochs=3"])
    b = load_spec(overrides=["training.epochs=3"])
    assert a.hash == b.hash
    assert len(a.hash) == 64

    # the same content written differently (key order, file vs override) hashes the same
    path = tmp_path / "s.yaml"
    path.write_text("registry: {experiment: mms}\ntraining: {epochs: 3}\n")
    assert load_spec(path).hash == a.hash

    assert load_spec(overrides=["training.epochs=4"]).hash != a.hash
    assert load_spec(overrides=["training.epochs=3", "model.kwargs.dropout=0.2"]).hash != a.hash
    assert load_spec(overrides=["training.epochs=3", "data.label=y"]).hash != a.hash


def test_spec_is_frozen():
    spec = load_spec()
    with pytest.raises(ValueError, match="frozen"):
        spec.name = "other"
