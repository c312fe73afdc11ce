"""bench.serving's mixed traffic without a real server: the load generator's malformed requests
(every kind, seeded), its accounting against a stand-in server that jams on one kind, the
summary of clean/mixed pairs, and the report's table row."""

from __future__ import annotations

import argparse
import asyncio
import json

import pytest

from bench import _loadgen as lg
from bench import serving

GOOD = json.dumps({"inputs": [[0.5] * 64]}).encode()
MACHINE, DATE = "x86_64 2 cpu", "2026-12-03"


# ---- the malformed requests ------------------------------------------------------------------------
def test_every_kind_is_drawn_in_seeded_rounds() -> None:
    picks = [lg.Mix(0.05, seed=7).next() for _ in range(1)]  # a fresh generator per call: same pick
    assert picks == [lg.Mix(0.05, seed=7).next()]
    a, b, c = (lg.Mix(0.05, seed=s) for s in (7, 7, 8))
    seq_a, seq_b, seq_c = ([m.next() for _ in range(4000)] for m in (a, b, c))
    assert seq_a == seq_b  # deterministic per seed
    assert seq_a != seq_c
    bad = [k for k in seq_a if k is not None]
    assert 0.035 < len(bad) / len(seq_a) < 0.065
    assert set(bad) == set(lg.KINDS)
    rounds = [bad[i : i + len(lg.KINDS)] for i in range(0, len(bad) - len(lg.KINDS) + 1, len(lg.KINDS))]
    assert all(sorted(r) == sorted(lg.KINDS) for r in rounds)  # each kind once per round
    assert {lg.Mix(0.0, seed=1).next() for _ in range(100)} == {None}


