"""A real `mlflow server` on loopback with proxied artifacts: what MMS logs goes to the server's
--artifacts-destination (not to this host's MMS_HOME), reads back through the server, and
retention deletes it there."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking._tracking_service import utils as tracking_utils

from mms_core import registry, retention_registry
from mms_core.config import Settings

_spec = importlib.util.spec_from_file_location(
    "retention_world", Path(__file__).with_name("retention_world.py")
)
world = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(world)
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def test_artifact_root_follows_the_tracking_uri(tmp_path: Path) -> None:
    local = Settings(home=tmp_path)
    assert local.artifact_root == (tmp_path / "artifacts").as_uri()
    # A server keeps artifacts where its operator said and proxies them: no path on this host.
    assert Settings(home=tmp_path, mlflow_uri="http://mlflow:5000").artifact_root is None
    assert Settings(home=tmp_path, mlflow_uri="https://m.example").artifact_root is None
    explicit = Settings(home=tmp_path, mlflow_uri="http://mlflow:5000", artifact_uri="s3://b/mms/")
    assert explicit.artifact_root == "s3://b/mms"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(tracking URI, artifact destination) of a fresh `mlflow server` on 127.0.0.1."""
    port, dest = _free_port(), tmp_path / "server-artifacts"
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    cmd = [
        mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(dest),
    ]  # fmt: skip
    log = open(tmp_path / "mlflow-server.log", "wb")  # noqa: SIM115 (closed in finally)
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    prev_uri, prev_env = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with _HTTP.open(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server not ready in 90 s"
            time.sleep(0.5)
        yield uri, dest
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()
        # registry.client sets the process-wide tracking URI: give the next test what it had.
        mlflow.set_tracking_uri(prev_uri)
        if prev_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


@pytest.mark.timeout(180)
def test_artifacts_go_through_the_server_and_retention_deletes_them_there(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    uri, dest = server
    home = tmp_path / "home"
    settings = Settings(home=home, mlflow_uri=uri)
    assert settings.artifact_root is None

    version, _ = world.register(
        tracking_uri=uri, artifact_root=settings.artifact_root, name="remote-model", run_name="r1", tags={}
    )
    stored = _files(dest)
    assert any(f.endswith("package/weights.safetensors") for f in stored), stored
    assert not (home / "artifacts").exists()  # nothing on the flow host's disk

    config, weights, got = registry.load_package(tracking_uri=uri, model=f"remote-model/{version}")
    assert got == version and config.features == world.FEATURES and len(weights) > 0

    c = registry.client(tracking_uri=uri)
    model_id = retention_registry._model_id(c.get_model_version("remote-model", version))
    assert model_id and c.get_logged_model(model_id).artifact_location.startswith("mlflow-artifacts:")
    assert retention_registry.delete_version(
        tracking_uri=uri, name="remote-model", version=version, model_id=model_id, keep_model_ids=set()
    )
    assert not any("package" in f for f in _files(dest)), _files(dest)  # deleted on the server's store
