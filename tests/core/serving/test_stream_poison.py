"""Streams that no message can break, against a real redis-server and a real Dask LocalCluster:
poison messages of every kind are answered with errors while the good ones around them are
predicted, a message that keeps killing consumers ends in ``<stream>:dead``, streams stay bounded,
and the NDJSON broker answers poison lines and remembers what it answered."""

import json
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import redis

from mms_core.packaging import Predictor
from mms_core.serving.offline.stream import StreamOptions, consume, run_stream
from mms_core.serving.offline.stream_consumer import ConsumerRun
from mms_core.serving.offline.stream_redis import RedisIO, RedisStream, consume_redis
from mms_core.serving.payload import InputSchema

pytestmark = pytest.mark.timeout(120)  # a consumer that never stops fails its test, not the run

FAST = {"block_ms": 100, "min_idle_ms": 300, "claim_every_s": 0.2, "idle_exit_s": 1.0}


def _names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"requests-{tag}", f"predictions-{tag}"


def _sink(r: redis.Redis, stream: str) -> list[dict[str, str]]:
    return [fields for _, fields in r.xrange(stream)]


def _predictor(package) -> Predictor:  # noqa: ANN001
    return Predictor(config=package[0], weights=package[1])


def _run(client, package, url: str, src: str, dst: str, consumers: int = 2, **options: object):  # noqa: ANN001, ANN202
    return run_stream(
        client=client,
        config=package[0],
        weights=package[1],
        model_version="7",
        source=f"{url}?stream={src}",
        sink=f"{url}?stream={dst}",
        consumers=consumers,
        options=StreamOptions(**(FAST | options)),
    )


def _poison(row: list[float]) -> dict[str, tuple[dict, str]]:
    """Every kind of message that once broke a consumer: name -> (fields, expected error text, or "")."""
    nan_row = list(row)
    nan_row[5] = math.nan
    return {
        "not json": ({"inputs": "{not json"}, "not valid JSON"),
        "non-utf8 value": ({"inputs": b"[[0.5, \xff\xfe]]"}, "not UTF-8"),
        "non-utf8 field": ({b"\xffinputs": b"[1]"}, "exactly one field"),
        "5000 digits": ({"inputs": "[" + "9" * 5000 + "]"}, "4300 digits"),
        "5000 levels": ({"inputs": "[" * 5000 + "]" * 5000}, "nested too deeply"),
        # 3-D rows pass parse_body's row-width check; the payload module may word their error its way
        "3-D row": ({"inputs": json.dumps([[[0.5]] * 64])}, ""),
        "wrong width": ({"inputs": json.dumps([1.0, 2.0, 3.0])}, ""),
        "nan": ({"inputs": json.dumps(nan_row)}, ""),
        "not a list": ({"inputs": "5"}, ""),
    }


