"""The retention flow on Prefect's harness, on a real MLflow store and real files in MMS_HOME:
dry run, deleting run with its Prefect artifact, a second run deleting nothing more, and a policy
that names the champion failing before anything is deleted."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flows.retention import retention
from mms_core import registry
from mms_core.retention import RetentionPolicy

_spec = importlib.util.spec_from_file_location(
    "retention_world", Path(__file__).resolve().parents[1] / "core" / "retention_world.py"
)
world = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(world)
NAME = "flow-model"


def _artifact(state) -> str:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    return next(a.data for a in found if a.key == "retention")


def test_retention_flow_dry_run_delete_and_second_run(mms_home):
    uri, artifacts = f"sqlite:///{mms_home / 'mlflow.db'}", (mms_home / "artifacts").as_uri()
    root = str(mms_home / "data")
    kw = dict(tracking_uri=uri, artifact_root=artifacts, name=NAME)
    v1, r1 = world.register(**kw, run_name="r1", tags={})
    v2, r2 = world.register(**kw, run_name="r2", tags={})
    v3, _ = world.register(**kw, run_name="r3", tags={})
    registry.set_alias(tracking_uri=uri, name=NAME, alias="champion", version=v1)
    old = time.time() - 40 * world.DAY
    orphan = world.write_dir(f"{root}/models/orphan", {"model.safetensors": b"w"})
    kept = world.write_dir(f"{root}/models/{r1}", {"model.safetensors": b"w"})
    ckpt = world.write_dir(f"{root}/checkpoints/abc", {"step-00000001/meta.json": b"{}"})
    for uri_ in (orphan, kept, ckpt):
        world.age(uri_, at=old)
    policy = dict(max_age_days=30, keep_last_versions=1, delete_versions=[f"{NAME}/{v2}"])

    dry = retention(policy=RetentionPolicy(**policy, dry_run=True), return_state=True)
    assert dry.is_completed() and dry.result().deleted == []
    report = _artifact(dry)
    assert "(dry run)" in report and report.count("would delete") == 3 and f"`{NAME}/{v2}`" in report
    assert Path(orphan).exists() and len(MlflowClient(uri).search_model_versions(f"name='{NAME}'")) == 3

    done = retention(policy=RetentionPolicy(**policy), return_state=True)
    deleted = {i.target for i in done.result().deleted}
    assert deleted == {f"{NAME}/{v2}", orphan, ckpt}
    assert "| deleted | model_versions |" in _artifact(done) and "| protected | model_weights |" in _artifact(
        done
    )
    assert sorted(str(v.version) for v in MlflowClient(uri).search_model_versions(f"name='{NAME}'")) == [
        v1,
        v3,
    ]
    assert Path(kept).exists() and not Path(orphan).exists()

    again = retention(policy=RetentionPolicy(max_age_days=30, keep_last_versions=1), return_state=True)
    assert again.is_completed() and again.result().deleted == []


def test_retention_flow_refuses_to_delete_the_champion(mms_home):
    uri = f"sqlite:///{mms_home / 'mlflow.db'}"
    v1, _ = world.register(
        tracking_uri=uri, artifact_root=(mms_home / "artifacts").as_uri(), name=NAME, run_name="r1", tags={}
    )
    registry.set_alias(tracking_uri=uri, name=NAME, alias="champion", version=v1)
    state = retention(policy=RetentionPolicy(delete_versions=[f"{NAME}/{v1}"]), return_state=True)
    assert state.is_failed()
    assert "holds alias @champion" in state.message or "holds alias @champion" in str(
        state.result(raise_on_failure=False)
    )
    assert len(MlflowClient(uri).search_model_versions(f"name='{NAME}'")) == 1
