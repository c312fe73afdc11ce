"""Co-tenancy on one shared Dask cluster (three one-thread worker processes): an online server with
two replicas answers a steady request loop and a Redis stream consumer group answers a stream
while two DDP trainings run back to back, the second losing a worker (one hosting a rank and a
replica) mid-run. Training must leave everyone else's work alone: no failed or wrong HTTP answer,
every stream message answered exactly once, both trainings finished, and no worker but the killed
one restarted (a job that restarts the workers fails this test)."""

import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from distributed import Client, Event
from sklearn.datasets import load_digits

from mms_core import registry, steps
from mms_core.evaluate import EvalSpec
from mms_core.models import ModelSpec
from mms_core.packaging import Predictor
from mms_core.serving.offline.stream import StreamOptions, StreamResult, run_stream
from mms_core.serving.offline.stream_redis import dead_letter_stream
from mms_core.spec import PipelineSpec, RegisterSpec
from mms_core.training.spec import TrainJob, TrainSpec
from mms_core.training.strategies import run_strategy
from tests.core.serving.conftest import redis_url, running_server, train_digits_package  # noqa: F401  (a fixture)
from tests.core.serving.steady_load import (
    ROWS_PER_REQUEST,
    SteadyLoad,
    digits_server,
    expected_windows,
    wait_for_replicas,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

FIRST_EPOCHS, SECOND_EPOCHS = 2, 4
WORLD_SIZE = 2  # ranks on the first two workers by address, where the stream consumers start too
KILL_AFTER_STEP = 60  # second training: within its first epoch (about 72 steps an epoch on 2 ranks)
MESSAGE_EVERY_S = 0.04
MODEL = "cotenancy-digits"
STREAM = {"block_ms": 100, "min_idle_ms": 3000, "claim_every_s": 0.5, "batch_size": 16}


def _train_job(manifest_uri: str, out: Path, *, epochs: int) -> TrainJob:
    spec = TrainSpec(
        strategy="ddp",
        epochs=epochs,
        batch_size=8,
        checkpoint_every=20,
        lr=1e-3,
        timeout_s=60,
        world_size=WORLD_SIZE,
        resume=False,
    )
    return TrainJob(
        manifest_uri=manifest_uri,
        model=ModelSpec(name="mlp"),
        train=spec,
        output_uri=str(out / "weights.safetensors"),
        checkpoint_uri=str(out / "ckpt"),
    )


def _register(tracking_uri: str, root: Path, manifest_uri: str, weights_uri: str) -> steps.RegisterResult:
    """Evaluate and register a training's weights as the pipeline's last steps do."""
    spec = PipelineSpec(
        model=ModelSpec(name="mlp"),
        evaluate=EvalSpec(min_accuracy=0.5),
        registry=RegisterSpec(model_name=MODEL, experiment="cotenancy"),
    )
    exp = registry.ensure_experiment(
        tracking_uri=tracking_uri, name="cotenancy", artifact_root=(root / "artifacts").as_uri()
    )
    run_id = registry.start_run(
        tracking_uri=tracking_uri, experiment_id=exp, run_name=root.name, tags={}, params={}
    )
    evaluation = steps.evaluate_trained(manifest_uri=manifest_uri, model=spec.model, weights_uri=weights_uri)
    return steps.register_trained(
        tracking_uri=tracking_uri,
        run_id=run_id,
        spec=spec,
        manifest_uri=manifest_uri,
        weights_uri=weights_uri,
        evaluation=evaluation,
        compressed=None,
        lineage={},
    )


class Producer:
    """Adds one single-row message to ``stream`` every ``MESSAGE_EVERY_S`` from a thread, until stopped."""

    def __init__(self, r: redis.Redis, stream: str, rows: np.ndarray) -> None:
        self.r, self.stream, self.rows = r, stream, rows
        self.sent: dict[str, int] = {}  # message id -> row index
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(MESSAGE_EVERY_S):
            row = i % len(self.rows)
            self.sent[self.r.xadd(self.stream, {"inputs": json.dumps([self.rows[row].tolist()])})] = row
            i += 1

    def __enter__(self) -> "Producer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


class StreamRun:
    """``run_stream`` with two consumers in a thread, until its stop event is set on leaving."""

    def __init__(self, client: Client, package, url: str, src: str, dst: str) -> None:  # noqa: ANN001
        self.client, self.stop_name = client, f"cotenancy-stop-{uuid.uuid4().hex[:8]}"
        self.result: StreamResult | None = None
        self.error: BaseException | None = None
        kwargs = dict(
            client=client, config=package[0], weights=package[1], model_version="1",
            source=f"{url}?stream={src}", sink=f"{url}?stream={dst}", consumers=2,
            options=StreamOptions(**STREAM), stop_event=self.stop_name,
        )  # fmt: skip
        self._thread = threading.Thread(target=self._run, kwargs=kwargs, daemon=True)

    def _run(self, **kwargs: object) -> None:
        try:
            self.result = run_stream(**kwargs)
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc

    def __enter__(self) -> "StreamRun":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        Event(self.stop_name, client=self.client).set()
        self._thread.join(60)


def _wait_until_answered(r: redis.Redis, dst: str, n: int, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while r.xlen(dst) < n and time.monotonic() < deadline:
        time.sleep(0.1)


def _victim(url: str, client: Client) -> str:
    """The worker of a replica that also hosts a rank and a stream consumer: ranks and consumers
    start on the first two workers by address, and two replicas spread over three workers have at
    least one there (a rank may have moved after a fail-over; the worker still hosted a replica)."""
    replicas = {r["worker"] for r in httpx.get(f"{url}/health").json()["replicas"] if r["healthy"]}
    first_two = set(sorted(client.nthreads())[:WORLD_SIZE])
    return sorted(replicas & first_two or replicas)[0]


def test_serving_and_streaming_survive_two_trainings_and_a_lost_worker(
    training_cluster,
    digits_manifest,
    redis_url,  # noqa: F811  (the fixture imported above)
    global_tracking_uri,
    tmp_path,
):
    """Everything shares the workers; only the killed worker's process changes."""
    package = train_digits_package()
    rows = load_digits().data.astype(np.float32)[: 40 * ROWS_PER_REQUEST]
    expected = expected_windows(package, rows)
    predictor = Predictor(config=package[0], weights=package[1])
    manifest_uri = digits_manifest(6)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    src, dst = f"requests-{uuid.uuid4().hex[:8]}", f"predictions-{uuid.uuid4().hex[:8]}"
    events: list[dict] = []
    killed: dict[str, int] = {}

    with training_cluster(3) as client, running_server(digits_server(client, package, version="1")) as url:

        def kill_mid_run(ev: dict) -> None:
            events.append(ev)
            if (
                ev.get("kind") in ("progress", "epoch")
                and ev.get("step", 0) >= KILL_AFTER_STEP
                and not killed
            ):
                victim = _victim(url, client)
                killed[victim] = client.run(os.getpid)[victim]
                os.kill(killed[victim], signal.SIGKILL)

        stream = StreamRun(client, package, redis_url, src, dst)
        with SteadyLoad(url, rows).running() as load, stream:
            with Producer(r, src, rows) as producer:
                pids = client.run(os.getpid)
                first = run_strategy(
                    client=client, job=_train_job(manifest_uri, tmp_path / "first", epochs=FIRST_EPOCHS)
                )
                second = run_strategy(
                    client=client,
                    job=_train_job(manifest_uri, tmp_path / "second", epochs=SECOND_EPOCHS),
                    on_event=kill_mid_run,
                )
                time.sleep(1.0)  # a little traffic after the trainings too
            _wait_until_answered(r, dst, len(producer.sent))
        replicas = wait_for_replicas(url, n=2)
        now = client.run(os.getpid)

    # Serving: every request answered 200 with the model's own predictions; two replicas again.
    assert load.failures() == [], Counter(status for status, _ in load.failures())
    assert load.wrong(expected) == []
    assert len(load.answers) > 100 and len(replicas) == 2
    # Streaming: every message answered exactly once, correctly; nothing pending or dead-lettered.
    assert stream.error is None, repr(stream.error)
    answers = [fields for _, fields in r.xrange(dst)]
    ids = Counter(a["source_id"] for a in answers)
    assert len(producer.sent) > 100
    assert set(ids) == set(producer.sent) and set(ids.values()) == {1}, (len(ids), len(producer.sent))
    for a in answers:
        assert (
            json.loads(a["predictions"])
            == predictor.predict_array(rows[[producer.sent[a["source_id"]]]]).tolist()
        )
    assert r.xpending(src, "mms")["pending"] == 0 and r.xlen(dead_letter_stream(source=src)) == 0
    # Training: both finished with their whole history and weights; the second lost a worker.
    assert killed, "the second training ended before a worker could be killed: make it longer"
    assert [m.epoch for m in first[0].history] == list(range(1, FIRST_EPOCHS + 1))
    assert [m.epoch for m in second[0].history] == list(range(1, SECOND_EPOCHS + 1))
    assert Path(first[0].weights_uri).is_file() and Path(second[0].weights_uri).is_file()
    assert [e["kind"] for e in events].count("restart") == 1
    # No worker restarted but the one killed: the others kept their processes throughout.
    survivors = {addr: pid for addr, pid in pids.items() if addr not in killed}
    assert len(survivors) == 2 and all(now.get(a) == p for a, p in survivors.items()), (pids, now, killed)
    # Both register, each version holding its own training's weights.
    with global_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db") as uri:
        for n, (result, name) in enumerate(((first, "first"), (second, "second")), start=1):
            reg = _register(uri, tmp_path / name, manifest_uri, result[0].weights_uri)
            assert reg.version == str(n)
            _, weights, _ = registry.load_package(tracking_uri=uri, model=f"{MODEL}/{reg.version}")
            assert weights == Path(result[0].weights_uri).read_bytes()
