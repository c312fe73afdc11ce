"""The stream predictor against a real redis-server and a real Dask LocalCluster: answers equal
direct predictions, every message is answered exactly once across crashes and reclaims, bad
messages are answered with errors, and the embedded NDJSON broker is idempotent."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import redis
from distributed import Event

from mms_core.errors import MMSError
from mms_core.monitoring.live import read_stream
from mms_core.monitoring.stats import merge
from mms_core.packaging import Predictor, write_package
from mms_core.serving.offline.stream import StreamError, StreamOptions, run_stream

pytestmark = pytest.mark.timeout(120)  # a consumer that never stops fails its test, not the run

FAST = {"block_ms": 100, "min_idle_ms": 300, "claim_every_s": 0.2, "idle_exit_s": 1.0}


def _names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"requests-{tag}", f"predictions-{tag}"


def _produce(r: redis.Redis, stream: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Rows as messages in every accepted shape: one row, a batch of rows, and columns by name."""
    sent: dict[str, np.ndarray] = {}
    i = 0
    while i < len(rows):
        size = (1, 3, 1, 2)[len(sent) % 4]
        part = rows[i : i + size]
        if size == 2:
            body = {f"pixel_{j}": part[:, j].tolist() for j in range(64)}
        else:
            body = part[0].tolist() if size == 1 else part.tolist()
        sent[r.xadd(stream, {"inputs": json.dumps(body)})] = part
        i += size
    return sent


def _sink(r: redis.Redis, stream: str) -> list[dict[str, str]]:
    return [fields for _, fields in r.xrange(stream)]


def _stream(client, package, url: str, src: str, dst: str, **options: object):  # noqa: ANN001, ANN202
    config, weights = package
    return run_stream(
        client=client,
        config=config,
        weights=weights,
        model_version="7",
        source=f"{url}?stream={src}",
        sink=f"{url}?stream={dst}",
        options=StreamOptions(**(FAST | options)),
    )


def test_redis_answers_equal_direct_predictions(
    dask_client, digits_package, digits_rows, redis_url, tmp_path
):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    src, dst = _names()
    sent = _produce(r, src, digits_rows[:300])
    stats_uri = str(tmp_path / "stats")
    result = _stream(dask_client, digits_package, redis_url, src, dst, batch_size=16, stats_uri=stats_uri)

    predictor = Predictor(config=digits_package[0], weights=digits_package[1])
    answers = {e["source_id"]: e for e in _sink(r, dst)}
    assert len(answers) == len(_sink(r, dst)) == len(sent)  # one entry per message, none twice
    for mid, rows in sent.items():
        assert json.loads(answers[mid]["predictions"]) == predictor.predict_array(rows).tolist()
        assert answers[mid]["version"] == "7"
    assert r.xpending(src, "mms")["pending"] == 0
    assert (result.messages, result.rows, result.errors) == (len(sent), 300, 0)
    # Both consumers ran and their counts add up (how the group splits the backlog is Redis's timing).
    assert len(result.consumers) == 2 and sum(c.messages for c in result.consumers) == len(sent)
    # The consumers' input statistics and class counts, for the monitoring flow, cover every row.
    stats = merge(read_stream(stats_uri))
    direct = predictor.predict_array(digits_rows[:300]).tolist()
    assert stats.rows == 300 and stats.classes == {str(k): n for k, n in Counter(direct).items()}


def test_redis_reclaims_a_dead_consumers_batch(dask_client, digits_package, digits_rows, redis_url):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    src, dst = _names()
    sent = _produce(r, src, digits_rows[:120])
    r.xgroup_create(src, "mms", id="0")
    # The state a consumer killed mid-batch leaves: messages delivered to it and never acked.
    dead = r.xreadgroup("mms", "dead", {src: ">"}, count=20)[0][1]
    assert r.xpending(src, "mms")["pending"] == 20

    # The live messages are answered, and the idle time has passed, well before the dead batch may be
    # reclaimed (even on cold workers): the consumers must not stop while it is pending.
    result = _stream(dask_client, digits_package, redis_url, src, dst, min_idle_ms=5000, idle_exit_s=0.3)

    ids = [e["source_id"] for e in _sink(r, dst)]
    assert sorted(ids) == sorted(sent)  # every message exactly once
    assert {mid for mid, _ in dead} <= set(ids)
    assert r.xpending(src, "mms")["pending"] == 0
    assert result.reclaimed >= 20