def test_poison_messages_never_stop_a_consumer(dask_client, digits_package, digits_rows, redis_url):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    src, dst = _names()
    good: dict[str, np.ndarray] = {}
    poison: dict[str, tuple[str, str]] = {}
    kinds = list(_poison(digits_rows[0].tolist()).items())
    for k in range(40):  # poison spread between good messages, so it shares micro-batches with them
        rows = digits_rows[k * 2 : k * 2 + (1 if k % 2 else 2)]
        good[r.xadd(src, {"inputs": json.dumps(rows.tolist())})] = rows
        if k % 4 == 0:
            name, (fields, problem) = kinds[(k // 4) % len(kinds)]
            poison[r.xadd(src, fields)] = (name, problem)
    for name, (fields, problem) in kinds:  # and every kind at least once
        poison[r.xadd(src, fields)] = (name, problem)

    result = _run(dask_client, digits_package, redis_url, src, dst, consumers=3, batch_size=4)

    assert len(result.consumers) == 3  # all returned normally: none died on a message
    answers = {e["source_id"]: e for e in _sink(r, dst)}
    assert len(answers) == len(_sink(r, dst)) == len(good) + len(poison)  # each once
    predictor = _predictor(digits_package)
    for mid, rows in good.items():
        assert json.loads(answers[mid]["predictions"]) == predictor.predict_array(rows).tolist()
    for mid, (name, problem) in poison.items():
        assert "predictions" not in answers[mid], name
        assert answers[mid]["error"] and problem in answers[mid]["error"], (name, answers[mid]["error"])
    assert (result.errors, result.dead) == (len(poison), 0)
    assert r.xpending(src, "mms")["pending"] == 0
    assert r.xlen(src) == 0  # answered entries are deleted from the source


class _Boom(BaseException):
    """What a hard crash looks like to the consumer loop: nothing catches it."""


class _FragilePredictor(Predictor):
    """The real model, except that a row whose first value is ``marker`` raises ``error``."""

    def __init__(self, *, marker: float, error: BaseException, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        self.marker, self.error = marker, error

    def predict_array(self, x: np.ndarray) -> np.ndarray:
        if (x[:, 0] == self.marker).any():
            raise self.error
        return super().predict_array(x)


def _consumer_run(package, predictor: Predictor, name: str, options: StreamOptions) -> ConsumerRun:  # noqa: ANN001
    schema = InputSchema(features=package[0].features, mean=package[0].mean)
    return ConsumerRun(
        predictor=predictor, schema=schema, version="7", options=options, name=name, index=0,
        n_consumers=1, stop=None,
    )  # fmt: skip


def test_a_batch_the_model_cannot_predict_fails_only_its_culprit(digits_package, digits_rows):
    predictor = _FragilePredictor(
        marker=-123.0,
        error=RuntimeError("kernel exploded"),
        config=digits_package[0],
        weights=digits_package[1],
    )
    run = _consumer_run(digits_package, predictor, "c", StreamOptions())
    bad = digits_rows[3].copy()
    bad[0] = -123.0
    bodies = [{"inputs": digits_rows[i : i + 2].tolist()} for i in range(0, 6, 2)]
    bodies.insert(2, {"inputs": bad.tolist()})
    results = run.answer(bodies)
    assert "kernel exploded" in results[2]["error"] and "predictions" not in results[2]
    direct = _predictor(digits_package).predict_array(digits_rows[:6]).tolist()
    assert [p for i in (0, 1, 3) for p in results[i]["predictions"]] == direct


def test_a_message_that_keeps_killing_consumers_goes_to_dead_letters(digits_package, digits_rows, redis_url):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    src, dst = _names()
    r.xgroup_create(src, "mms", id="0", mkstream=True)
    killer_row = digits_rows[0].copy()
    killer_row[0] = -7.0
    rows = [digits_rows[i] for i in range(1, 12)]
    rows.insert(2, killer_row)
    ids = [r.xadd(src, {"inputs": json.dumps(row.tolist())}) for row in rows]
    killer = ids[2]
    opts = StreamOptions(
        **(FAST | {"min_idle_ms": 0, "claim_every_s": 0, "batch_size": 4, "max_deliveries": 3})
    )
    predictor = _FragilePredictor(
        marker=-7.0, error=_Boom(), config=digits_package[0], weights=digits_package[1]
    )
    where = RedisStream(url=redis_url, server=redis_url, stream=src, group="mms")
    crashes = 0
    for attempt in range(10):  # each consumer that dies is replaced, as a supervisor would
        run = _consumer_run(digits_package, predictor, f"c{attempt}", opts)
        try:
            stats = consume_redis(run, RedisIO(where, dst, opts, consumer=f"c{attempt}"))
            break
        except _Boom:
            crashes += 1
    assert crashes == 3 and stats.dead == 1  # tried max_deliveries times, then moved aside
    answers = {e["source_id"]: e for e in _sink(r, dst)}
    assert sorted(answers) == sorted(i for i in ids if i != killer)  # the rest of its batches answered
    [(_, dead)] = r.xrange(f"{src}:dead")
    assert dead["source_id"] == killer and json.loads(dead["inputs"]) == killer_row.tolist()
    assert dead["deliveries"] == "3" and "max_deliveries" in dead["reason"]
    assert r.xpending(src, "mms")["pending"] == 0 and r.xlen(src) == 0


def test_a_message_delivered_max_times_lands_in_dead_letters(
    dask_client, digits_package, digits_rows, redis_url
):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    src, dst = _names()
    r.xgroup_create(src, "mms", id="0", mkstream=True)
    ids = [r.xadd(src, {"inputs": json.dumps(digits_rows[i].tolist())}) for i in range(3)]
    # What consumers that died on it leave behind: read, never acked, claimed again and again.
    r.xreadgroup("mms", "crashed-0", {src: ">"}, count=2)
    for n in range(1, 5):
        r.xclaim(src, "mms", f"crashed-{n}", 0, [ids[0]])
    r.xclaim(src, "mms", "crashed-5", 0, [ids[1]])
    assert [p["times_delivered"] for p in r.xpending_range(src, "mms", "-", "+", 10)] == [5, 2]

    result = _run(dask_client, digits_package, redis_url, src, dst, max_deliveries=5)

    [(_, dead)] = r.xrange(f"{src}:dead")
    assert dead["source_id"] == ids[0] and dead["deliveries"] == "5" and "max_deliveries" in dead["reason"]
    assert json.loads(dead["inputs"]) == digits_rows[0].tolist()
    answers = {e["source_id"]: e for e in _sink(r, dst)}
    assert set(answers) == set(ids[1:])  # the dead letter is not answered; one tried twice still is
    expected = _predictor(digits_package).predict_array(digits_rows[1:3]).tolist()
    assert [json.loads(answers[i]["predictions"])[0] for i in ids[1:]] == expected
    assert (result.dead, result.messages) == (1, 2) and r.xpending(src, "mms")["pending"] == 0


def test_streams_stay_bounded_over_a_long_run(
    dask_client, digits_package, digits_rows, redis_url, monkeypatch
):
    monkeypatch.setenv("MMS_STREAM_MAXLEN", "200")
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    src, dst = _names()
    n = 3000
    with r.pipeline(transaction=False) as pipe:
        for k in range(n):
            pipe.xadd(src, {"inputs": json.dumps(digits_rows[k % 100].tolist())})
        row_of = {mid: k % 100 for k, mid in enumerate(pipe.execute())}
    longest, done = 0, threading.Event()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(_run, dask_client, digits_package, redis_url, src, dst, batch_size=64)
        running.add_done_callback(lambda _: done.set())
        while not done.wait(0.01):
            longest = max(longest, r.xlen(dst))
        result = running.result()
    assert result.messages == n and result.errors == 0
    # MAXLEN ~ trims whole radix-tree nodes (stream-node-max-entries, 100 by default): 200 + one node
    assert max(longest, r.xlen(dst)) <= 300
    assert r.xlen(src) == 0 and r.xpending(src, "mms")["pending"] == 0
    kept = _sink(r, dst)  # the newest answers, whichever consumer wrote them last
    direct = _predictor(digits_package).predict_array(digits_rows[:100]).tolist()
    assert [json.loads(e["predictions"]) for e in kept] == [[direct[row_of[e["source_id"]]]] for e in kept]


def _poison_lines(row: list[float]) -> list[tuple[bytes, str]]:
    nan_row = list(row)
    nan_row[5] = math.nan
    return [
        (b'{"id": "broken", "inputs": [1, 2', "not valid JSON"),
        (b'{"id": "bytes", "inputs": [\xff\xfe]}', "not UTF-8"),
        (b'{"id": "digits", "inputs": [' + b"9" * 5000 + b"]}", "4300 digits"),
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (json.dumps({"id": "3d", "inputs": [[[0.5]] * 64]}).encode(), ""),
        (json.dumps({"id": "narrow", "inputs": [1.0, 2.0]}).encode(), ""),
        (json.dumps({"id": "nan", "inputs": nan_row}).encode(), ""),
        (b"[1, 2, 3]", ""),
    ]


def test_ndjson_poison_lines_are_answered_with_errors(dask_client, digits_package, digits_rows, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    expected: dict[str, list[tuple[str, object]]] = {}
    for f in range(2):
        lines: list[bytes] = []
        answers: list[tuple[str, object]] = []
        for k, (line, problem) in enumerate(_poison_lines(digits_rows[0].tolist())):
            row = digits_rows[f * 20 + k]
            lines.append(
                json.dumps({"id": f"g{k}\u2028", "inputs": row.tolist()}, ensure_ascii=False).encode()
            )
            answers.append(("good", row))
            lines.append(line)
            answers.append(("error", problem))
        (src / f"part-{f}.ndjson").write_bytes(b"\n".join(lines) + b"\n")
        expected[f"part-{f}.ndjson"] = answers
    result = run_stream(
        client=dask_client, config=digits_package[0], weights=digits_package[1], model_version="7",
        source=str(src), sink=str(tmp_path / "out"), options=StreamOptions(**(FAST | {"batch_size": 4})),
    )  # fmt: skip
    predictor = _predictor(digits_package)
    for name, answers in expected.items():
        got = [json.loads(line) for line in (tmp_path / "out" / name).read_text().splitlines()]
        assert len(got) == len(answers)
        for n, (record, (kind, what)) in enumerate(zip(got, answers, strict=True), 1):
            if kind == "good":
                assert record["predictions"] == predictor.predict_array(what[None]).tolist()
                assert record["id"].startswith("g")  # a U+2028 inside a string does not split the line
            else:
                assert record["line"] == n and "predictions" not in record and what in record["error"]
    assert (result.files, result.errors, result.messages) == (2, 16, 32)


def test_ndjson_consumer_remembers_what_it_answered(digits_package, digits_rows, tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    stop = threading.Event()

    def put(path: Path, row: np.ndarray) -> None:  # written whole, as producers must: temp + rename
        (path.parent / f".{path.name}").write_text(json.dumps({"inputs": row.tolist()}) + "\n")
        (path.parent / f".{path.name}").rename(path)

    def wait_for(path: Path) -> None:
        deadline = time.monotonic() + 30
        while not path.exists():
            assert time.monotonic() < deadline, f"{path.name} was never answered"
            time.sleep(0.02)

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            consume, config=digits_package[0], weights=digits_package[1], model_version="7",
            source=str(src), sink=str(dst), options=StreamOptions(block_ms=20), stop=stop,
        )  # fmt: skip
        put(src / "a.ndjson", digits_rows[0])
        wait_for(dst / "a.ndjson")
        (dst / "a.ndjson").unlink()  # the ack is gone, but the consumer knows it answered a.ndjson
        put(src / "b.ndjson", digits_rows[1])
        wait_for(dst / "b.ndjson")
        time.sleep(0.2)  # several more polls
        stop.set()
        stats = running.result(timeout=30)
    assert not (dst / "a.ndjson").exists() and (stats.files, stats.messages) == (2, 2)
