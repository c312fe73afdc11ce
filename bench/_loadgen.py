"""Closed-loop HTTP load generator for bench.serving (its own process, stdlib + psutil only).

    python -m bench._loadgen --port P --path /invocations --body FILE --concurrency 1,8,32
        [--duration 3] [--warmup 1] [--prime 0 --prime-concurrency C] [--watch-pid PID] [--cdf]
        [--bad-fraction 0.05 --seed 0] [--expect '[0]'] [--timeout 5]

C keep-alive connections each send the same pre-encoded POST, wait for the whole response,
and send again at once (closed loop: offered load follows the server). Kept lean on purpose
(asyncio Protocol, hand-parsed HTTP/1.1 with Content-Length, no client library): ~0.1 ms of
CPU per request (0.06-0.26 cores in bench.serving), the rest is the server's. Prints one JSON line per
concurrency level: requests/s, latency percentiles (ms), non-200 answers, and the CPU used in
the measured window by this process and by the server's process tree (``--watch-pid``), in
cores (CPU seconds / wall seconds).

Mixed traffic (``--bad-fraction F``): each send is, with probability F, one of the malformed
requests of ``bad_requests`` (the kinds in ``KINDS``, what a hostile or broken client sends)
instead of the good one, drawn from a generator seeded with ``--seed`` (the same sequence of
picks every run; the kinds taken in turn, each round shuffled, so every kind comes up). The
line's ``requests``, ``ok``, ``non_200``, ``rps`` and latencies are then the good requests'
alone; ``bad`` counts the malformed ones' answers by status and by kind. ``--expect JSON``: a
good request is ``ok`` only if it got 200 with ``predictions`` equal to JSON (else ``wrong``).
``--timeout S``: a request unanswered after S seconds counts as ``timeout`` and its connection is
replaced, as is one the server closed (``conn_error`` when no answer came), so a stuck server
cannot hang the run. With any of these three options the line also has ``after_window``: the
outcomes, good ("good") and by malformed kind, of the requests answered (or given up) after the
window closed, which the figures leave out; a request stuck past the window shows up there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import psutil

CDF_POINTS = [*range(0, 100), 99.5, 99.9, 100]
# The malformed requests of mixed traffic, in a fixed order (bad_requests builds each).
KINDS = (
    "nested_rows",  # {"inputs": [[[0.5], [0.5], ...]]}: a row of the right length, one level too deep
    "wrong_width",  # a row with fewer values than the model's features
    "string_value",  # one value a string
    "nan_tokens",  # NaN / Infinity / -Infinity tokens in the JSON text (Python's json writes them)
    "deep_nesting",  # 5000 levels of '['
    "huge_int",  # a 5000-digit integer as a value
    "invalid_utf8",  # bytes that are not UTF-8 inside a JSON string
    "not_json",  # a form-encoded body
    "text_plain",  # the good body, sent as Content-Type: text/plain
    "empty_body",  # Content-Length: 0
)
DEPTH, DIGITS = 5000, 5000


def row_width(body: bytes) -> int:
    """The number of features in a good body: its first ``inputs`` row or its ``dataframe_split``
    columns."""
    doc = json.loads(body)
    if "dataframe_split" in doc:
        return len(doc["dataframe_split"]["columns"])
    return len(doc["inputs"][0])


def bad_requests(good: bytes, width: int) -> dict[str, tuple[str, bytes]]:
    """Each malformed kind of ``KINDS`` -> (Content-Type, body), for a model of ``width`` features
    whose well-formed body is ``good``."""
    rest = b", 0.5" * (width - 1)
    return {
        "nested_rows": ("application/json", json.dumps({"inputs": [[[0.5]] * width]}).encode()),
        "wrong_width": ("application/json", json.dumps({"inputs": [[0.5] * (width // 2)]}).encode()),
        "string_value": ("application/json", b'{"inputs": [["0.5"' + rest + b"]]}"),
        "nan_tokens": (
            "application/json",
            b'{"inputs": [[NaN, Infinity, -Infinity' + b", 0.5" * (width - 3) + b"]]}",
        ),
        "deep_nesting": ("application/json", b'{"inputs": ' + b"[" * DEPTH + b"]" * DEPTH + b"}"),
        "huge_int": ("application/json", b'{"inputs": [[' + b"9" * DIGITS + rest + b"]]}"),
        "invalid_utf8": ("application/json", b'{"inputs": [["\xff\xfe\xc3\x28"' + rest + b"]]}"),
        "not_json": ("application/json", b"inputs=0.5&inputs=0.5&inputs=0.5"),
        "text_plain": ("text/plain", good),
        "empty_body": ("application/json", b""),
    }


class Mix:
    """Which request each send is: None (the good one) or a malformed kind. Seeded: the same
    ``seed`` gives the same sequence of picks; malformed kinds come in rounds of all ``kinds``,
    each round in a shuffled order."""

    def __init__(self, fraction: float, seed: int, kinds: tuple[str, ...] = KINDS) -> None:
        self.fraction, self.kinds = fraction, kinds
        self.rng = random.Random(seed)
        self.round: list[str] = []

    def next(self) -> str | None:
        if self.fraction <= 0 or self.rng.random() >= self.fraction:
            return None
        if not self.round:
            self.round = list(self.kinds)
            self.rng.shuffle(self.round)
        return self.round.pop()


def http_request(*, port: int, path: str, body: bytes, content_type: str = "application/json") -> bytes:
    """A pre-encoded HTTP/1.1 POST."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class _Conn(asyncio.Protocol):
    """One keep-alive connection; ``request()`` resolves to the response's (status, body).
    With ``timeout`` > 0 an unanswered request fails with TimeoutError and aborts the connection."""

    def __init__(self, timeout: float = 0.0) -> None:
        self.buf = b""
        self.need: int | None = None
        self.body_at = 0
        self.status = 0
        self.timeout = timeout
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False  # the connection cannot carry another request: open a new one
        self.waiter: asyncio.Future | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            self.status = int(head[9:12])
            at = head.find(b"content-length:")
            if at < 0:
                self.closed = True
                self._done(RuntimeError("response without Content-Length"))
                return
            stop = head.find(b"\r\n", at)
            length = int(head[at + 15 : stop if stop >= 0 else len(head)])
            if b"\r\nconnection: close" in head:
                self.closed = True
            self.body_at = end + 4
            self.need = end + 4 + length
        if len(self.buf) >= self.need:
            body = self.buf[self.body_at : self.need]
            self.buf = self.buf[self.need :]
            self.need = None
            self._done(None, body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._done(exc or ConnectionError("server closed the connection"))

    def _expire(self) -> None:
        self.timer = None
        self.closed = True
        self._done(TimeoutError(f"no answer in {self.timeout} s"))
        if self.transport is not None:
            self.transport.abort()

    def _done(self, exc: Exception | None, body: bytes = b"") -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result((self.status, body))
            else:
                waiter.set_exception(exc)

    def request(self, data: bytes) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        if self.closed:
            self.waiter.set_exception(ConnectionError("connection closed"))
            return self.waiter
        if self.timeout > 0:
            self.timer = loop.call_later(self.timeout, self._expire)
        self.transport.write(data)
        return self.waiter


def _tree_cpu(pid: int | None) -> tuple[float, float]:
    """CPU seconds so far of process ``pid`` itself and of all its descendants."""
    if pid is None:
        return 0.0, 0.0
    try:
        root = psutil.Process(pid)
        own = root.cpu_times()
        kids = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    rest = 0.0
    for p in kids:
        try:
            t = p.cpu_times()
            rest += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return own.user + own.system, rest


def _add(counts: dict, key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def _outcome(status: int, body: bytes, expect: object) -> str:
    """'ok', 'wrong' (200, other predictions than expected) or the status as text."""
    if status != 200:
        return str(status)
    if expect is None:
        return "ok"
    try:
        return "ok" if json.loads(body).get("predictions") == expect else "wrong"
    except (ValueError, AttributeError):
        return "wrong"


async def _measure(args: argparse.Namespace, requests: dict[str | None, bytes], concurrency: int) -> dict:
    """One level: ``requests`` maps None to the good request and each malformed kind to its own."""
    loop = asyncio.get_running_loop()
    timeout = args.timeout

    async def connect() -> _Conn:
        return (await loop.create_connection(lambda: _Conn(timeout), "127.0.0.1", args.port))[1]

    conns = [await connect() for _ in range(concurrency)]
    mix = Mix(args.bad_fraction, args.seed)
    t_start = time.perf_counter() + args.warmup
    t_end = t_start + args.duration
    latencies: list[float] = []
    good: dict[str, int] = {}  # outcome -> count, good requests
    bad: dict[str, dict[str, int]] = {}  # kind -> outcome -> count
    late: dict[str, dict[str, int]] = {}  # answers (or timeouts) after the window: "good"/kind -> ...

    async def client(i: int) -> None:
        while (t0 := time.perf_counter()) < t_end:
            kind = None
            try:
                if conns[i].closed:  # timed out, or closed by the server: a new connection
                    conns[i].transport.close()
                    conns[i] = await asyncio.wait_for(connect(), timeout or None)
                kind = mix.next()
                status, body = await conns[i].request(requests[kind])
                outcome = _outcome(status, body, args.expect) if kind is None else str(status)
            except TimeoutError:  # before OSError: TimeoutError is one
                outcome = "timeout"
            except (OSError, RuntimeError):
                outcome = "conn_error"
                await asyncio.sleep(0.01)
            t1 = time.perf_counter()
            if t_start <= t1 < t_end:  # answers that arrived inside the measured window
                if kind is None:
                    latencies.append(t1 - t0)
                    _add(good, outcome)
                else:
                    _add(bad.setdefault(kind, {}), outcome)
            elif t1 >= t_end:  # in flight at the end: outside the figures, but a timeout still counts
                _add(late.setdefault(kind or "good", {}), outcome)

    tasks = [asyncio.ensure_future(client(i)) for i in range(concurrency)]
    await asyncio.sleep(max(0.0, t_start - time.perf_counter()))
    cpu0, own0, wall0 = _tree_cpu(args.watch_pid), time.process_time(), time.perf_counter()
    await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
    cpu1, own1, wall1 = _tree_cpu(args.watch_pid), time.process_time(), time.perf_counter()
    await asyncio.gather(*tasks)
    for conn in conns:
        conn.transport.close()
    wall = wall1 - wall0
    lat = sorted(latencies)
    n = len(lat)
    ok = good.get("ok", 0)

    def pct(q: float) -> float:
        return round(lat[min(n - 1, int(q / 100 * n))] * 1e3, 3) if n else float("nan")

    line = {
        "concurrency": concurrency,
        "requests": n,
        "ok": ok,
        "non_200": {k: v for k, v in good.items() if k not in ("ok", "200", "wrong")},
        "rps": round(ok / args.duration, 1),
        "mean_ms": round(sum(lat) / n * 1e3, 3) if n else float("nan"),
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "max_ms": pct(100),
        "server_cores": round((sum(cpu1) - sum(cpu0)) / wall, 3) if args.watch_pid else None,
        "server_main_cores": round((cpu1[0] - cpu0[0]) / wall, 3) if args.watch_pid else None,
        "loadgen_cores": round((own1 - own0) / wall, 3),
    }
    if args.expect is not None:
        line["wrong"] = good.get("wrong", 0)
    if args.bad_fraction > 0:
        statuses: dict[str, int] = {}
        for counts in bad.values():
            for k, v in counts.items():
                statuses[k] = statuses.get(k, 0) + v
        line["bad_fraction"], line["seed"] = args.bad_fraction, args.seed
        line["bad"] = {
            "requests": sum(statuses.values()),
            "statuses": dict(sorted(statuses.items())),
            "by_kind": {k: dict(sorted(bad[k].items())) for k in KINDS if k in bad},
        }
    if args.expect is not None or args.bad_fraction > 0 or args.timeout > 0:
        line["after_window"] = {k: dict(sorted(late[k].items())) for k in ("good", *KINDS) if k in late}
    if args.cdf:
        line["cdf_ms"] = [pct(q) for q in CDF_POINTS]
    return line


async def _main(args: argparse.Namespace) -> None:
    good = Path(args.body).read_bytes()
    requests: dict[str | None, bytes] = {None: http_request(port=args.port, path=args.path, body=good)}
    if args.bad_fraction > 0:
        for kind, (ctype, body) in bad_requests(good, row_width(good)).items():
            requests[kind] = http_request(port=args.port, path=args.path, body=body, content_type=ctype)
    if args.prime:  # warm the server (first batch shapes, caches, connections); not reported
        primer = argparse.Namespace(
            **{**vars(args), "warmup": args.prime, "duration": 0.01, "cdf": False, "bad_fraction": 0.0}
        )
        await _measure(primer, requests, args.prime_concurrency or max(args.concurrency))
    for concurrency in args.concurrency:
        print(json.dumps(await _measure(args, requests, concurrency)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--body", required=True, help="file holding the JSON request body")
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1])
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each level")
    parser.add_argument(
        "--prime", type=float, default=0.0, help="unreported seconds at top concurrency first"
    )
    parser.add_argument("--prime-concurrency", type=int, default=0, help="default: the top level")
    parser.add_argument("--watch-pid", type=int, default=None, help="server pid: report its tree's CPU")
    parser.add_argument("--cdf", action="store_true", help="add latency percentiles 0..100 (ms)")
    parser.add_argument(
        "--bad-fraction", type=float, default=0.0, help="share of sends that are malformed (KINDS)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the good/malformed draw")
    parser.add_argument(
        "--expect", type=json.loads, default=None, help="JSON: the predictions a good request must get"
    )
    parser.add_argument(
        "--timeout", type=float, default=0.0, help="seconds before a request counts as timed out (0: never)"
    )
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
