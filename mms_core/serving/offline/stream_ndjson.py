"""The embedded NDJSON broker of :mod:`.stream`: a source directory of ``*.ndjson`` files, each
answered line by line by the sink file of the same name, written atomically; its existence is the ack.

A consumer lists the sink once, when it starts, and from then on keeps the names it answered in
memory: a long-running consumer lists only the source on each poll, however many files it answered.
A sink file that appears after the start (another consumer of the same files) is seen by one
``exists`` check just before the file would be answered, so nothing is answered twice.
"""

from __future__ import annotations

import json
import time
import zlib
from typing import Any

from mms_core import storage
from mms_core.serving.offline.stream_consumer import ConsumerRun, ConsumerStats, decode_json


def consume_ndjson(*, run: ConsumerRun, src: str, dst: str) -> ConsumerStats:
    """Answer this consumer's unanswered source files until ``run`` is stopped or, with
    ``idle_exit_s``, idle.

    Args:
        run: The consumer's context (predictor, options, stop flag, index of ``n_consumers``).
        src: Source directory URI.
        dst: Sink directory URI.

    Returns:
        What this consumer did.
    """
    stats = ConsumerStats(consumer=run.name)
    answered = set(_names(dst))  # seeded once; then kept up to date by this consumer itself
    last_file = time.monotonic()
    while not run.stopped():
        todo = [n for n in _names(src) if n not in answered and _mine(n, run)]
        for name in todo:
            if run.stopped():
                break
            if _answer_file(run, storage.join(src, name), storage.join(dst, name), stats):
                answered.add(name)
        if todo:
            last_file = time.monotonic()
        elif run.options.idle_exit_s is not None and time.monotonic() - last_file >= run.options.idle_exit_s:
            break
        else:
            time.sleep(run.options.block_ms / 1000)
    return stats


def _names(directory: str) -> list[str]:
    """The ``*.ndjson`` file names in ``directory``, sorted. Dot-files are temp files of atomic writes."""
    fs, path = storage.fs_and_path(directory)
    names = (p.rsplit("/", 1)[-1] for p in fs.glob(f"{path}/*.ndjson"))
    return sorted(n for n in names if not n.startswith("."))


def _mine(name: str, run: ConsumerRun) -> bool:
    return zlib.crc32(name.encode()) % run.n_consumers == run.index


def _answer_file(run: ConsumerRun, src_uri: str, dst_uri: str, stats: ConsumerStats) -> bool:
    """Write the sink file answering ``src_uri``; False if the source is gone. True also when another
    consumer answered it since this one started (then nothing is written)."""
    dst_fs, dst_path = storage.fs_and_path(dst_uri)
    if dst_fs.exists(dst_path):
        return True
    try:
        raw = storage.read_bytes(src_uri)
    except FileNotFoundError:  # removed since the listing: nothing to answer (it may come back)
        return False
    # Split bytes, not text: a line that is not UTF-8 is answered alone, and a U+2028 inside a JSON
    # string (which str.splitlines would cut) stays one line.
    lines = [(n, line) for n, line in enumerate(raw.splitlines(), 1) if line.strip()]
    out: list[str] = []
    for start in range(0, len(lines), run.options.batch_size):
        chunk = lines[start : start + run.options.batch_size]
        records = [decode_json(line, f"line {n}") for n, line in chunk]
        results = run.answer(records)
        run.observe(results)
        for (n, _), record, res in zip(chunk, records, results, strict=True):
            out.append(_answer_line(n, record, res, run.version))
            if "error" in res:
                stats.errors += 1
            else:
                stats.rows += len(res["predictions"])
        stats.messages += len(chunk)
    storage.write_bytes_atomic(dst_uri, "".join(f"{line}\n" for line in out).encode())
    stats.files += 1
    return True


def _answer_line(n: int, record: Any, res: dict[str, Any], version: str) -> str:
    """The sink line answering line ``n``: its id (the line number if it has none), then the answer."""
    rid = record.get("id", n) if isinstance(record, dict) else n
    if "error" in res:
        body: dict[str, Any] = {"id": rid, "line": n, "error": res["error"]}
    else:
        body = {"id": rid, "predictions": res["predictions"], "version": version}
    try:
        return json.dumps(body)
    except (ValueError, TypeError, RecursionError):  # an id that cannot be written back (too deep)
        return json.dumps(body | {"id": n, "line": n})
