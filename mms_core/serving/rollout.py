"""Canary rollout of a registered model version onto a running online server.

Steps (each a Prefect task in flows/serving_rollout.py): load the new version beside the
current one with a small share of traffic; watch both over a window (error rate, p95 latency
from the server's /admin/stats); then promote (traffic to the new version, the alias moved in
MLflow, old replicas drained) or roll back (the new replicas drained and removed, alias unchanged).
The server keeps answering from the current version throughout, so no request fails.

A rollout that fails half-way is undone (:func:`abort`). Moving the alias is the one commit point:
before it, the canary is removed and the old versions take their traffic back; after it, the
promotion is finished. Every step is idempotent, so a retried step or a second abort is harmless.
"""

from __future__ import annotations

import contextlib
import time
from typing import Literal

import httpx
from pydantic import BaseModel, Field, SecretStr, model_validator

from mms_core import registry
from mms_core.errors import MMSError


class RolloutError(MMSError):
    """The server refused a rollout step or could not be reached."""


class RolloutSpec(BaseModel):
    """What to roll out where, and the gate the canary must pass."""

    server_url: str = Field(default="http://127.0.0.1:8000", description="The running `mms serve`.")
    model: str = Field(default="digits-classifier", description="Registered model name the server serves.")
    candidate: str = Field(default="candidate", description="Alias or version number of the new version.")
    alias: str = Field(default="champion", description="Alias moved to the new version on promotion.")
    canary_share: float = Field(default=0.1, gt=0, le=1, description="Share of traffic the canary gets.")
    window_s: float = Field(default=30.0, gt=0, le=3600, description="How long the canary is watched.")
    min_requests: int = Field(default=20, ge=1, description="Canary requests needed for a verdict.")
    max_error_rate: float = Field(default=0.01, ge=0, le=1, description="Canary error rate allowed.")
    max_p95_ms: float = Field(default=250.0, gt=0, description="Canary p95 latency allowed (ms).")
    max_p95_ratio: float | None = Field(
        default=3.0, gt=0, description="Canary p95 / current p95 allowed (None: absolute limit only)."
    )
    replicas: int | None = Field(default=None, ge=1, description="Canary replicas (default: server's).")
    api_key: SecretStr | None = Field(default=None, description="Admin API key, when the server needs one.")
    timeout_s: float = Field(default=120.0, gt=0, description="Limit for one admin call (loading, draining).")

    @model_validator(mode="after")
    def _http_url(self) -> RolloutSpec:
        if not self.server_url.startswith(("http://", "https://")):
            raise ValueError(f"server_url {self.server_url!r} must start with http:// or https://")
        return self


class VersionStats(BaseModel):
    requests: int
    errors: int
    error_rate: float
    p50_ms: float
    p95_ms: float


class RolloutDecision(BaseModel):
    decision: Literal["promoted", "rolled_back"]
    model: str
    new_version: str
    previous_versions: list[str]
    canary: VersionStats
    current: VersionStats | None
    reasons: list[str]


def admin_client(spec: RolloutSpec) -> httpx.Client:
    headers = {"Authorization": f"Bearer {spec.api_key.get_secret_value()}"} if spec.api_key else {}
    return httpx.Client(base_url=spec.server_url, headers=headers, timeout=spec.timeout_s)


def resolve_candidate(*, tracking_uri: str, spec: RolloutSpec) -> str:
    """The version number ``spec.candidate`` names (an alias or a number)."""
    if spec.candidate.isdigit():
        return spec.candidate
    version = registry.alias_version(tracking_uri=tracking_uri, name=spec.model, alias=spec.candidate)
    if version is None:
        raise RolloutError(
            f"no version of {spec.model!r} has alias {spec.candidate!r}; pass a version number or set it"
        )
    return version


def start_canary(*, spec: RolloutSpec, version: str) -> list[str]:
    """Load ``version`` beside the served ones with ``canary_share`` of traffic; returns the others."""
    with admin_client(spec) as http:
        before = _call(http, "GET", "/admin/stats")["shares"]
        if version in before:
            raise RolloutError(
                f"version {version} is already served by {spec.server_url}; nothing to roll out"
            )
        body = {"version": version, "replicas": spec.replicas, "share": 0.0}
        _call(http, "POST", "/admin/versions", json=body)
        shares = {v: s * (1 - spec.canary_share) for v, s in before.items()}
        try:
            _call(http, "PUT", "/admin/traffic", json={"shares": {**shares, version: spec.canary_share}})
        except Exception:  # a canary loaded with no traffic would block the next rollout of it
            with contextlib.suppress(Exception):
                _call(http, "DELETE", f"/admin/versions/{version}", missing_ok=True)
            raise
    return sorted(before)


def observe(
    *, spec: RolloutSpec, version: str, previous: list[str]
) -> tuple[VersionStats, VersionStats | None]:
    """Wait out the window (longer, up to 3x, until the canary has ``min_requests``); return stats."""
    start = time.monotonic()
    with admin_client(spec) as http:
        while True:
            time.sleep(min(1.0, spec.window_s / 5))
            elapsed = time.monotonic() - start
            stats = _call(http, "GET", "/admin/stats", params={"window_s": max(elapsed, 0.001)})["versions"]
            canary = VersionStats(**stats[version])
            if elapsed >= spec.window_s and (
                canary.requests >= spec.min_requests or elapsed >= 3 * spec.window_s
            ):
                break
    current = [VersionStats(**stats[v]) for v in previous if v in stats]
    return canary, _merge(current)


