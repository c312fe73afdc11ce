"""Flow tests run against Prefect's test harness (one temporary server for the session)."""

import pytest


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
