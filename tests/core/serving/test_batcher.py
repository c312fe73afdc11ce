"""The batcher alone, on an event loop, its replica call a coroutine the test holds: how many
batches go out at once, how queued requests stack, and that the counts return to zero."""

import asyncio
import time

import numpy as np

from mms_core.serving.online.batcher import Batcher, Pending
from mms_core.serving.online.replica import ModelFailed


def _batcher(calls: list[int], gate: asyncio.Event, **limits) -> Batcher:
    async def call(x: np.ndarray) -> tuple[np.ndarray, float]:
        calls.append(len(x))
        await gate.wait()
        return np.zeros(len(x), dtype=np.int64), 0.1

    options = dict(max_batch_size=64, max_wait_ms=0.0, max_inflight_batches=2, call_timeout_s=5.0) | limits
    return Batcher(
        replica_id="r", version="1", call=call, on_lost=lambda items, why: None,
        observe=lambda rows, ms: None, **options,
    )  # fmt: skip


def _item(loop: asyncio.AbstractEventLoop, rows: int = 1) -> Pending:
    x = np.zeros((rows, 4), dtype=np.float32)
    return Pending(x=x, future=loop.create_future(), deadline=time.monotonic() + 10)


def test_at_most_max_inflight_batches_go_out_and_the_rest_stack_into_one():
    async def scenario() -> tuple[list[int], list[int], tuple[int, int, int]]:
        loop = asyncio.get_running_loop()
        calls: list[int] = []
        gate = asyncio.Event()
        batcher = _batcher(calls, gate)
        batcher.start()
        items = [_item(loop) for _ in range(30)]
        for item in items[:3]:  # three requests arrive one by one while the replica is busy
            batcher.submit(item)
            await asyncio.sleep(0.01)
        for item in items[3:]:
            batcher.submit(item)
        await asyncio.sleep(0.05)
        while_busy = list(calls)
        gate.set()
        await asyncio.gather(*(i.future for i in items))
        await asyncio.sleep(0.01)
        batcher.stop()
        return while_busy, calls, (len(batcher.queue), batcher.queued_rows, batcher.inflight_requests)

    while_busy, calls, left = asyncio.run(scenario())
    assert while_busy == [1, 1], while_busy  # two in flight, the third waits instead of a third call
    assert calls == [1, 1, 28], calls  # everything that queued meanwhile: one forward pass
    assert left == (0, 0, 0)


def test_a_queue_longer_than_a_batch_still_respects_the_inflight_limit():
    async def scenario() -> tuple[list[int], list[int]]:
        loop = asyncio.get_running_loop()
        calls: list[int] = []
        gate = asyncio.Event()
        batcher = _batcher(calls, gate)
        items = [_item(loop, rows=20) for _ in range(10)]  # 200 rows queued at once: 4 batches' worth
        for item in items:
            batcher.submit(item)
        batcher.start()
        await asyncio.sleep(0.05)
        while_busy = list(calls)
        gate.set()
        await asyncio.gather(*(i.future for i in items))
        batcher.stop()
        return while_busy, calls

    while_busy, calls = asyncio.run(scenario())
    assert while_busy == [60, 60], while_busy  # 3 requests of 20 rows per batch, 2 batches in flight
    assert sum(calls) == 200 and max(calls) <= 64


def test_a_model_error_fails_only_the_request_that_causes_it():
    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()

        async def call(x: np.ndarray) -> tuple[np.ndarray, float]:
            if (x == 7).any():
                raise ModelFailed("cannot take a 7")  # what a replica raises when its model does
            return np.arange(len(x)), 0.1

        batcher = Batcher(
            replica_id="r", version="1", max_batch_size=64, max_wait_ms=0.0, max_inflight_batches=1,
            call_timeout_s=5.0, call=call, on_lost=lambda items, why: None, observe=lambda rows, ms: None,
        )  # fmt: skip
        items = [_item(loop) for _ in range(5)]
        items[2].x[:] = 7
        for item in items:
            batcher.submit(item)
        batcher.start()
        done = await asyncio.gather(*(i.future for i in items), return_exceptions=True)
        batcher.stop()
        return ["error" if isinstance(d, Exception) else "ok" for d in done]

    assert asyncio.run(scenario()) == ["ok", "ok", "error", "ok", "ok"]


def test_a_call_that_fails_otherwise_hands_its_requests_back_once():
    """Any exception but the model's (here the one a closing worker's actor answers) means the
    replica is lost: the batch is handed back whole, not answered 500; requests the replica set
    already took back (their ``tried`` names this replica) are not handed back twice."""

    async def scenario() -> tuple[list[list[int]], list[bool]]:
        loop = asyncio.get_running_loop()

        async def call(x: np.ndarray) -> tuple[np.ndarray, float]:
            raise RuntimeError("cannot schedule new futures after shutdown")

        handed: list[list[int]] = []
        items = [_item(loop) for _ in range(3)]
        items[1].tried.add("r")  # taken back already, e.g. when a health check took the replica out
        batcher = Batcher(
            replica_id="r", version="1", max_batch_size=64, max_wait_ms=0.0, max_inflight_batches=1,
            call_timeout_s=5.0, call=call, observe=lambda rows, ms: None,
            on_lost=lambda lost, why: handed.append([items.index(p) for p in lost]),
        )  # fmt: skip
        for item in items:
            batcher.submit(item)
        batcher.start()
        await asyncio.sleep(0.05)
        batcher.stop()
        return handed, [i.future.done() for i in items]

    handed, answered = asyncio.run(scenario())
    assert handed == [[0, 2]]
    assert answered == [False, False, False]  # nobody got a 500: the router retries them elsewhere
