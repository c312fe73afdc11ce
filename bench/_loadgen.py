"""Closed-loop HTTP load generator for bench.serving (its own process, stdlib + psutil only).

    python -m bench._loadgen --port P --path /invocations --body FILE --concurrency 1,8,32
        [--duration 3] [--warmup 1] [--prime 0 --prime-concurrency C] [--watch-pid PID] [--cdf]

C keep-alive connections each send the same pre-encoded POST, wait for the whole response,
and send again at once (closed loop: offered load follows the server). Kept lean on purpose
(asyncio Protocol, hand-parsed HTTP/1.1 with Content-Length, no client library): ~0.1 ms of
CPU per request (0.06-0.26 cores in bench.serving), the rest is the server's. Prints one JSON line per
concurrency level: requests/s, latency percentiles (ms), non-200 answers, and the CPU used in
the measured window by this process and by the server's process tree (``--watch-pid``), in
cores (CPU seconds / wall seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import psutil

CDF_POINTS = [*range(0, 100), 99.5, 99.9, 100]


class _Conn(asyncio.Protocol):
    """One keep-alive connection; ``request()`` resolves to the response's status code."""

    def __init__(self) -> None:
        self.buf = b""
        self.need: int | None = None
        self.status = 0
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
                self._done(RuntimeError("response without Content-Length"))
                return
            stop = head.find(b"\r\n", at)
            length = int(head[at + 15 : stop if stop >= 0 else len(head)])
            self.need = end + 4 + length
        if len(self.buf) >= self.need:
            self.buf = self.buf[self.need :]
            self.need = None
            self._done(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._done(exc or ConnectionError("server closed the connection"))

    def _done(self, exc: Exception | None) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(self.status)
            else:
                waiter.set_exception(exc)

    def request(self, data: bytes) -> asyncio.Future:
        self.waiter = asyncio.get_running_loop().create_future()
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


async def _measure(args: argparse.Namespace, request: bytes, concurrency: int) -> dict:
    loop = asyncio.get_running_loop()
    conns = [(await loop.create_connection(_Conn, "127.0.0.1", args.port))[1] for _ in range(concurrency)]
    t_start = time.perf_counter() + args.warmup
    t_end = t_start + args.duration
    latencies: list[float] = []
    codes: dict[int, int] = {}

    async def client(conn: _Conn) -> None:
        while (t0 := time.perf_counter()) < t_end:
            status = await conn.request(request)
            t1 = time.perf_counter()
            if t_start <= t1 < t_end:  # answers that arrived inside the measured window
                latencies.append(t1 - t0)
                codes[status] = codes.get(status, 0) + 1

    tasks = [asyncio.ensure_future(client(c)) for c in conns]
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
    ok = codes.get(200, 0)

    def pct(q: float) -> float:
        return round(lat[min(n - 1, int(q / 100 * n))] * 1e3, 3) if n else float("nan")

    line = {
        "concurrency": concurrency,
        "requests": n,
        "ok": ok,
        "non_200": {str(k): v for k, v in codes.items() if k != 200},
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
    if args.cdf:
        line["cdf_ms"] = [pct(q) for q in CDF_POINTS]
    return line


async def _main(args: argparse.Namespace) -> None:
    body = Path(args.body).read_bytes()
    request = (
        f"POST {args.path} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    if args.prime:  # warm the server (first batch shapes, caches, connections); not reported
        primer = argparse.Namespace(**{**vars(args), "warmup": args.prime, "duration": 0.01, "cdf": False})
        await _measure(primer, request, args.prime_concurrency or max(args.concurrency))
    for concurrency in args.concurrency:
        print(json.dumps(await _measure(args, request, concurrency)), flush=True)


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
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
