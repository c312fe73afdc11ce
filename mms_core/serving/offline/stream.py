"""Streaming prediction on Dask: long-lived consumers read messages, predict them in micro-batches
(one forward pass each) and write one answer per message to a sink: nothing lost, nothing twice.

Brokers, by URI: ``redis://host:port/db?stream=NAME[&group=G]`` is a Redis Stream read by a consumer
group, answered into another stream on the same server (answer + ack is one atomic script; a
consumer killed mid-batch leaves its messages pending and a live one reclaims them; a message that
keeps killing consumers goes to ``NAME:dead`` after ``max_deliveries``; every stream stays bounded).
Anything else is a directory (fsspec URI) of ``*.ndjson`` files, the embedded default: each sink file
answers the source file of the same name line by line, written atomically; its existence is the ack.

A Redis entry has one field named after a :data:`FORMATS` key (``inputs``, ...) holding JSON; an
NDJSON line is ``{"id": ..., "inputs": ...}``. A bad message (bytes that are not UTF-8, not JSON,
numbers or nesting too big to decode, a shape the model cannot take) gets an ``error`` answer and is
acknowledged: never retried, never fatal to the consumer.

This module is the public entry: it parses the URIs and places consumers on Dask. The brokers are
:mod:`.stream_redis` and :mod:`.stream_ndjson`; options, stats and the per-consumer context, which
both use, are :mod:`.stream_consumer`.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit, urlunsplit

from distributed import Client, Event, secede

from mms_core import storage
from mms_core.monitoring.stats import RunningStats
from mms_core.packaging import PackageConfig
from mms_core.serving.offline.predictors import cached_predictor
from mms_core.serving.offline.stream_consumer import (
    ConsumerRun,
    ConsumerStats,
    StopFlag,
    StreamError,
    StreamOptions,
    StreamResult,
)
from mms_core.serving.offline.stream_ndjson import consume_ndjson
from mms_core.serving.offline.stream_redis import (
    RedisIO,
    RedisStream,
    check_streams,
    connect,
    consume_redis,
    dead_letter_stream,
    ensure_group,
)
from mms_core.serving.payload import InputSchema

__all__ = [
    "ConsumerStats",
    "RedisStream",
    "StreamError",
    "StreamOptions",
    "StreamResult",
    "cached_predictor",
    "check_endpoints",
    "consume",
    "parse_stream_uri",
    "run_stream",
    "stream_registered",
]


def parse_stream_uri(uri: str, *, role: Literal["source", "sink"]) -> RedisStream | str:
    """A :class:`RedisStream` for ``redis://``/``rediss://`` URIs, else the directory URI itself.

    Raises:
        StreamError: a Redis URI with no ``stream``, a bad db number, or an unknown query key.
    """
    parts = urlsplit(uri)
    if parts.scheme not in ("redis", "rediss"):
        return uri.rstrip("/")
    db = parts.path.strip("/") or "0"
    server = f"{parts.scheme}://{parts.hostname or '127.0.0.1'}:{parts.port or 6379}/{db}"
    example = f"{server}?stream=requests" + ("&group=mms" if role == "source" else "")
    allowed = {"stream", "group"} if role == "source" else {"stream"}
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise StreamError(f"{role} {server}: unknown query key(s) {unknown}; allowed {sorted(allowed)}")
    stream = query.get("stream", [""])[-1]
    if not stream:
        raise StreamError(f"{role} {server}: name the stream, e.g. {example}")
    if not db.isdigit():
        raise StreamError(f"{role} {server}: the path must be a database number, e.g. {example}")
    url = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return RedisStream(url=url, server=server, stream=stream, group=query.get("group", ["mms"])[-1])


def check_endpoints(
    *, source: str, sink: str, options: StreamOptions
) -> tuple[RedisStream, RedisStream] | tuple[str, str]:
    """Parse both URIs, refuse unusable pairs, and prepare the broker (consumer group, sink directory).

    Raises:
        StreamError: bad URI, a Redis URI mixed with a directory, sink equal to source (or to its
            dead-letter stream), a stream name held by a key of another type, unreachable Redis, or
            a missing source directory.
    """
    src, dst = parse_stream_uri(source, role="source"), parse_stream_uri(sink, role="sink")
    if isinstance(src, RedisStream) != isinstance(dst, RedisStream):
        raise StreamError("source and sink must both be redis:// streams or both be directories")
    if isinstance(src, RedisStream) and isinstance(dst, RedisStream):
        if src.server != dst.server:  # one server: answer + ack is one atomic script
            raise StreamError(f"the sink must be on the source's server {src.server}, not {dst.server}")
        if src.stream == dst.stream:
            raise StreamError(f"sink is the source stream {src.stream!r}: answers would be read as requests")
        if dst.stream == dead_letter_stream(source=src.stream):
            raise StreamError(
                f"sink {dst.stream!r} is the source's dead-letter stream: choose another stream"
            )
        client = connect(src, options)
        check_streams(client=client, names=[src.stream, dst.stream, dead_letter_stream(source=src.stream)])
        ensure_group(client, src)
        return src, dst
    src_fs, src_path = storage.fs_and_path(src)
    dst_fs, dst_path = storage.fs_and_path(dst)
    if (src_fs.protocol, src_path) == (dst_fs.protocol, dst_path):
        raise StreamError(f"sink is the source directory {src}: choose another --sink")
    if not src_fs.isdir(src_path):
        raise StreamError(f"source directory {src} does not exist; create it and put *.ndjson files in it")
    dst_fs.makedirs(dst_path, exist_ok=True)
    return src, dst


def consume(
    *,
    config: PackageConfig,
    weights: bytes,
    model_version: str,
    source: str,
    sink: str,
    index: int = 0,
    n_consumers: int = 1,
    name: str | None = None,
    options: StreamOptions | None = None,
    stop: StopFlag | None = None,
) -> ConsumerStats:
    """Run one consumer until ``stop.is_set()`` or, with ``options.idle_exit_s``, until idle.

    Runs in the calling process (a Dask worker under :func:`run_stream`). Redis consumers share the
    group's messages; NDJSON consumers split the files by a hash of the name (``index`` of
    ``n_consumers``). ``name`` is the Redis consumer name (default: host-pid-index).

    Raises:
        StreamError: see :func:`check_endpoints`.
    """
    opts = options or StreamOptions()
    src, dst = check_endpoints(source=source, sink=sink, options=opts)
    run = ConsumerRun(
        predictor=cached_predictor(config=config, weights=weights),
        schema=InputSchema(features=config.features, mean=config.mean, nan_policy=opts.nan_policy),
        version=model_version,
        options=opts,
        name=name or f"{socket.gethostname()}-{os.getpid()}-{index}",
        index=index,
        n_consumers=n_consumers,
        stop=stop,
        monitor=RunningStats(
            features=config.features, mean=config.mean, std=config.std, version=model_version
        ),
    )
    try:
        if isinstance(src, RedisStream) and isinstance(dst, RedisStream):
            return consume_redis(run, RedisIO(src, dst.stream, opts, consumer=run.name))
        return consume_ndjson(run=run, src=str(src), dst=str(dst))
    finally:
        run.write_stats(force=True)


def _consumer_task(package: tuple[PackageConfig, bytes], *, stop_name: str, **kwargs: Any) -> ConsumerStats:
    secede()  # long-running: free the worker's thread so other tasks (and more consumers) still run
    return consume(config=package[0], weights=package[1], stop=Event(stop_name), **kwargs)


def run_stream(
    *,
    client: Client,
    config: PackageConfig,
    weights: bytes,
    model_version: str,
    source: str,
    sink: str,
    consumers: int = 2,
    options: StreamOptions | None = None,
    stop_event: str | None = None,
) -> StreamResult:
    """Run ``consumers`` long-lived consumers on the Dask workers until they stop; gather their stats.

    They stop when the ``distributed.Event`` named ``stop_event`` is set, or (``options.idle_exit_s``)
    when idle. The model's bytes are broadcast once; each worker builds the network once. If this call
    is interrupted, the consumers are told to stop; their unacknowledged messages stay pending.

    Raises:
        StreamError: bad URIs, unreachable Redis, a missing source directory, or no Dask workers.
    """
    opts = options or StreamOptions()
    if consumers < 1:
        raise StreamError(f"consumers must be at least 1, got {consumers}")
    check_endpoints(source=source, sink=sink, options=opts)  # fail here, not in a worker's traceback
    workers = sorted(client.nthreads())
    if not workers:
        raise StreamError("the Dask cluster has no workers: start some (mms stack up) and retry")
    package = client.scatter([(config, weights)], broadcast=True, hash=False)[0]  # a tuple would be split
    stop_name = stop_event or f"mms-stream-stop-{uuid.uuid4().hex}"
    token = uuid.uuid4().hex[:8]
    common = dict(model_version=model_version, source=source, sink=sink, n_consumers=consumers, options=opts)
    futures = [
        client.submit(
            _consumer_task,
            package,
            key=f"mms-stream-consumer-{i}-{token}",
            workers=[workers[i % len(workers)]],  # spread over workers; may move if one dies
            allow_other_workers=True,
            pure=False,
            **common,
            index=i,
            stop_name=stop_name,
        )
        for i in range(consumers)
    ]
    try:
        stats: list[ConsumerStats] = client.gather(futures)
    except BaseException:
        Event(stop_name, client=client).set()  # a seceded task ignores cancel(): tell it to stop
        raise
    counts = ("messages", "rows", "errors", "reclaimed", "duplicates", "files", "dead")
    totals = {f: sum(getattr(s, f) for s in stats) for f in counts}
    return StreamResult(source=source, sink=sink, model_version=model_version, consumers=stats, **totals)


def stream_registered(
    *, client: Client, tracking_uri: str, model: str, source: str, sink: str, **options: Any
) -> StreamResult:
    """:func:`run_stream` for a registered model given as ``NAME@ALIAS`` or ``NAME/VERSION``."""
    from mms_core.registry import load_package

    config, weights, version = load_package(tracking_uri=tracking_uri, model=model)
    package = {"config": config, "weights": weights, "model_version": version}
    return run_stream(client=client, source=source, sink=sink, **package, **options)