def test_redis_a_stale_consumer_cannot_answer_twice(digits_rows, redis_url):
    from mms_core.serving.offline.stream_redis import RedisIO, RedisStream

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    src, dst = _names()
    mid = r.xadd(src, {"inputs": json.dumps(digits_rows[0].tolist())})
    where = RedisStream(url=redis_url, server=redis_url, stream=src, group="mms")
    r.xgroup_create(src, "mms", id="0")
    slow = RedisIO(where, dst, StreamOptions(min_idle_ms=0), consumer="slow")
    fast = RedisIO(where, dst, StreamOptions(min_idle_ms=0), consumer="fast")
    assert [m for m, _ in slow.read()] == [mid]
    assert [m for m, _ in fast.reclaim()] == [mid]  # slow looked dead: its message moved on
    assert fast.answer([mid], [{"predictions": [3]}], "7") == [True]
    # The slow consumer wakes up and answers the same message: nothing is written twice.
    assert slow.answer([mid], [{"predictions": [3]}], "7") == [False]
    assert [e["source_id"] for e in _sink(r, dst)] == [mid] and r.xpending(src, "mms")["pending"] == 0


_VICTIM = """
import sys, time
from pathlib import Path
from mms_core.packaging import Predictor, read_package
from mms_core.serving.offline.stream import StreamOptions, consume

slow = Predictor.predict_array
batches = 0
def predict_slowly(self, x):
    # A few batches answered, then the next one is held (read, not answered) until the kill: the
    # kill lands mid-batch whatever the machine's load (a 0.1 s window per batch was missed in CI).
    global batches
    batches += 1
    time.sleep(0.1 if batches <= 4 else 120)
    return slow(self, x)
Predictor.predict_array = predict_slowly
config, weights = read_package(Path(sys.argv[1]))
consume(config=config, weights=weights, model_version="7", source=sys.argv[2], sink=sys.argv[3],
        name="victim", options=StreamOptions(batch_size=10, block_ms=100))
"""


def _mid_batch(r: redis.Redis, src: str, dst: str) -> bool:
    """The victim has answered a few batches and now holds one it has been predicting for a while
    (its model holds its fifth batch), so a kill now lands mid-batch."""
    consumers = {c["name"]: c for c in r.xinfo_consumers(src, "mms")}
    victim = consumers.get("victim", {"pending": 0, "idle": 0})
    return r.xlen(dst) >= 30 and victim["pending"] > 0 and victim["idle"] >= 20


def test_redis_consumer_killed_mid_batch_loses_and_duplicates_nothing(
    digits_package, digits_rows, redis_url, tmp_path
):
    from mms_core.serving.offline.stream import consume

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    src, dst = _names()
    sent = _produce(r, src, digits_rows[:400])
    r.xgroup_create(src, "mms", id="0")
    package = write_package(directory=tmp_path / "pkg", config=digits_package[0], weights=digits_package[1])
    source, sink = f"{redis_url}?stream={src}", f"{redis_url}?stream={dst}"
    victim = subprocess.Popen(
        [sys.executable, "-c", _VICTIM, str(package), source, sink], cwd=Path(__file__).parents[3]
    )
    started = time.monotonic()
    try:
        while victim.poll() is None and time.monotonic() - started < 60 and not _mid_batch(r, src, dst):
            time.sleep(0.01)
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        victim.wait(10)
    assert victim.returncode == -signal.SIGKILL
    pending = r.xpending(src, "mms")["pending"]
    assert pending > 0 and r.xlen(dst) < len(sent)  # killed holding a batch, with work left

    stats = consume(
        config=digits_package[0],
        weights=digits_package[1],
        model_version="7",
        source=source,
        sink=sink,
        name="survivor",
        options=StreamOptions(**FAST),
    )
    ids = [e["source_id"] for e in _sink(r, dst)]
    assert sorted(ids) == sorted(sent)
    assert r.xpending(src, "mms")["pending"] == 0
    assert stats.reclaimed >= pending