def test_bad_requests_are_what_they_say() -> None:
    width = lg.row_width(GOOD)
    assert width == 64
    assert (
        lg.row_width(json.dumps({"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2]]}}).encode()) == 2
    )
    reqs = lg.bad_requests(GOOD, width)
    assert tuple(reqs) == lg.KINDS
    body = {k: b for k, (_, b) in reqs.items()}
    nested = json.loads(body["nested_rows"])["inputs"]
    assert len(nested) == 1 and len(nested[0]) == width and nested[0][0] == [0.5]  # right length, too deep
    assert len(json.loads(body["wrong_width"])["inputs"][0]) != width
    row = json.loads(body["string_value"])["inputs"][0]
    assert len(row) == width and "0.5" in row
    row = json.loads(body["nan_tokens"])["inputs"][0]  # Python's json reads the tokens, strict JSON does not
    assert len(row) == width and b"NaN" in body["nan_tokens"] and b"Infinity" in body["nan_tokens"]
    assert body["deep_nesting"].count(b"[") == lg.DEPTH
    assert len(json.loads(body["huge_int"], parse_int=str)["inputs"][0][0]) == lg.DIGITS
    with pytest.raises(UnicodeDecodeError):
        body["invalid_utf8"].decode()
    with pytest.raises(ValueError):
        json.loads(body["not_json"])
    assert reqs["text_plain"] == ("text/plain", GOOD)
    assert body["empty_body"] == b""
    assert all(ctype == "application/json" for k, (ctype, _) in reqs.items() if k != "text_plain")
    head = lg.http_request(port=1, path="/p", body=b"", content_type="text/plain")
    assert b"Content-Type: text/plain\r\n" in head and head.endswith(b"Content-Length: 0\r\n\r\n")


# ---- the load generator against a stand-in server ----------------------------------------------------
async def _stand_in(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.1 keep-alive: the good body gets {"predictions": [3]}, text/plain 200, nested rows
    never an answer (the jam), deep nesting a 500 and a closed connection, the rest 422."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
            close = b""
            if body.startswith(b'{"inputs": [[[0.5]'):
                await asyncio.sleep(60)
            if body == GOOD:
                status, out = 200, b'{"predictions": [3], "model": "m", "version": "1"}'
            elif body.startswith(b'{"inputs": [[[['):
                status, out, close = 500, b"{}", b"Connection: close\r\n"
            else:
                status, out = 422, b'{"error": {}}'
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Length: {len(out)}\r\n".encode() + close + b"\r\n" + out
            )
            await writer.drain()
            if close:
                writer.close()
                return
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def _run(fraction: float, expect: object) -> dict:
    async def go() -> dict:
        server = await asyncio.start_server(_stand_in, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        args = argparse.Namespace(
            port=port, warmup=0.05, duration=0.6, watch_pid=None, cdf=False, bad_fraction=fraction,
            seed=0, expect=expect, timeout=0.2,
        )  # fmt: skip
        reqs: dict[str | None, bytes] = {None: lg.http_request(port=port, path="/p", body=GOOD)}
        for kind, (ctype, body) in lg.bad_requests(GOOD, 64).items():
            reqs[kind] = lg.http_request(port=port, path="/p", body=body, content_type=ctype)
        try:
            return await lg._measure(args, reqs, 4)
        finally:
            server.close()

    return asyncio.run(go())


def test_loadgen_counts_good_and_bad_apart_and_survives_a_jam() -> None:
    line = _run(0.5, [3])  # half malformed: every kind comes up in 0.6 s
    assert line["ok"] > 0 and line["wrong"] == 0 and line["requests"] >= line["ok"]
    assert line["rps"] == round(line["ok"] / 0.6, 1)
    bad = line["bad"]
    kinds = set(bad["by_kind"]) | set(line["after_window"]) - {"good"}
    assert kinds == set(lg.KINDS)  # every kind sent and accounted, in the window or after it
    assert bad["by_kind"]["text_plain"] == {"200": bad["by_kind"]["text_plain"]["200"]}
    assert set(bad["by_kind"]["deep_nesting"]) == {"500"}  # then a new connection, no error
    jammed = bad["by_kind"].get("nested_rows", {}) | line["after_window"].get("nested_rows", {})
    assert set(jammed) == {"timeout"}
    assert bad["requests"] == sum(bad["statuses"].values())

    clean = _run(0.0, [4])  # wrong expected prediction: answered 200, not ok
    assert clean["ok"] == 0 and clean["wrong"] == clean["requests"] > 0 and "bad" not in clean


# ---- the summary and the report ---------------------------------------------------------------------
def mixed_line(pair: int, condition: str, rps: float, p99: float, **extra: object) -> dict:
    line = {"bench": "serving", "machine": MACHINE, "date": DATE, "measure": "mixed_load", "pair": pair}
    line |= {"condition": condition, "duration_s": 2.0, "rps": rps, "p50_ms": p99 / 2, "p99_ms": p99}
    line |= {"non_200": {}, "wrong": 0, "after_window": {"good": {"ok": 16}}}
    if condition == "mixed":
        by_kind = {k: {"422": 3} for k in lg.KINDS}
        line["bad"] = {"requests": 30, "statuses": {"422": 30}, "by_kind": by_kind}
    return line | extra


def mixed_lines() -> list[dict]:
    return [
        mixed_line(0, "clean", 1000.0, 20.0),
        mixed_line(0, "mixed", 950.0, 22.0),
        mixed_line(1, "mixed", 900.0, 26.0),
        mixed_line(1, "clean", 1000.0, 20.0),
        mixed_line(2, "clean", 800.0, 25.0),
        mixed_line(2, "mixed", 840.0, 25.0),
    ]


def test_mixed_summary_medians_ranges_and_goal() -> None:
    (s,) = serving.mixed_summary(mixed_lines())
    assert s["summary"] == "mixed_traffic" and s["pairs"] == 3 and s["concurrency"] == serving.MIXED_CLIENTS
    assert s["rps_ratios"] == [0.95, 0.9, 1.05] and s["rps_ratio"] == 0.95
    assert s["rps_ratio_range"] == [0.9, 1.05]
    assert s["p99_ratios"] == [1.1, 1.3, 1.0] and s["p99_ratio"] == 1.1
    assert s["clean"] == {"rps": 1000.0, "p50_ms": 10.0, "p99_ms": 20.0, "windows": 3}
    assert s["bad_requests"] == 90 and s["bad_statuses"] == {"422": 90}
    assert list(s["bad_by_kind"]) == list(lg.KINDS)
    assert s["server_errors"] == 0 and s["good_failures"] == {} and s["meets_goal"] is True
    assert serving.mixed_summary([{"measure": "load"}]) == []

    jam = mixed_lines()
    jam[2] = mixed_line(1, "mixed", 0.0, float("nan"), after_window={"good": {"timeout": 16}})
    jam[2]["bad"]["by_kind"]["deep_nesting"] = {"500": 3}
    jam[2]["bad"]["statuses"] = {"422": 27, "500": 3}
    jam[3] = mixed_line(1, "clean", 1000.0, 20.0, non_200={"500": 2})
    (s,) = serving.mixed_summary(jam)
    assert s["rps_ratios"] == [0.95, 0.0, 1.05] and s["p99_ratios"] == [1.1, 1.0]  # no p99 without answers
    assert s["good_failures"] == {"500": 2, "timeout": 16}
    assert s["bad_failures"] == {"500": 3} and s["server_errors"] == 5 and s["meets_goal"] is False

    failed = [*mixed_lines()[:5], {"measure": "mixed_load", "pair": 2, "condition": "mixed", "error": "boom"}]
    (s,) = serving.mixed_summary(failed)
    assert s["failed_windows"] == ["pair 2 mixed: boom"] and s["meets_goal"] is False


def test_report_renders_the_mixed_row(serving_lines, render_serving) -> None:
    before = render_serving(serving_lines)
    assert "| **25.0x** |" in before  # the older tables are still there
    assert "Mixed traffic (5% malformed requests): not measured in this run" in before

    text = render_serving(serving_lines + serving.mixed_summary(mixed_lines()))
    assert "**Could not tabulate**" not in text and "| **25.0x** |" in text
    row = (
        "| 16 clients, 5% malformed | 3 x 2.0 s | 1,000 / 20.0 | 900 / 25.0 | **0.95x (0.90-1.05)** "
        "| **1.10x (1.00-1.30)** | 90: 422 x 90 | 0 / - | **met** |"
    )
    assert row in text
    assert "`python -m bench.serving --quick`, x86_64 2 cpu, 2026-12-03" in text
    assert "nested_rows: 422 x 9" in text

    jam = mixed_lines()
    jam[2] = mixed_line(1, "mixed", 0.0, float("nan"), after_window={"good": {"timeout": 16}})
    text = render_serving(jam + serving.mixed_summary(jam))  # --mixed-only data: the table alone
    assert "Only the mixed-traffic measurement is in this data" in text
    assert "| **0.95x (0.00-1.05)** | **1.05x (1.00-1.10), 2 of 3 pairs** |" in text
    assert "| 0 / timeout x 16 | **not met** |" in text
