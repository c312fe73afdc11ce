"""The Redis Streams broker of :mod:`.stream`: a consumer group on the source stream, answers in a
sink stream on the same server, and answer + ack as one atomic script, so a message is answered
exactly once across reclaims and consumers killed mid-batch.

Nothing a message holds can stop a consumer: the client does not decode replies (a value that is not
UTF-8 is answered with an error, not raised by the client library), and a message whose processing
kills the consumer process itself is moved to ``<source>:dead`` once it has been tried
``max_deliveries`` times. Every stream stays bounded: answers and dead letters are added with
``MAXLEN ~ maxlen``, and answered source entries are deleted as they are acknowledged.

The ``redis`` client is imported only inside the functions that talk to a server: importing this
module (as :mod:`.stream` always does) costs nothing to the NDJSON broker.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
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
Message = tuple[str, dict[str, bytes]]  # id, field name (decoded leniently) -> raw value


@dataclass(frozen=True)
class RedisStream:
    """A parsed ``redis://`` source or sink. ``url`` may hold credentials; ``server`` is safe to print."""

    url: str = field(repr=False)
    server: str
    stream: str
    group: str


def dead_letter_stream(*, source: str) -> str:
    """Where messages that were tried ``max_deliveries`` times go: ``<source>:dead``."""
    return f"{source}:dead"


