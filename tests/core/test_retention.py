"""Retention on a real MLflow sqlite store and real files in tmp_path: old items go, aliased,
served, last-N and sibling versions stay with the data they refer to; dry runs delete nothing;
a second run deletes nothing more; bad policies fail before anything is deleted."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.tracking._tracking_service import utils as tracking_utils
from pydantic import ValidationError

from mms_core import registry
from mms_core.errors import RetentionError
from mms_core.retention import RetentionItem, RetentionPolicy, apply_retention, plan_retention
from mms_core.serving.lease import write_lease

_spec = importlib.util.spec_from_file_location(
    "retention_world", Path(__file__).with_name("retention_world.py")
)
world = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(world)
NAME = "ret-model"


@pytest.fixture
def env(tmp_path):
    """A store with 5 versions of NAME and storage with shards, weights and checkpoints.

    v1 @champion (shards A, run r1); v2 its int8 sibling; v3 (shards B, r2); v4 (shards B, r3);
    v5 newest (shards A, r4). Planned at NOW = 40 days from now, everything registered/written
    today is 40 days old; `fresh` items are aged to one day before NOW.
    """
    prev_uri, prev_env = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    uri, artifacts = f"sqlite:///{tmp_path}/mlflow.db", (tmp_path / "artifacts").as_uri()
    root = str(tmp_path / "data")
    shards_a, hash_a = world.make_shards(root=root, seed=0)
    shards_b, hash_b = world.make_shards(root=root, seed=1)
    shards_fresh, _ = world.make_shards(root=root, seed=2)
    kw = dict(tracking_uri=uri, artifact_root=artifacts, name=NAME)
    v1, r1 = world.register(**kw, run_name="r1", tags={"mms.manifest_hash": hash_a})
    exp = registry.ensure_experiment(tracking_uri=uri, name="retention-tests", artifact_root=artifacts)
    v2, _ = world.register(**kw, run_name="r1-int8", tags={"mms.variant": "int8", "mms.parent_version": v1})
    v3, r2 = world.register(**kw, run_name="r2", tags={"mms.manifest_hash": hash_b})
    v4, r3 = world.register(**kw, run_name="r3", tags={"mms.manifest_hash": hash_b})
    v5, r4 = world.register(**kw, run_name="r4", tags={"mms.manifest_hash": hash_a})
    registry.set_alias(tracking_uri=uri, name=NAME, alias="champion", version=v1)
    now = world.now_plus(40)
    weights = {
        r: world.write_dir(f"{root}/models/{r}", {"model.safetensors": b"w" * 100})
        for r in (r1, r2, r3, r4, "orphan")
    }
    partial = world.write_dir(f"{root}/shards/partial0000000", {"train-00000.parquet": b"x"})
    ckpt_old = world.write_dir(f"{root}/checkpoints/old", {"step-00000001/meta.json": b"{}"})
    ckpt_fresh = world.write_dir(f"{root}/checkpoints/fresh", {"step-00000001/meta.json": b"{}"})
    for fresh in (shards_fresh, ckpt_fresh):
        world.age(fresh, at=now - world.DAY)
    try:
        yield {
            "uri": uri, "root": root, "home": tmp_path / "home", "now": now, "exp": exp,
            "v": [v1, v2, v3, v4, v5], "runs": [r1, r2, r3, r4], "weights": weights,
            "shards": {"a": shards_a, "b": shards_b, "fresh": shards_fresh, "partial": partial},
            "ckpt": {"old": ckpt_old, "fresh": ckpt_fresh},
        }  # fmt: skip
    finally:
        mlflow.set_tracking_uri(prev_uri)
        if prev_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = prev_env


def _plan(env, **policy):
    return plan_retention(
        policy=RetentionPolicy(**{"max_age_days": 30, "keep_last_versions": 1, **policy}),
        tracking_uri=env["uri"], storage_root=env["root"], home=env["home"], now=env["now"],
    )  # fmt: skip


def _targets(items: list[RetentionItem]) -> dict[str, str]:
    return {i.target: i.reason for i in items}


def _versions(env) -> list[str]:
    return sorted(str(v.version) for v in MlflowClient(env["uri"]).search_model_versions(f"name='{NAME}'"))


def test_policy_is_validated_when_built(monkeypatch):
    for bad in (
        {"max_age_days": 0},
        {"keep_last_versions": 0},
        {"kinds": []},
        {"kinds": ["shards", "shards"]},
        {"kinds": ["raw"]},
        {"delete_versions": ["ret-model@champion"]},
    ):
        with pytest.raises(ValidationError):
            RetentionPolicy(**bad)
    monkeypatch.setenv("MMS_RETENTION_MAX_AGE_DAYS", "7")
    monkeypatch.setenv("MMS_RETENTION_KINDS", '["shards", "checkpoints"]')
    assert RetentionPolicy().max_age_days == 7 and RetentionPolicy().kinds == ("shards", "checkpoints")


def test_plan_dry_run_apply_and_second_run(env):
    v1, v2, v3, v4, v5 = env["v"]
    r1, r2, r3, r4 = env["runs"]
    w, s = env["weights"], env["shards"]
    plan = _plan(env, dry_run=True)
    assert _targets(plan.delete).keys() == {
        f"{NAME}/{v3}", f"{NAME}/{v4}", s["b"], s["partial"], w[r2], w[r3], w["orphan"], env["ckpt"]["old"],
    }  # fmt: skip
    protected = _targets(plan.protected)
    assert protected[f"{NAME}/{v1}"] == "protected: holds alias @champion"
    assert protected[f"{NAME}/{v2}"] == f"protected: int8 sibling of kept {NAME}/{v1}"
    assert protected[f"{NAME}/{v5}"] == f"protected: one of the last 1 versions of {NAME}"
    assert protected[s["a"]].startswith("protected: used by kept version")
    assert protected[w[r1]].startswith("protected: used by kept version") and w[r4] in protected
    assert s["fresh"] not in protected and env["ckpt"]["fresh"] not in protected  # young: not even listed
    assert all(i.age_days > 39 for i in plan.delete)

    dry = apply_retention(plan=plan, tracking_uri=env["uri"])
    assert dry.dry_run and dry.deleted == [] and _versions(env) == ["1", "2", "3", "4", "5"]
    assert all(Path(t).exists() for t in _targets(plan.delete) if t.startswith("/"))

    c = MlflowClient(env["uri"])
    v3_model = c.get_model_version(NAME, v3).source.removeprefix("models:/")
    v3_artifacts = c.get_logged_model(v3_model).artifact_location
    seen: list[str] = []
    result = apply_retention(
        plan=_plan(env), tracking_uri=env["uri"], on_delete=lambda item: seen.append(item.target)
    )
    assert not result.dry_run and seen == [i.target for i in result.deleted]
    assert set(seen) == _targets(plan.delete).keys() and result.already_gone == []
    assert seen[:2] == [f"{NAME}/{v3}", f"{NAME}/{v4}"]  # versions before the data they used
    assert _versions(env) == ["1", "2", "5"]
    assert not Path(v3_artifacts.removeprefix("file://")).exists()  # the logged model's bytes too
    assert not Path(s["b"]).exists() and Path(s["a"]).exists() and Path(s["fresh"]).exists()
    assert not Path(w["orphan"]).exists() and Path(w[r1]).exists() and Path(w[r4]).exists()
    assert Path(env["ckpt"]["fresh"]).exists() and not Path(env["ckpt"]["old"]).exists()
    # The champion still loads, through its alias.
    _, _, version = registry.load_package(tracking_uri=env["uri"], model=f"{NAME}@champion")
    assert version == v1

    again = _plan(env)
    assert again.delete == [] and apply_retention(plan=again, tracking_uri=env["uri"]).deleted == []
    # Replaying the old plan is harmless: everything is reported as already gone.
    replay = apply_retention(
        plan=plan.model_copy(update={"policy": RetentionPolicy()}), tracking_uri=env["uri"]
    )
    assert replay.deleted == [] and len(replay.already_gone) == len(plan.delete)


def test_young_items_and_left_out_kinds_are_not_touched(env):
    assert _plan(env, max_age_days=50).delete == []
    plan = _plan(env, kinds=["checkpoints"])
    assert _targets(plan.delete).keys() == {env["ckpt"]["old"]} and plan.protected == []


def test_policy_naming_a_protected_version_fails_before_anything_is_deleted(env):
    v1, v2, _, v4, v5 = env["v"]
    cases = {
        f"{NAME}/{v1}": "holds alias @champion",
        f"{NAME}/{v2}": f"int8 sibling of kept {NAME}/{v1}",
        f"{NAME}/{v5}": "one of the last 1 versions",
    }
    for ref, why in cases.items():
        with pytest.raises(RetentionError, match="would delete protected model versions") as exc:
            _plan(env, delete_versions=[f"{NAME}/{v4}", ref])
        assert ref in str(exc.value) and why in str(exc.value) and "Move the alias first" in str(exc.value)
    with pytest.raises(RetentionError, match="not registered"):
        _plan(env, delete_versions=[f"{NAME}/99"])
    with pytest.raises(RetentionError, match="leaves out model_versions"):
        _plan(env, delete_versions=[f"{NAME}/{v4}"], kinds=["shards"])
    assert _versions(env) == ["1", "2", "3", "4", "5"] and Path(env["shards"]["b"]).exists()
    # An explicit, unprotected version goes even when it is young.
    plan = _plan(env, max_age_days=50, delete_versions=[f"{NAME}/{v4}"])
    assert _targets(plan.delete) == {f"{NAME}/{v4}": "named in delete_versions"}


def test_version_leased_by_a_running_server_is_protected(env):
    _, _, v3, v4, _ = env["v"]
    write_lease(home=env["home"], lease_id="server-1", model=NAME, versions=[v3])
    plan = _plan(env)
    assert _targets(plan.protected)[f"{NAME}/{v3}"] == "protected: served by a running server (lease)"
    assert f"{NAME}/{v3}" not in _targets(plan.delete) and f"{NAME}/{v4}" in _targets(plan.delete)
    assert env["shards"]["b"] in _targets(plan.protected)  # v3's shards stay with it
    with pytest.raises(RetentionError, match="served by a running server"):
        _plan(env, delete_versions=[f"{NAME}/{v3}"])
    write_lease(home=env["home"], lease_id="server-1", model=NAME, versions=[v3], ttl_s=-1)  # expired
    assert f"{NAME}/{v3}" in _targets(_plan(env).delete)


def test_data_of_a_training_in_progress_is_protected(env):
    manifest_b = registry.client(tracking_uri=env["uri"]).search_model_versions(f"name='{NAME}'")
    hash_b = next(v.tags["mms.manifest_hash"] for v in manifest_b if str(v.version) == env["v"][2])
    run = registry.start_run(
        tracking_uri=env["uri"], experiment_id=env["exp"], run_name="training",
        tags={"mms.manifest_hash": hash_b}, params={},
    )  # fmt: skip
    weights = world.write_dir(f"{env['root']}/models/{run}", {"model.safetensors": b"w"})
    world.age(weights, at=time.time() - 40 * world.DAY)
    world.age(env["shards"]["b"], at=time.time() - 40 * world.DAY)
    plan = plan_retention(
        policy=RetentionPolicy(max_age_days=30, kinds=["shards", "model_weights"]),
        tracking_uri=env["uri"], storage_root=env["root"], home=env["home"],
    )  # fmt: skip
    protected = _targets(plan.protected)
    assert protected[env["shards"]["b"]] == f"protected: used by training run {run} in progress"
    assert protected[weights] == f"protected: used by training run {run} in progress"


def test_apply_refuses_targets_outside_the_storage_root(env, tmp_path):
    outside = world.write_dir(str(tmp_path / "precious"), {"a.txt": b"keep"})
    plan = _plan(env, kinds=["checkpoints"])
    for target in (outside, f"{env['root']}/checkpoints/../../precious", f"{env['root']}/checkpoints"):
        bad = plan.model_copy(
            update={"delete": [RetentionItem(kind="checkpoints", target=target, age_days=99, reason="x")]}
        )
        with pytest.raises(RetentionError, match="refusing to delete"):
            apply_retention(plan=bad, tracking_uri=env["uri"])
    assert Path(outside, "a.txt").read_bytes() == b"keep"
