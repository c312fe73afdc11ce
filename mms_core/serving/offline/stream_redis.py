"""The Redis Streams broker of :mod:`.stream`: a consumer group on the source stream, answers in a
sink stream on the same server, and answer + ack as one atomic script, so a message is answered
exactly once across reclaims and consumers killed mid-batch.

The ``redis`` client is imported only inside the functions that talk to a server: importing this
module (as :mod:`.stream` always does) costs nothing to the NDJSON broker.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mms_core.serving.offline.stream_consumer import (
    ConsumerRun,
    ConsumerStats,
    StreamError,
    StreamOptions,
    decode_json,
)
from mms_core.serving.payload import FORMATS, PayloadError

if TYPE_CHECKING:
    import redis

_CONNECT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class RedisStream:
    """A parsed ``redis://`` source or sink. ``url`` may hold credentials; ``server`` is safe to print."""

    url: str = field(repr=False)
    server: str
    stream: str
    group: str


def connect(where: RedisStream, opts: StreamOptions) -> redis.Redis:
    """A client for ``where``'s server, pinged once so an unreachable server fails here, clearly.

    Raises:
        StreamError: the server does not answer.
    """
    import redis  # only the Redis broker needs the client library

    client = redis.Redis.from_url(
        where.url,
        decode_responses=True,
        socket_connect_timeout=_CONNECT_TIMEOUT_S,
        socket_timeout=_CONNECT_TIMEOUT_S + opts.block_ms / 1000,  # a blocking read must not time out
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        raise StreamError(
            f"cannot reach Redis at {where.server} ({exc}); start it with `mms stack up` (or "
            "`redis-server --bind 127.0.0.1`), or use directories for the embedded NDJSON broker"
        ) from exc
    return client


def ensure_group(client: redis.Redis, where: RedisStream) -> None:
    """Create ``where``'s consumer group (and stream) unless it exists."""
    import redis

    try:  # from "0": a new group also answers what was produced before its first consumer started
        client.xgroup_create(where.stream, where.group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


# Answer and ack in one atomic step, and only while the message is still pending: a message is
# written exactly once, however often it is delivered (a reclaim race, a consumer killed
# mid-batch), with no dedupe state to keep or expire. Checking before XADD matters: Lua has no
# rollback, so an ack must never precede a write that could still fail.
_ANSWER_AND_ACK = """
local flags = {}
for i = 3, #ARGV, 3 do
  flags[#flags + 1] = 0
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1) > 0 then
    redis.call('XADD', KEYS[2], '*', 'source_id', ARGV[i], ARGV[i + 1], ARGV[i + 2], 'version', ARGV[2])
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
    flags[#flags] = 1
  end
end
return flags
"""


class RedisIO:
    """One consumer's reads, reclaims and answers on a source group and a sink stream."""

    def __init__(self, src: RedisStream, sink: str, opts: StreamOptions, *, consumer: str) -> None:
        self.src, self.sink, self.opts, self.consumer = src, sink, opts, consumer
        self.redis = connect(src, opts)
        self.script = self.redis.register_script(_ANSWER_AND_ACK)
        self.cursor = "0-0"

    def read(self) -> list[tuple[str, dict[str, str]]]:
        s, o = self.src, self.opts
        reply = self.redis.xreadgroup(s.group, self.consumer, {s.stream: ">"}, o.batch_size, o.block_ms)
        return [m for _, messages in reply for m in messages]

    def reclaim(self) -> list[tuple[str, dict[str, str]]]:
        s, o = self.src, self.opts
        reply = self.redis.xautoclaim(
            s.stream, s.group, self.consumer, o.min_idle_ms, self.cursor, o.batch_size
        )
        self.cursor = reply[0]
        return [(mid, fields) for mid, fields in reply[1] if fields is not None]  # None: a deleted entry

    def pending(self) -> int:
        return int(self.redis.xpending(self.src.stream, self.src.group)["pending"])

    def answer(self, ids: list[str], results: list[dict[str, Any]], version: str) -> list[bool]:
        """Write and ack each message still pending; True where this call did (False: answered before)."""
        args: list[str] = [self.src.group, version]
        for mid, res in zip(ids, results, strict=True):
            kind = "error" if "error" in res else "predictions"
            args += [mid, kind, res["error"] if kind == "error" else json.dumps(res["predictions"])]
        return [bool(f) for f in self.script(keys=[self.src.stream, self.sink], args=args)]


def consume_redis(run: ConsumerRun, io: RedisIO) -> ConsumerStats:
    """Read, reclaim and answer until ``run`` is stopped or, with ``idle_exit_s``, idle and drained."""
    stats = ConsumerStats(consumer=run.name)
    last_claim = last_message = time.monotonic()
    while not run.stopped():
        messages = dict(io.read())
        if not messages or time.monotonic() - last_claim >= run.options.claim_every_s:
            claimed = dict(io.reclaim())
            last_claim = time.monotonic()
            stats.reclaimed += len(claimed.keys() - messages.keys())
            messages |= claimed
        if messages:
            _answer_messages(run, io, messages, stats)
            last_message = time.monotonic()
        elif (
            run.options.idle_exit_s is not None
            and time.monotonic() - last_message >= run.options.idle_exit_s
            and io.pending() == 0
        ):
            break
    return stats


def _answer_messages(
    run: ConsumerRun, io: RedisIO, messages: dict[str, dict[str, str]], stats: ConsumerStats
) -> None:
    ids = list(messages)
    results = run.answer([_message_body(messages[mid]) for mid in ids])
    written = io.answer(ids, results, run.version)
    for res, fresh in zip(results, written, strict=True):
        if not fresh:
            stats.duplicates += 1
            continue
        stats.messages += 1
        stats.errors += "error" in res
        stats.rows += len(res.get("predictions", ()))


def _message_body(fields: dict[str, str]) -> Any:
    """The request body a Redis entry carries, or the PayloadError that answers it."""
    keys = [k for k in FORMATS if k in fields]
    if len(keys) != 1:
        return PayloadError(f"a message needs exactly one field of {list(FORMATS)}, got {sorted(fields)[:5]}")
    body = decode_json(fields[keys[0]], f"field {keys[0]!r}")
    return body if isinstance(body, PayloadError) else {keys[0]: body}
