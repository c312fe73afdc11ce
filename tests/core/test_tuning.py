"""mms_core.tuning: search-space checks before anything runs, and studies whose trials run in
parallel on a real Dask LocalCluster (pruning, crashed trials, a re-run that continues)."""

import json
import math

import optuna
import pytest

from mms_core.errors import SpecError
from mms_core.spec import PipelineSpec
from mms_core.tuning.space import TuneSpec, best_spec, check_space, load_tuning, suggest, trial_spec
from mms_core.tuning.study import open_study, run_study, study_name

SPEC = PipelineSpec.model_validate({"model": {"name": "mlp", "kwargs": {"hidden": [64]}}})


def _tune(**kw) -> TuneSpec:
    return TuneSpec.model_validate({"trial_epochs": 3, "sampler": "random", **kw})


# --- the search space -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "tuning.params is empty"),
        ({"training.lr": {"type": "float", "low": 0.1, "high": 0.01}}, "must be below high"),
        ({"training.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, "log range needs low > 0"),
        ({"training.batch_size": {"type": "int", "low": 8, "high": 16, "step": 32}}, "wider than the range"),
        ({"training.lr": {"type": "categorical", "choices": []}}, "at least 1 item"),
        ({"training.lr": {"type": "categorical", "choices": [0.1, 0.1]}}, "repeat a value"),
        ({"data.source": {"type": "categorical", "choices": ["builtin://iris"]}}, "data and shards stay"),
        ({"training.epochs": {"type": "int", "low": 1, "high": 9}}, "not checkpoint_every, epochs"),
        ({"training.batch_size": {"type": "int", "low": 0, "high": 64}}, "value 0 is not a valid spec"),
        (
            {"training.optimizer": {"type": "categorical", "choices": ["adamw", "lion"]}},
            "'lion' is not a valid",
        ),
        ({"training.lr": {"type": "float", "low": 1, "high": 2, "sigma": 3}}, "sigma"),
    ],
)
def test_an_empty_or_inconsistent_space_is_refused_before_anything_runs(tmp_path, params, message):
    path = tmp_path / "tune.yaml"
    path.write_text(json.dumps({"name": "t", "tuning": {"params": params}}))
    with pytest.raises(SpecError, match=message):
        load_tuning(path)


def test_strategies_without_a_one_worker_loop_cannot_be_tuned():
    fedavg = PipelineSpec.model_validate({"training": {"strategy": "fedavg"}})
    with pytest.raises(SpecError, match="'fedavg' cannot be tuned"):
        check_space(spec=fedavg, tune=TuneSpec())


