"""serving-rollout on Prefect's harness against a real online server (uvicorn on loopback,
replicas on a LocalCluster, a real MLflow store): a good version is promoted and a version that
fails the gate is rolled back, with load running throughout and not one failed request."""

import importlib.util
import threading
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from distributed import Client, LocalCluster
from sklearn.datasets import load_digits

from mms_core import registry
from mms_core.serving.metering import KeyStore
from mms_core.serving.online.app import ServedModel, create_app
from mms_core.serving.online.config import ServeConfig
from mms_core.serving.rollout import RolloutSpec

_spec = importlib.util.spec_from_file_location(
    "serving_conftest", Path(__file__).resolve().parents[1] / "core/serving/conftest.py"
)
serving = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serving)
NAME = "digits-classifier"


@pytest.fixture(scope="module")
def cluster():
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as c,
        Client(c) as client,
    ):
        yield client


@pytest.fixture
def served(mms_home, cluster):
    """v1 champion served; v2 registered with alias `candidate`."""
    tracking = f"sqlite:///{mms_home / 'mlflow.db'}"
    artifacts = (mms_home / "artifacts").as_uri()
    v1 = serving.register_digits(tracking_uri=tracking, artifact_root=artifacts, seed=0, alias="champion")
    v2 = serving.register_digits(tracking_uri=tracking, artifact_root=artifacts, seed=1, alias="candidate")
    package, weights, version = registry.load_package(tracking_uri=tracking, model=f"{NAME}@champion")
    keys = KeyStore(path=mms_home / "metering.db")
    admin, _ = keys.create(tenant="ops", admin=True)  # the admin API needs one, loopback included
    app = create_app(
        config=ServeConfig(replicas=1, health_interval_s=0.5, drain_s=10),
        model=ServedModel(name=NAME, version=version, package=package, weights=weights),
        scheduler_address=cluster.scheduler.address,
        keys=keys,
        meter=None,
        loader=lambda v: registry.load_package(tracking_uri=tracking, model=f"{NAME}/{v}"),
    )
    with serving.running_server(app) as url:
        yield url, tracking, v1, v2, admin


class Load:
    """Closed-loop clients posting until stopped; records every status and answering version."""

    def __init__(self, url: str, clients: int = 3) -> None:
        self.url, self.results, self.stop = url, [], threading.Event()
        self.rows = load_digits().data[:4].astype(np.float32).tolist()
        self.threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self.stop.is_set():
                r = http.post(f"{self.url}/v1/models/{NAME}/predict", json={"inputs": self.rows})
                self.results.append((r.status_code, r.json().get("version")))

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def _spec(url: str, admin_key: str, **gate: float) -> RolloutSpec:
    """A 30% canary judged over 2 s by ``gate``, driven with the admin key the admin API needs."""
    return RolloutSpec(server_url=url, model=NAME, canary_share=0.3, window_s=2, api_key=admin_key, **gate)


def _mlflow_decisions(tracking: str) -> list[str]:
    client = registry.client(tracking_uri=tracking)
    exp = client.get_experiment_by_name("serving-rollouts")
    return [r.data.tags["mms.decision"] for r in client.search_runs([exp.experiment_id])]


def _task_names(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
        )
    return [r.name.rsplit("-", 1)[0] for r in runs]


def test_good_version_is_promoted_without_a_failed_request(served):
    from flows.serving_rollout import serving_rollout

    url, tracking, v1, v2, admin = served
    spec = _spec(url, admin, min_requests=10, max_p95_ms=5000)
    with Load(url) as load:
        state = serving_rollout(spec=spec, return_state=True)
        decision = state.result()
        after = len(load.results)
        while len(load.results) < after + 30:
            load.stop.wait(0.05)
    assert decision.decision == "promoted", decision.reasons
    codes = Counter(code for code, _ in load.results)
    assert codes and set(codes) == {200}, codes
    versions = [v for _, v in load.results]
    assert v1 in versions and v2 in versions  # the canary really took traffic
    assert set(versions[-10:]) == {v2}  # and now takes all of it
    assert registry.alias_version(tracking_uri=tracking, name=NAME, alias="champion") == v2
    assert [v["version"] for v in httpx.get(f"{url}/v1/models").json()["models"][0]["versions"]] == [v2]
    assert _mlflow_decisions(tracking) == ["promoted"]
    # Every side effect is a task run of the flow run (the report artifact aside).
    assert _task_names(state.state_details.flow_run_id) == [
        "resolve-candidate", "start-canary", "observe-canary", "decide", "log-decision",
    ]  # fmt: skip


def test_version_failing_the_gate_is_rolled_back_without_a_failed_request(served):
    from flows.serving_rollout import serving_rollout

    url, tracking, v1, v2, admin = served
    # A p95 limit no real request can meet: the canary must fail the gate.
    spec = _spec(url, admin, min_requests=5, max_p95_ms=0.001)
    with Load(url) as load:
        decision = serving_rollout(spec=spec)
    assert decision.decision == "rolled_back"
    assert any("p95" in r for r in decision.reasons)
    assert {code for code, _ in load.results} == {200}
    assert registry.alias_version(tracking_uri=tracking, name=NAME, alias="champion") == v1
    assert [v["version"] for v in httpx.get(f"{url}/v1/models").json()["models"][0]["versions"]] == [v1]
    assert _mlflow_decisions(tracking) == ["rolled_back"]


ALIAS = "/api/2.0/mlflow/registered-models/alias"  # what MlflowClient.set_registered_model_alias posts


def _served_versions(url: str) -> list[str]:
    return [v["version"] for v in httpx.get(f"{url}/v1/models").json()["models"][0]["versions"]]


def test_abort_finishes_a_committed_promotion_and_undoes_one_that_is_not(served):
    from mms_core.serving import rollout

    url, tracking, v1, v2, admin = served
    spec = _spec(url, admin)
    # Not committed (the alias still names v1): the canary goes, v1 serves; again: nothing to do.
    rollout.start_canary(spec=spec, version=v2)
    assert sorted(_served_versions(url)) == sorted([v1, v2])
    assert "removed" in rollout.abort(spec=spec, tracking_uri=tracking, version=v2, previous=[v1])
    assert _served_versions(url) == [v1]
    assert "nothing to undo" in rollout.abort(spec=spec, tracking_uri=tracking, version=v2, previous=[v1])
    # Committed (the alias moved to v2 before the old version was removed): v1 goes.
    rollout.start_canary(spec=spec, version=v2)
    registry.set_alias(tracking_uri=tracking, name=NAME, alias="champion", version=v2)
    assert "promotion finished" in rollout.abort(spec=spec, tracking_uri=tracking, version=v2, previous=[v1])
    assert _served_versions(url) == [v2]
    assert "promotion finished" in rollout.abort(spec=spec, tracking_uri=tracking, version=v2, previous=[v1])
    assert _served_versions(url) == [v2]
