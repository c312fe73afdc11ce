"""A lost replica never surfaces to a client: with a real uvicorn server on 127.0.0.1 and two replicas
on a real 3-worker LocalCluster, a steady request loop sees only correct 200s while the worker
hosting one replica is SIGKILLed or gracefully restarted, and the server is back to two replicas.
A model that really raises still answers that request alone 500, and its replica stays."""

import os
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from distributed import Client

from mms_core.models import ModelSpec
from mms_core.models.zoo import TRUSTED_ENV
from tests.core.serving.steady_load import (
    ROWS_PER_REQUEST,
    SteadyLoad,
    digits_server,
    expected_windows,
    replica_failures,
    wait_for_replicas,
)

pytestmark = pytest.mark.timeout(120)

FRAGILE_MODULE = "mms_fragile_model"
# A user model that is the zoo's MLP (same weights) but raises on a standardised value beyond 1000.
FRAGILE_SOURCE = """
from torch import nn
from mms_core.models import ModelSpec, build_model

class Fragile(nn.Sequential):
    def forward(self, x):
        if (x.abs() > 1000).any():
            raise ValueError("fragile model: a value beyond 1000")
        return super().forward(x)

def build(*, in_features, n_classes):
    mlp = build_model(spec=ModelSpec(), in_features=in_features, n_classes=n_classes)
    return Fragile(*mlp)
"""


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory, training_cluster) -> Iterator[Client]:
    """Three one-thread worker processes that may load the fragile user model (their environment and
    sys.path are the ones set here when they start)."""
    code = tmp_path_factory.mktemp("user-model")
    (code / f"{FRAGILE_MODULE}.py").write_text(textwrap.dedent(FRAGILE_SOURCE))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TRUSTED_ENV, FRAGILE_MODULE)
        mp.syspath_prepend(str(code))
        with training_cluster(3) as client:
            yield client
        sys.modules.pop(FRAGILE_MODULE, None)


def sigkill(client: Client, worker: str, load: SteadyLoad) -> None:
    """Between two requests: then no call is in flight to fail at once, and the next ones are sent
    to a replica that looks healthy until something notices its worker is gone."""
    pid = client.run(os.getpid)[worker]
    with load.between_requests:
        os.kill(pid, signal.SIGKILL)


def graceful_restart(client: Client, worker: str, load: SteadyLoad) -> None:
    """While requests keep coming: the worker closes (its actors refuse calls) and comes back."""
    client.restart_workers([worker])


@pytest.mark.parametrize("fault", [sigkill, graceful_restart], ids=["sigkill", "restart_workers"])
def test_losing_a_replicas_worker_fails_no_request_and_the_replica_is_replaced(
    cluster3, digits_package, digits_rows, serve_app, fault: Callable[[Client, str, SteadyLoad], None]
):
    """Every request in flight or queued at a replica whose worker dies (or restarts) is answered
    by the other replica, correctly, and a replacement brings the server back to two replicas."""
    rows = digits_rows[: 40 * ROWS_PER_REQUEST]
    expected = expected_windows(digits_package, rows)
    with serve_app(digits_server(cluster3, digits_package, version=fault.__name__)) as url:
        victim = httpx.get(f"{url}/health").json()["replicas"][0]
        with SteadyLoad(url, rows).running() as load:
            time.sleep(1.0)
            before = len(load.answers)
            fault(cluster3, victim["worker"], load)
            after = wait_for_replicas(url, n=2, gone={victim["id"]})
            time.sleep(0.5)  # the new replica takes traffic too
        lost = replica_failures(url)
    assert load.failures() == [], load.failures()
    assert load.wrong(expected) == []
    assert before >= 10 and len(load.answers) >= before + 20, (before, len(load.answers))
    assert lost >= 1 and len(after) == 2


def test_with_one_replica_requests_wait_for_its_replacement_instead_of_failing(
    cluster3, digits_package, digits_rows, serve_app
):
    """The only replica's worker is SIGKILLed: the requests it held and those arriving while its
    replacement loads wait for the replacement (within their 10 s deadline); none gets 503."""
    rows = digits_rows[: 40 * ROWS_PER_REQUEST]
    expected = expected_windows(digits_package, rows)
    with serve_app(digits_server(cluster3, digits_package, version="single", replicas=1)) as url:
        [victim] = httpx.get(f"{url}/health").json()["replicas"]
        with SteadyLoad(url, rows).running() as load:
            time.sleep(1.0)
            before = len(load.answers)
            sigkill(cluster3, victim["worker"], load)
            after = wait_for_replicas(url, n=1, gone={victim["id"]})
            time.sleep(0.5)
        lost = replica_failures(url)
    assert load.failures() == [], load.failures()
    assert load.wrong(expected) == []
    assert before >= 10 and len(load.answers) >= before + 10, (before, len(load.answers))
    assert lost >= 1 and len(after) == 1


def test_a_model_error_is_still_a_500_for_that_request_alone_and_the_replica_stays(
    cluster3, digits_package, digits_rows, serve_app
):
    """Only an exception the model raises is the request's fault: that request gets 500 with the
    model's message, its neighbours their predictions, and no replica is taken out."""
    expected = expected_windows(digits_package, digits_rows[:16])
    bad = digits_rows[:8].copy()
    bad[3, 0] = 1e9  # finite float32, so it passes the payload check and reaches the model
    fragile = ModelSpec(name=f"{FRAGILE_MODULE}:build")
    with serve_app(digits_server(cluster3, digits_package, version="fragile", model=fragile)) as url:
        replicas = httpx.get(f"{url}/health").json()["replicas"]
        post = f"{url}/v1/models/digits/predict"
        answers = [httpx.post(post, json={"inputs": rows.tolist()}) for rows in (digits_rows[:8], bad)]
        answers.append(httpx.post(post, json={"inputs": digits_rows[8:16].tolist()}))
        time.sleep(1.5)  # a health round: a replica wrongly taken out would be gone from the table
        after = httpx.get(f"{url}/health").json()["replicas"]
        lost = replica_failures(url)
    assert [a.status_code for a in answers] == [200, 500, 200]
    assert answers[1].json()["error"]["code"] == "model_error"
    assert "fragile model: a value beyond 1000" in answers[1].json()["error"]["message"]
    assert [answers[0].json()["predictions"], answers[2].json()["predictions"]] == expected
    assert {r["id"] for r in after} == {r["id"] for r in replicas} and lost == 0