def test_a_spec_without_tuning_section_says_how_to_add_one(tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text("name: plain\n")
    with pytest.raises(SpecError, match="no 'tuning' section.*digits-tune.yaml"):
        load_tuning(path)


def test_overrides_and_trials_reach_the_tuning_section():
    spec, tune = load_tuning(
        "examples/digits-tune.yaml", overrides=["tuning.pruner=none", "training.epochs=7"], trials=3
    )
    assert tune.trials == 3 and tune.pruner == "none" and spec.training.epochs == 7


def test_list_choices_round_trip_through_optuna_and_trials_get_their_own_settings():
    tune = _tune(params={"model.kwargs.hidden": {"type": "categorical", "choices": [[32], [64, 32]]}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    params = suggest(trial, tune)
    assert params["model.kwargs.hidden"] in ([32], [64, 32])
    one = trial_spec(spec=SPEC, tune=tune, params=params)
    assert one.model.kwargs["hidden"] == params["model.kwargs.hidden"]
    assert one.training.epochs == 3 and one.training.world_size == 1
    full = best_spec(spec=SPEC, params=params)
    assert full.training.epochs == SPEC.training.epochs and full.training.world_size is None


def test_the_study_name_follows_the_spec_and_space_not_the_trial_count():
    a = study_name(spec=SPEC, tune=_tune(trials=3))
    assert a == study_name(spec=SPEC, tune=_tune(trials=9))
    assert a != study_name(spec=SPEC, tune=_tune(trials=3, seed=1))
    assert study_name(spec=SPEC, tune=_tune(study_name="mine")) == "mine"


# --- studies on a real cluster --------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest_uri(digits_manifest):
    return digits_manifest(4)


@pytest.fixture(scope="module")
def cluster2(training_cluster):
    with training_cluster(2) as client:
        yield client


def _study(tmp_path, tune, name="s"):
    return open_study(name=name, tune=tune, storage_url=f"sqlite:///{tmp_path / 'optuna.db'}")


def test_parallel_trials_with_a_crashing_one_and_a_rerun_that_continues(cluster2, manifest_uri, tmp_path):
    # dropout 2.0 makes the model builder raise: that trial fails, the study goes on
    tune = _tune(
        trials=6, seed=2, params={"model.kwargs.dropout": {"type": "categorical", "choices": [0.1, 2.0]}}
    )
    events: list[dict] = []
    study = _study(tmp_path, tune)
    result = run_study(
        client=cluster2,
        study=study,
        spec=SPEC,
        tune=tune,
        manifest_uri=manifest_uri,
        root=str(tmp_path),
        on_event=events.append,
    )
    crashed = {t.number for t in result.trials if t.params["model.kwargs.dropout"] == 2.0}
    assert 0 < len(crashed) < 6, "pick a seed that samples both choices"
    assert {t.number for t in result.trials if t.state == "FAIL"} == crashed
    assert result.failed == len(crashed) and result.completed == 6 - len(crashed)
    assert all(t.epochs == 3 for t in result.trials if t.state == "COMPLETE")
    assert result.best_params == {"model.kwargs.dropout": 0.1} and 0.5 < result.best_value <= 1.0
    ends = [e for e in events if e["kind"] == "trial_end" and e["state"] == "FAIL"]
    assert all("dropout probability" in e["error"] for e in ends)
    # two trials ran at the same time: a second one started before the first ended
    kinds = [(e["kind"], e["trial"]) for e in events]
    assert kinds.index(("trial_start", 1)) < kinds.index(("trial_end", 0))
    assert not (tmp_path / "tuning" / "s").exists() or not any((tmp_path / "tuning" / "s").iterdir())

    # the same study again with 8 trials: 2 more run, nothing is redone
    more = _tune(trials=8, seed=2, params=tune.model_dump()["params"])
    again = run_study(
        client=cluster2,
        study=_study(tmp_path, more),
        spec=SPEC,
        tune=more,
        manifest_uri=manifest_uri,
        root=str(tmp_path),
    )
    assert [t.number for t in again.trials] == list(range(8))
    assert again.trials[:6] == result.trials


def test_the_median_pruner_stops_poor_trials_after_the_epoch_they_report(cluster2, manifest_uri, tmp_path):
    # one trial at a time, in the order the seeded sampler asks: good, good, poor, good, poor, poor
    tune = _tune(
        trials=6,
        seed=6,
        parallel=1,
        pruner="median",
        params={"training.lr": {"type": "categorical", "choices": [3e-3, 1e-7]}},
    )
    events: list[dict] = []
    result = run_study(
        client=cluster2,
        study=_study(tmp_path, tune),
        spec=SPEC,
        tune=tune,
        manifest_uri=manifest_uri,
        root=str(tmp_path),
        on_event=events.append,
    )
    poor = [t for t in result.trials if t.params["training.lr"] == 1e-7]
    assert [t.params["training.lr"] for t in result.trials[:3]] == [3e-3, 3e-3, 1e-7]
    assert result.pruned >= 1 and all(t.state == "PRUNED" for t in poor[:1])
    for t in result.trials:
        if t.state == "PRUNED":
            assert t.params["training.lr"] == 1e-7 and t.epochs < tune.trial_epochs
            reports = [e for e in events if e["kind"] == "trial_epoch" and e["trial"] == t.number]
            assert reports[-1]["pruning"] is True and reports[-1]["epoch"] == t.epochs
            assert not any(r["pruning"] for r in reports[:-1])
    assert result.best_params == {"training.lr": 3e-3} and not math.isnan(result.best_value)
