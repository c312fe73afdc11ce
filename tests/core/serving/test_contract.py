"""Contract test: schemathesis against the live online server (design brief section 3, HTTP).

The server publishes its OpenAPI document at /openapi.json; schemathesis reads it from the running
server, generates requests for every operation and sends them over real HTTP to uvicorn on
127.0.0.1 (the `serve_app` fixture), with replicas on a real LocalCluster. The contract:

- not_a_server_error: no 5xx, whatever the request (schema-valid or not);
- status_code_conformance: every status the server answers is documented for that operation;
- positive_data_acceptance: a request the schema says is valid is not rejected (400/422 ...);
- content_type_conformance, response_schema_conformance: answers match what /openapi.json says;
- unsupported_method: a method the schema does not list gets 405 *with* an `Allow` header.

How: the `st run` CLI in a subprocess, not a hand-written `@given(operation.as_strategy())` loop.
The CLI runs schemathesis's phases - examples, coverage (boundary values, each body format,
missing and wrong-typed fields, and the undeclared-method probes that `unsupported_method` needs:
they exist in that phase only) and fuzzing (`--max-examples` per operation, positive and negative
data) - and dedups what it finds; an `as_strategy()` loop would only fuzz. We assert on its
machine-readable reports: the JSON run report (cases generated, errors) and the NDJSON event stream
(every request sent and the checks run on its answer), from which the assertion message lists each
distinct failure: check, operation, request, status, request and response bodies. The CLI's own
report (with curl lines to reproduce) goes to stdout, which pytest shows on failure. A subprocess
also keeps Hypothesis off the GIL of the process that serves, and the same command runs by hand
against `mms serve`: `st run http://127.0.0.1:8000/openapi.json -H "Authorization: Bearer $KEY" ...`
with the options in `run_schemathesis`.

Deterministic: `--generation-deterministic` (Hypothesis `derandomize`: the same cases every run, no
example database), the schemathesis cache off (it replays failures of earlier runs) and one worker,
so the requests go out in the same order every run.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from mms_core.serving.metering import KeyStore

# Fuzzed cases per operation that has parameters or a body (one without any gets one case: there is
# nothing to vary). The coverage phase adds its own deterministic cases on top (boundary values,
# each body format, missing and wrong-typed fields, undeclared methods): most of the total.
MAX_EXAMPLES = 100
MIN_CASES = 1000
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "positive_data_acceptance",
    "content_type_conformance",
    "response_schema_conformance",
    "unsupported_method",
]
# Operations that change what the server serves. Fuzzed on the shared server, a generated
# `DELETE /admin/versions/1` (or a POST loading versions with up to 64 replicas each, were a
# registry attached) would take the model away - or the cluster's memory - from every case after
# it. They run on a throwaway server of their own instead (see `test_live_server_honours_its_openapi`).
DESTRUCTIVE = ["POST /admin/versions", "DELETE /admin/versions/{version}"]
CONFIG = """\
# Written by tests/core/serving/test_contract.py.
[cache]
enabled = false  # no replay of failures found by earlier runs: the same cases every run