def test_redis_poison_messages_are_answered_with_errors(dask_client, digits_package, digits_rows, redis_url):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    src, dst = _names()
    good = [r.xadd(src, {"inputs": json.dumps(row.tolist())}) for row in digits_rows[:5]]
    nan_row = digits_rows[0].tolist()
    nan_row[5] = math.nan
    poison = {
        r.xadd(src, {"inputs": json.dumps(["abc"] * 64)}): "must be a number",
        r.xadd(src, {"inputs": json.dumps(nan_row)}): "pixel_5",
        r.xadd(src, {"inputs": json.dumps([1.0, 2.0, 3.0])}): "takes 64 features",
        r.xadd(src, {"inputs": "{not json"}): "not valid JSON",
        r.xadd(src, {"rows": "[]"}): "exactly one field",
    }
    good.append(r.xadd(src, {"inputs": json.dumps(digits_rows[5].tolist())}))

    result = _stream(dask_client, digits_package, redis_url, src, dst)

    answers = {e["source_id"]: e for e in _sink(r, dst)}
    assert len(answers) == len(good) + len(poison)
    for mid, problem in poison.items():
        assert problem in answers[mid]["error"] and "predictions" not in answers[mid]
    predictor = Predictor(config=digits_package[0], weights=digits_package[1])
    expected = predictor.predict_array(digits_rows[:6]).tolist()
    assert [json.loads(answers[mid]["predictions"])[0] for mid in good] == expected
    assert r.xpending(src, "mms")["pending"] == 0 and result.errors == len(poison)


def test_redis_consumers_stop_on_the_named_event(dask_client, digits_package, digits_rows, redis_url):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    src, dst = _names()
    sent = _produce(r, src, digits_rows[:50])
    config, weights = digits_package
    stop = f"stop-{uuid.uuid4().hex}"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            run_stream,
            client=dask_client,
            config=config,
            weights=weights,
            model_version="7",
            source=f"{redis_url}?stream={src}",
            sink=f"{redis_url}?stream={dst}",
            consumers=3,  # more consumers than worker threads: each gives its thread back
            options=StreamOptions(block_ms=100),  # no idle exit: runs until told to stop
            stop_event=stop,
        )
        try:
            deadline = time.monotonic() + 30
            while r.xlen(dst) < len(sent) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not running.done()
            # The consumers gave their threads back: the workers still run other tasks beside them.
            assert dask_client.submit(sum, [1, 2], pure=False).result(timeout=10) == 3
        finally:
            Event(stop, client=dask_client).set()
        result = running.result(timeout=10)
    assert result.messages == len(sent) and len(result.consumers) == 3


def _write_ndjson(directory: Path, rows: np.ndarray) -> list[list[int]]:
    """Three files of id/inputs lines (one with a corrupt line); returns the rows of each line."""
    directory.mkdir()
    lines_rows: list[list[int]] = []
    for f in range(3):
        lines = []
        for k in range(f * 40, f * 40 + 40, 2):
            lines.append(json.dumps({"id": f"r{k}", "inputs": rows[k : k + 2].tolist()}))
            lines_rows.append([k, k + 1])
        if f == 1:
            lines.insert(3, '{"id": "broken", "inputs": [1, 2')
        (directory / f"part-{f}.ndjson").write_text("\n".join(lines) + "\n")
    return lines_rows


def test_ndjson_directories_are_answered_once(dask_client, digits_package, digits_rows, tmp_path):
    config, weights = digits_package
    _write_ndjson(tmp_path / "in", digits_rows)
    run = {
        "client": dask_client,
        "config": config,
        "weights": weights,
        "model_version": "7",
        "source": str(tmp_path / "in"),
        "sink": str(tmp_path / "out"),
        "options": StreamOptions(
            block_ms=100, idle_exit_s=0.3, batch_size=8, stats_uri=str(tmp_path / "stats")
        ),
    }
    first = run_stream(**run)

    predictor = Predictor(config=config, weights=weights)
    records = [
        json.loads(line)
        for f in range(3)
        for line in (tmp_path / "out" / f"part-{f}.ndjson").read_text().splitlines()
    ]
    errors = [r for r in records if "error" in r]
    assert len(errors) == 1 and errors[0]["line"] == 4 and "not valid JSON" in errors[0]["error"]
    answered = [r for r in records if "error" not in r]
    assert [r["id"] for r in answered] == [f"r{k}" for k in range(0, 120, 2)]
    direct = predictor.predict_array(digits_rows[:120]).tolist()
    assert [p for r in answered for p in r["predictions"]] == direct
    assert (first.files, first.messages, first.rows, first.errors) == (3, 61, 120, 1)
    # each consumer left its input statistics and predicted-class counts for the monitoring flow
    stats = merge(read_stream(str(tmp_path / "stats")))
    assert stats.rows == 120 and stats.classes == {str(k): n for k, n in Counter(direct).items()}
    assert np.asarray(stats.counts).sum(axis=1).tolist() == [120] * 64

    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "out").iterdir()}
    again = run_stream(**run)
    assert (again.files, again.messages) == (0, 0)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "out").iterdir()} == before
    assert merge(read_stream(str(tmp_path / "stats"))) == stats  # idle consumers keep the last statistics