def connect(where: RedisStream, opts: StreamOptions) -> redis.Redis:
    """A client for ``where``'s server, pinged once so an unreachable server fails here, clearly.

    Raises:
        StreamError: the server does not answer.
    """
    import redis  # only the Redis broker needs the client library

    client = redis.Redis.from_url(
        where.url,
        decode_responses=False,  # bytes: a field that is not UTF-8 is the message's fault, not ours
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


def check_streams(*, client: redis.Redis, names: list[str]) -> None:
    """Refuse keys that exist but are not streams: every XADD into them would fail in a consumer.

    Raises:
        StreamError: one of ``names`` holds another type.
    """
    for name in names:
        kind = client.type(name).decode()
        if kind not in ("none", "stream"):
            raise StreamError(
                f"Redis key {name!r} is a {kind}, not a stream: delete it or choose another name"
            )


# Answer and ack in one atomic step, and only while the message is still pending: a message is
# written exactly once, however often it is delivered (a reclaim race, a consumer killed
# mid-batch), with no dedupe state to keep or expire. Checking before XADD matters: Lua has no
# rollback, so an ack must never precede a write that could still fail.
# The answered entry is then deleted (XDEL), not trimmed away with XTRIM MINID: XDEL removes exactly
# what was answered, in the same atomic step, while MINID would need the group's oldest pending and
# undelivered ids, and one message left pending (a slow consumer, a crash not yet reclaimed) would
# hold back everything after it. (Either way the source belongs to this one group.)
# KEYS: source, sink. ARGV: group, version, maxlen, then (id, kind, value) per message.
_ANSWER_AND_ACK = """
local flags = {}
for i = 4, #ARGV, 3 do
  flags[#flags + 1] = 0
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1) > 0 then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*',
               'source_id', ARGV[i], ARGV[i + 1], ARGV[i + 2], 'version', ARGV[2])
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
    redis.call('XDEL', KEYS[1], ARGV[i])
    flags[#flags] = 1
  end
end
return flags
"""

# Take over one message a quiet consumer left pending, or bury it, atomically. The delivery count
# grows only here (and on its first read), just before the message is tried alone: it counts the
# attempts at this message, not the batches it happened to be claimed with, so the messages that
# shared a batch with one that kills consumers are not buried with it.
# KEYS: source, dead-letter stream. ARGV: group, consumer, min_idle_ms, max_deliveries, maxlen,
# reason, id. Returns {0}: no longer idle and pending (answered, or taken by another consumer);
# {1, fields}: claimed; {2, deliveries}: moved to the dead-letter stream and acked; {3}: deleted
# from the source (by its producer's trimming) before it was answered: acked, nothing to answer.
_CLAIM_OR_BURY = """
local id = ARGV[7]
local p = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], id, id, 1)
if #p == 0 then return {0} end
local entry = redis.call('XRANGE', KEYS[1], id, id)
if #entry == 0 then
  redis.call('XACK', KEYS[1], ARGV[1], id)
  return {3}
end
local deliveries = p[1][4]
if deliveries < tonumber(ARGV[4]) then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id)
  return {1, entry[1][2]}
end
local fields = {'source_id', id}
local original = entry[1][2]
-- unpack() is bounded by Lua's C stack (8000 values): keep the first 1000 fields of a huge message
for j = 1, math.min(#original, 2000) do fields[#fields + 1] = original[j] end
for _, v in ipairs({'reason', ARGV[6], 'deliveries', deliveries}) do fields[#fields + 1] = v end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', unpack(fields))
redis.call('XACK', KEYS[1], ARGV[1], id)
redis.call('XDEL', KEYS[1], id)
return {2, deliveries}
"""


class RedisIO:
    """One consumer's reads, reclaims and answers on a source group and a sink stream."""

    def __init__(self, src: RedisStream, sink: str, opts: StreamOptions, *, consumer: str) -> None:
        self.src, self.sink, self.opts, self.consumer = src, sink, opts, consumer
        self.dead_stream = dead_letter_stream(source=src.stream)
        self.redis = connect(src, opts)
        self.answer_script = self.redis.register_script(_ANSWER_AND_ACK)
        self.claim_script = self.redis.register_script(_CLAIM_OR_BURY)
        self.buried = 0  # messages this consumer moved to the dead-letter stream

    def read(self) -> list[Message]:
        s, o = self.src, self.opts
        reply = self.redis.xreadgroup(s.group, self.consumer, {s.stream: ">"}, o.batch_size, o.block_ms)
        return [_message(mid, fields) for _, messages in reply for mid, fields in messages if mid is not None]

    def reclaim(self) -> Iterator[Message]:
        """Messages pending idle for ``min_idle_ms`` (their consumer looks dead), each claimed only when
        the caller takes it; those tried ``max_deliveries`` times are buried instead, not yielded."""
        s, o = self.src, self.opts
        idle = self.redis.xpending_range(s.stream, s.group, "-", "+", o.batch_size, idle=o.min_idle_ms)
        reason = (
            f"tried {o.max_deliveries} times (max_deliveries) and never answered: processing it kills "
            f"the consumer (a crash, out of memory) or outlasts min_idle_ms={o.min_idle_ms}; inspect it, "
            f"fix the cause, then add it to {s.stream!r} again"
        )
        for pending in idle:
            mid = pending["message_id"]
            args = [s.group, self.consumer, o.min_idle_ms, o.max_deliveries, o.maxlen, reason, mid]
            reply = self.claim_script(keys=[s.stream, self.dead_stream], args=args)
            if reply[0] == 1:
                flat = reply[1]
                yield _message(mid, dict(zip(flat[::2], flat[1::2], strict=True)))
            elif reply[0] == 2:
                self.buried += 1

    def pending(self) -> int:
        return int(self.redis.xpending(self.src.stream, self.src.group)["pending"])

    def answer(self, ids: list[str], results: list[dict[str, Any]], version: str) -> list[bool]:
        """Write and ack each message still pending; True where this call did (False: answered before)."""
        args: list[Any] = [self.src.group, version, self.opts.maxlen]
        for mid, res in zip(ids, results, strict=True):
            kind = "error" if "error" in res else "predictions"
            args += [mid, kind, res["error"] if kind == "error" else json.dumps(res["predictions"])]
        return [bool(f) for f in self.answer_script(keys=[self.src.stream, self.sink], args=args)]


def _message(mid: bytes | str, fields: dict[bytes, bytes]) -> Message:
    """An entry as the consumer uses it: ids are ASCII; a field name that is not UTF-8 is replaced."""
    name = mid.decode() if isinstance(mid, bytes) else mid
    return name, {k.decode("utf-8", errors="replace"): v for k, v in (fields or {}).items()}


def consume_redis(run: ConsumerRun, io: RedisIO) -> ConsumerStats:
    """Read, reclaim and answer until ``run`` is stopped or, with ``idle_exit_s``, idle and drained."""
    stats = ConsumerStats(consumer=run.name)
    last_claim = last_message = time.monotonic()
    while not run.stopped():
        fresh = dict(io.read())
        if fresh:  # answered before any reclaim: a fresh message is never reclaimed by its reader
            _answer_messages(run, io, fresh, stats)
        handled = 0
        if not fresh or time.monotonic() - last_claim >= run.options.claim_every_s:
            handled = _reclaim(run, io, stats)
            last_claim = time.monotonic()
        if fresh or handled:
            last_message = time.monotonic()
        elif (
            run.options.idle_exit_s is not None
            and time.monotonic() - last_message >= run.options.idle_exit_s
            and io.pending() == 0
        ):
            break
    return stats


def _reclaim(run: ConsumerRun, io: RedisIO, stats: ConsumerStats) -> int:
    """Answer, one at a time, what quiet consumers left pending; returns how many were handled.

    One at a time: should one of them kill this consumer too, the others were answered before it.
    """
    buried, handled = io.buried, 0
    for mid, fields in io.reclaim():
        stats.reclaimed += 1
        handled += 1
        _answer_messages(run, io, {mid: fields}, stats)
        if run.stopped():
            break  # the rest stays pending, unclaimed, for another consumer
    stats.dead = io.buried
    return handled + io.buried - buried


def _answer_messages(
    run: ConsumerRun, io: RedisIO, messages: dict[str, dict[str, bytes]], stats: ConsumerStats
) -> None:
    ids = list(messages)
    results = run.answer([_message_body(messages[mid]) for mid in ids])
    written = io.answer(ids, results, run.version)
    run.observe(res for res, fresh in zip(results, written, strict=True) if fresh)
    for res, fresh in zip(results, written, strict=True):
        if not fresh:
            stats.duplicates += 1
            continue
        stats.messages += 1
        stats.errors += "error" in res
        stats.rows += len(res.get("predictions", ()))


def _message_body(fields: dict[str, bytes]) -> Any:
    """The request body a Redis entry carries, or the PayloadError that answers it."""
    keys = [k for k in FORMATS if k in fields]
    if len(keys) != 1:
        return PayloadError(
            f"a message needs exactly one field of {list(FORMATS)}, got {sorted(fields)[:5]}; "
            'e.g. XADD <stream> * inputs "[[...], ...]"'
        )
    body = decode_json(fields[keys[0]], f"field {keys[0]!r}")
    return body if isinstance(body, PayloadError) else {keys[0]: body}