def judge(*, spec: RolloutSpec, canary: VersionStats, current: VersionStats | None) -> list[str]:
    """Reasons the canary fails the gate (empty: it passes)."""
    reasons = []
    if canary.requests < spec.min_requests:
        reasons.append(f"only {canary.requests} canary requests in the window (need {spec.min_requests})")
    if canary.error_rate > spec.max_error_rate:
        reasons.append(f"error rate {canary.error_rate:.3f} > {spec.max_error_rate}")
    if canary.p95_ms > spec.max_p95_ms:
        reasons.append(f"p95 {canary.p95_ms:.2f} ms > {spec.max_p95_ms} ms")
    if (
        spec.max_p95_ratio
        and current
        and current.requests
        and canary.p95_ms > spec.max_p95_ratio * current.p95_ms
    ):
        reasons.append(f"p95 {canary.p95_ms:.2f} ms > {spec.max_p95_ratio}x current {current.p95_ms:.2f} ms")
    return reasons


def promote(*, spec: RolloutSpec, tracking_uri: str, version: str, previous: list[str]) -> None:
    """All traffic to ``version``, move the alias (the commit point), then drain and remove the
    previous versions. Until the alias moves, the previous versions stay loaded, so :func:`abort`
    can still give them their traffic back."""
    with admin_client(spec) as http:
        _call(http, "PUT", "/admin/traffic", json={"shares": {version: 1.0}})
        registry.set_alias(tracking_uri=tracking_uri, name=spec.model, alias=spec.alias, version=version)
        _remove(http, previous)


def roll_back(*, spec: RolloutSpec, version: str) -> None:
    """Drain and remove the canary (already gone: nothing to do); the alias never moved."""
    with admin_client(spec) as http:
        _call(http, "DELETE", f"/admin/versions/{version}", missing_ok=True)


def abort(*, spec: RolloutSpec, tracking_uri: str, version: str, previous: list[str]) -> str:
    """Undo a rollout that failed half-way; returns what it did.

    If the alias already points to ``version``, the promotion had committed: it is finished (the
    ``previous`` versions removed, as promote does). Otherwise the canary is removed and the
    versions it was served beside take their traffic back, as in a roll-back.
    """
    alias_now = registry.alias_version(tracking_uri=tracking_uri, name=spec.model, alias=spec.alias)
    with admin_client(spec) as http:
        if alias_now == version:
            _remove(http, previous)
            return f"the alias {spec.alias!r} had moved to v{version}: promotion finished"
        served = _call(http, "GET", "/admin/stats")["shares"]
        if version not in served:
            return f"v{version} is not served: nothing to undo"
        _call(http, "DELETE", f"/admin/versions/{version}", missing_ok=True)
        return f"v{version} removed; {sorted(v for v in served if v != version)} serve all traffic again"


def _remove(http: httpx.Client, versions: list[str]) -> None:
    for old in versions:
        _call(http, "DELETE", f"/admin/versions/{old}", missing_ok=True)


def log_decision(*, tracking_uri: str, artifact_root: str | None, decision: RolloutDecision) -> str:
    """One MLflow run per rollout in experiment `serving-rollouts`; returns its id."""
    exp = registry.ensure_experiment(
        tracking_uri=tracking_uri, name="serving-rollouts", artifact_root=artifact_root
    )
    run_id = registry.start_run(
        tracking_uri=tracking_uri,
        experiment_id=exp,
        run_name=f"{decision.model}-v{decision.new_version}-{decision.decision}",
        tags={
            "mms.decision": decision.decision,
            "mms.model": decision.model,
            "mms.version": decision.new_version,
        },
        params={
            "previous_versions": ",".join(decision.previous_versions),
            "reasons": "; ".join(decision.reasons),
        },
    )
    metrics = {f"canary_{k}": float(v) for k, v in decision.canary.model_dump().items()}
    if decision.current:
        metrics |= {f"current_{k}": float(v) for k, v in decision.current.model_dump().items()}
    try:
        registry.log_metrics(tracking_uri=tracking_uri, run_id=run_id, metrics=metrics)
        registry.log_artifact_bytes(
            tracking_uri=tracking_uri, run_id=run_id, name="decision.json",
            data=decision.model_dump_json(indent=2).encode(),
        )  # fmt: skip
        registry.end_run(tracking_uri=tracking_uri, run_id=run_id)
    except Exception:
        # The caller's retry logs a fresh run: leave this one FAILED rather than RUNNING for ever.
        with contextlib.suppress(Exception):
            registry.end_run(tracking_uri=tracking_uri, run_id=run_id, status="FAILED")
        raise
    return run_id


def _merge(stats: list[VersionStats]) -> VersionStats | None:
    if not stats:
        return None
    requests = sum(s.requests for s in stats)
    errors = sum(s.errors for s in stats)
    return VersionStats(
        requests=requests,
        errors=errors,
        error_rate=errors / requests if requests else 0.0,
        p50_ms=max(s.p50_ms for s in stats),
        p95_ms=max(s.p95_ms for s in stats),
    )


def _call(http: httpx.Client, method: str, path: str, *, missing_ok: bool = False, **kwargs) -> dict:
    """One admin call; its JSON answer. ``missing_ok``: "unknown version" (404) counts as done."""
    try:
        response = http.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        raise RolloutError(
            f"cannot reach the server at {http.base_url}: {exc}; is `mms serve` running?"
        ) from None
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            code, message = error["code"], error["message"]
        except (ValueError, KeyError, TypeError):
            code, message = None, response.text[:300]
        if missing_ok and code == "unknown_version":
            return {}
        raise RolloutError(f"{method} {path} -> {response.status_code}: {message}")
    return response.json()
