"""Fixtures for the serving tests: a small trained digits package, a real LocalCluster, and a real
redis-server on a free loopback port (started and stopped here)."""

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import redis
import torch
import uvicorn
from distributed import Client, LocalCluster
from safetensors.torch import save as st_save
from sklearn.datasets import load_digits

from mms_core.models import ModelSpec, build_model
from mms_core.packaging import PackageConfig

FEATURES = [f"pixel_{i}" for i in range(64)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_digits_package(*, seed: int = 0, epochs: int = 30) -> tuple[PackageConfig, bytes]:
    """A digits MLP trained for a few full-batch epochs: real, distinct predictions in ~1 s."""
    digits = load_digits()
    mean, std = digits.data.mean(0), digits.data.std(0) + 1
    x = torch.tensor((digits.data - mean) / std, dtype=torch.float32)
    y = torch.tensor(digits.target)
    torch.manual_seed(seed)
    model = build_model(spec=ModelSpec(), in_features=64, n_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    config = PackageConfig(
        format="fp32",
        model=ModelSpec(),
        features=FEATURES,
        classes=list(range(10)),
        mean=mean.tolist(),
        std=std.tolist(),
    )
    return config, st_save({k: v.contiguous() for k, v in model.state_dict().items()})


@pytest.fixture(scope="session")
def digits_package() -> tuple[PackageConfig, bytes]:
    return train_digits_package()


@pytest.fixture(scope="session")
def digits_rows() -> np.ndarray:
    return load_digits().data.astype(np.float32)


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Client]:
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a free loopback port (`.ci/run` installs redis-server)."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server; .ci/run does this)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            exe,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            time.sleep(0.05)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def register_digits(*, tracking_uri: str, artifact_root: str, seed: int, alias: str | None) -> str:
    """Register a trained digits package as `digits-classifier` (a real MLflow store); returns the version."""
    import pandas as pd

    from mms_core import registry

    config, weights = train_digits_package(seed=seed)
    exp = registry.ensure_experiment(
        tracking_uri=tracking_uri, name="serving-tests", artifact_root=artifact_root
    )
    run_id = registry.start_run(
        tracking_uri=tracking_uri, experiment_id=exp, run_name=f"seed-{seed}", tags={}, params={}
    )
    example = pd.DataFrame(load_digits().data[:3].astype(np.float32), columns=FEATURES)
    version = registry.register_package(
        tracking_uri=tracking_uri, run_id=run_id, name="digits-classifier", config=config, weights=weights,
        example=example, tags={registry.TAG_VARIANT: "fp32"},
    )  # fmt: skip
    registry.end_run(tracking_uri=tracking_uri, run_id=run_id)
    if alias:
        registry.set_alias(tracking_uri=tracking_uri, name="digits-classifier", alias=alias, version=version)
    return version


@contextmanager
def running_server(app, port: int | None = None) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread on 127.0.0.1:``port`` until it is /ready; yield its URL."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("server did not become ready")
        time.sleep(0.1)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(60)


@pytest.fixture(scope="session")
def serve_app():
    """``with serve_app(app) as url:`` runs a FastAPI app on a free loopback port until /ready."""
    return running_server


@pytest.fixture(scope="module")
def digits_app(dask_client, digits_package):
    """``digits_app(keys=..., version=..., **serve_config)``: an online server app for the digits
    package on the module's LocalCluster (name "digits", no usage meter)."""
    from mms_core.serving.online.app import ServedModel, create_app
    from mms_core.serving.online.config import ServeConfig

    def make(*, keys=None, version: str = "1", **config):
        package, weights = digits_package
        return create_app(
            config=ServeConfig(**config),
            model=ServedModel(name="digits", version=version, package=package, weights=weights),
            scheduler_address=dask_client.scheduler.address,
            keys=keys,
            meter=None,
        )

    return make