@pytest.mark.parametrize(
    ("source", "sink", "message"),
    [
        ("redis://127.0.0.1:{port}/0?stream=a", "redis://127.0.0.1:{port}/0?stream=b", "cannot reach Redis"),
        ("{url}?stream=a&colour=red", "{url}?stream=b", "unknown query key(s) ['colour']"),
        ("{url}", "{url}?stream=b", "name the stream"),
        ("{url}?stream=a", "{url}?stream=a", "sink is the source stream"),
        ("{url}?stream=a", "{url}?stream=a:dead", "dead-letter stream"),
        ("{url}?stream=a", "{url}?stream=not-a-stream", "is a string, not a stream"),
        ("{url}?stream=a", "{url}?stream=b&group=g", "unknown query key(s) ['group']"),
        ("{url}?stream=a", "/tmp/out", "both be redis:// streams or both be directories"),
        ("/nonexistent/in", "/tmp/out", "does not exist"),
    ],
)
def test_bad_endpoints_fail_fast_with_a_clear_error(
    dask_client, digits_package, redis_url, source, sink, message
):
    with socket.socket() as s:  # a free port: nothing listens there once closed
        s.bind(("127.0.0.1", 0))
        fill = {"port": s.getsockname()[1], "url": redis_url}
    redis.Redis.from_url(redis_url).set("not-a-stream", "x")  # a key of another type, in the way
    started = time.monotonic()
    with pytest.raises(StreamError) as info:
        run_stream(
            client=dask_client,
            config=digits_package[0],
            weights=digits_package[1],
            model_version="7",
            source=source.format(**fill),
            sink=sink.format(**fill),
            options=StreamOptions(idle_exit_s=0.1),  # should it start after all, it stops
        )
    assert message in str(info.value) and isinstance(info.value, MMSError)
    assert time.monotonic() - started < 5
    if message == "cannot reach Redis":
        assert "mms stack up" in str(info.value)


def test_stream_options_read_the_environment_and_keywords_win(monkeypatch):
    monkeypatch.delenv("MMS_STREAM_MAXLEN", raising=False)
    monkeypatch.delenv("MMS_STREAM_MAX_DELIVERIES", raising=False)
    assert (StreamOptions().maxlen, StreamOptions().max_deliveries) == (100_000, 5)
    monkeypatch.setenv("MMS_STREAM_MAXLEN", "200")
    monkeypatch.setenv("MMS_STREAM_MAX_DELIVERIES", "3")
    opts = StreamOptions(batch_size=8, idle_exit_s=None, stats_uri="/tmp/stats")  # as `mms stream` builds it
    assert (opts.maxlen, opts.max_deliveries, opts.batch_size, opts.stats_uri) == (200, 3, 8, "/tmp/stats")
    assert StreamOptions(maxlen=10).maxlen == 10
    with pytest.raises(ValueError, match="max_deliveries"):
        StreamOptions(max_deliveries=0)


def test_predictor_cache_keeps_the_most_recently_used_models(digits_package):
    from mms_core.serving.offline import predictors

    config, weights = digits_package
    predictors._PREDICTORS.clear()  # this test process's cache; workers keep their own
    built = {k: predictors.cached_predictor(config=config, weights=weights, key=k) for k in "abcd"}
    assert predictors.cached_predictor(config=config, weights=weights, key="a") is built["a"]  # now newest
    predictors.cached_predictor(config=config, weights=weights, key="e")
    assert list(predictors._PREDICTORS) == ["c", "d", "a", "e"]  # b, least recently used, went
    assert len(predictors._PREDICTORS) == predictors.MAX_PREDICTORS
    predictors._PREDICTORS.clear()
