"""Flow tests run against Prefect's test harness (one temporary server for the session); an
MLflow tracking server that answers 503 where a test says (``tracking``)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
from werkzeug.serving import WSGIRequestHandler, make_server


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def mms_home(tmp_path, monkeypatch, prefect_harness):
    """A fresh MMS_HOME for one flow run (Settings are read from the environment at run time)."""
    monkeypatch.setenv("MMS_HOME", str(tmp_path))
    for var in ("MMS_MLFLOW_URI", "MMS_DASK_ADDRESS", "MMS_STORAGE_URI"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


MLFLOW_TRACKING_URI = "MLFLOW_TRACKING_URI"
UPDATE = "/api/2.0/mlflow/runs/update"  # what MlflowClient.set_terminated posts


class FlakyTracking:
    """WSGI front of MLflow's tracking server: the next ``failures`` calls to ``method path``
    (default: run updates) get a 503; ``updates`` records each such call's status."""

    def __init__(self, app) -> None:
        self.app, self.method, self.path, self.failures, self.updates = app, "POST", UPDATE, 0, []

    def __call__(self, environ, start_response):
        if (environ["REQUEST_METHOD"], environ["PATH_INFO"]) == (self.method, self.path):
            failing = self.failures > 0
            self.failures -= failing
            self.updates.append(503 if failing else 200)
            if failing:
                start_response("503 Service Unavailable", [("Content-Type", "application/json")])
                return [b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "restarting"}']
        return self.app(environ, start_response)


class _Quiet(WSGIRequestHandler):
    def log_request(self, *args, **kwargs) -> None:
        pass


@pytest.fixture
def tracking(mms_home, monkeypatch) -> Iterator[tuple[FlakyTracking, str]]:
    """(front, URI) of an MLflow tracking server on loopback over MMS_HOME/mlflow.db; MMS uses it."""
    from mlflow.server import ARTIFACT_ROOT_ENV_VAR, BACKEND_STORE_URI_ENV_VAR, app, handlers
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.setenv(BACKEND_STORE_URI_ENV_VAR, f"sqlite:///{mms_home / 'mlflow.db'}")
    monkeypatch.setenv(ARTIFACT_ROOT_ENV_VAR, (mms_home / "artifacts").as_uri())
    for name in ("_tracking_store", "_model_registry_store"):  # the server's stores are globals
        monkeypatch.setattr(handlers, name, None)
    # The server, and registry.client, set the process-wide tracking URI (and its variable): give
    # the next test what it had.
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    # The server also sets the process-wide registry URI (a global and MLFLOW_REGISTRY_URI) to its
    # store when it opens it: give the next test what it had, or its own MlflowClient would read
    # this test's registry.
    monkeypatch.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    prev_env = os.environ.get(MLFLOW_TRACKING_URI)
    # MLflow's client gives up at the first 503 instead of after its own backoff (minutes): the
    # fault outlasts the client's retries, and only the task's retry can recover from it.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    front = FlakyTracking(app)
    server = make_server("127.0.0.1", 0, front, threaded=True, request_handler=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("MMS_MLFLOW_URI", uri)
    try:
        yield front, uri
    finally:
        server.shutdown()
        thread.join(10)
        if prev_env is None:
            os.environ.pop(MLFLOW_TRACKING_URI, None)
        else:
            os.environ[MLFLOW_TRACKING_URI] = prev_env