[parameters]
# The served model's name: a generated one only ever meets the 404 for unknown models, and the
# bodies of /v1/models/{name}/predict would never reach the parser or the model.
"path.name" = "digits"
"""


@dataclass
class Run:
    """What one `st run` did: cases generated and sent, its distinct failures and its errors."""

    generated: int
    sent: int
    sent_by_phase: Counter
    failures: list[dict]
    errors: list


def _admin_key(path: Path) -> tuple[KeyStore, str]:
    keys = KeyStore(path=path)
    token, _ = keys.create(tenant="contract", admin=True)
    return keys, token


@pytest.fixture(scope="module")
def contract_server(digits_app, serve_app, tmp_path_factory) -> Iterator[tuple[str, str]]:
    """The server as test_online.py starts it, with a key store, so auth paths run; yields (url, token)."""
    keys, token = _admin_key(tmp_path_factory.mktemp("contract") / "metering.db")
    app = digits_app(keys=keys, replicas=2, max_wait_ms=5, health_interval_s=0.3, health_timeout_s=2)
    with serve_app(app) as url:
        yield url, token


def _snippet(content: dict | None, limit: int = 160) -> str:
    """The start of a body as the NDJSON report stores it ({"$base64": ...}), with its size if cut."""
    if not content:
        return ""
    raw = base64.b64decode(content["$base64"]) if "$base64" in content else str(content).encode()
    text = raw.decode("utf-8", "replace")
    return text if len(text) <= limit else f"({len(raw)} bytes) {text[:limit]}..."


def _failures(ndjson: Path) -> tuple[int, Counter, list[dict]]:
    """Requests sent (all, and per phase) and the distinct failed checks, from the NDJSON events."""
    sent, by_phase, found = 0, Counter(), {}
    with ndjson.open() as lines:
        for line in lines:
            ((kind, event),) = json.loads(line).items()
            if kind != "ScenarioFinished":
                continue
            recorder = event["recorder"]
            interactions = recorder.get("interactions", {})
            sent += len(interactions)
            by_phase[event["phase"]] += len(interactions)
            for case_id, checks in recorder.get("checks", {}).items():
                for check in checks:
                    if check["status"] in ("success", "skip"):
                        continue
                    failure = (check.get("failure_info") or {}).get("failure", {})
                    interaction = interactions.get(case_id, {})
                    request, response = interaction.get("request", {}), interaction.get("response") or {}
                    url = urlsplit(request.get("uri", ""))
                    target = url.path + (f"?{url.query}" if url.query else "")
                    row = {
                        "check": check["name"],
                        "operation": failure.get("operation") or recorder["label"],
                        "title": f"{failure.get('code', '')} {failure.get('title', check['status'])}".strip(),
                        "status": response.get("status_code"),
                        "request": f"{request.get('method')} {target}",
                        "request_body": _snippet(request.get("body")),
                        "response_body": _snippet(response.get("content")),
                        "message": (failure.get("message") or "").split("\n")[0],
                    }
                    key = (row["check"], row["operation"], row["request"].split()[0], row["status"])
                    if key in found:
                        found[key]["count"] += 1
                    else:
                        found[key] = {**row, "count": 1}
    return sent, by_phase, list(found.values())


def run_schemathesis(
    url: str, token: str, workdir: Path, *, operations: list[str], max_examples: int, timeout_s: float
) -> Run:
    """`st run` against ``url`` with the admin key; ``operations`` are extra CLI filter options."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "schemathesis.toml"
    config.write_text(CONFIG)
    reports = workdir / "reports"
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", f"{url}/openapi.json",
        "--checks", ",".join(CHECKS),
        # No stateful phase: the schema declares no links between operations, so it would only chain
        # the same calls the fuzzing phase makes (the main server takes them all in one sequence anyway).
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", str(max_examples),
        "--generation-deterministic",
        "--continue-on-failure",  # every distinct failure of an operation, not the first only
        "--no-shrink",  # a failing CI run stays as fast as a passing one; the table shows the request
        "--workers", "1",
        "--request-timeout", "20",
        "--header", f"Authorization: Bearer {token}",
        "--report", "json,ndjson", "--report-dir", str(reports),
        "--no-color",
        *operations,
    ]  # fmt: skip
    # cwd: Hypothesis and schemathesis may write their folders there, never into the repository.
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=timeout_s)
    output = done.stdout + done.stderr
    (workdir / "st-output.txt").write_text(output)
    # The CLI's own report, for pytest to show on failure; its curl lines carry whole request bodies.
    print("\n".join(line if len(line) < 400 else line[:400] + " ..." for line in output.splitlines()))
    reported = sorted(reports.glob("json-*.json"))
    assert reported, f"schemathesis wrote no report (exit {done.returncode}):\n{output[-3000:]}"
    report = json.loads(reported[-1].read_text())
    assert report["complete"] and report["stop_reason"] == "completed", report
    sent, by_phase, failures = _failures(next(reports.glob("ndjson-*.ndjson")))
    return Run(
        generated=report["test_cases"]["generated"],
        sent=sent,
        sent_by_phase=by_phase,
        failures=failures,
        errors=report["errors"],
    )


def describe(failures: list[dict]) -> str:
    """One line per distinct failure, grouped by check."""
    lines = []
    for check in sorted({f["check"] for f in failures}):
        group = sorted(
            (f for f in failures if f["check"] == check), key=lambda f: (f["operation"], f["request"])
        )
        lines.append(f"{check}: {len(group)} distinct")
        for f in group:
            seen = f"{f['request']} -> {f['status']} (x{f['count']})"
            lines.append(f"  {f['operation']}: {seen} {f['title']}: {f['message']}")
            if f["request_body"]:
                lines.append(f"      request body: {f['request_body']}")
            if f["response_body"]:
                lines.append(f"      response: {f['response_body']}")
    return "\n".join(lines)


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~1 min on 2 idle cores; generous for a loaded CI machine
def test_live_server_honours_its_openapi(contract_server, digits_app, digits_rows, serve_app, tmp_path):
    url, token = contract_server
    t0 = time.monotonic()
    main = run_schemathesis(
        url, token, tmp_path / "main", max_examples=MAX_EXAMPLES, timeout_s=360,
        operations=[opt for label in DESTRUCTIVE for opt in ("--exclude-name", label)],
    )  # fmt: skip
    # The generated requests (bad bodies, odd methods, admin calls) left the server whole: it still
    # answers a real prediction, with every replica.
    ok = httpx.post(
        f"{url}/v1/models/digits/predict",
        json={"inputs": digits_rows[:3].tolist()},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert ok.status_code == 200, ok.text
    assert httpx.get(f"{url}/ready").status_code == 200

    # The destructive operations, on a server of their own (one replica, no registry to load from).
    keys, admin_token = _admin_key(tmp_path / "admin-metering.db")
    admin_app = digits_app(keys=keys, replicas=1)
    with serve_app(admin_app) as admin_url:
        admin = run_schemathesis(
            admin_url, admin_token, tmp_path / "admin", max_examples=50, timeout_s=120,
            operations=[opt for label in DESTRUCTIVE for opt in ("--include-name", label)],
        )  # fmt: skip
    elapsed = time.monotonic() - t0

    runs = {"main": main, "destructive admin": admin}
    generated = sum(r.generated for r in runs.values())
    sent = sum(r.sent for r in runs.values())
    summary = "; ".join(
        f"{name}: {r.generated} generated, {r.sent} sent {dict(r.sent_by_phase)}" for name, r in runs.items()
    )
    print(f"schemathesis: {summary}; {elapsed:.0f} s in all")
    assert not [e for r in runs.values() for e in r.errors], [e for r in runs.values() for e in r.errors]
    failures = [f for r in runs.values() for f in r.failures]
    assert not failures, f"{len(failures)} distinct contract failures ({summary}):\n{describe(failures)}"
    assert generated >= MIN_CASES and sent >= MIN_CASES, summary
