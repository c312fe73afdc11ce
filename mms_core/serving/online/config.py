"""Settings of the online server (env prefix MMS_SERVE_, CLI options override)."""

from __future__ import annotations

import ipaddress

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mms_core.serving.payload import NanPolicy


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServeConfig(BaseSettings):
    """How the online server listens, batches, sheds load, authenticates and bills."""

    model_config = SettingsConfigDict(env_prefix="MMS_SERVE_", frozen=True)

    host: str = Field(default="127.0.0.1", description="Bind address; beyond loopback requires API keys.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port (0 = any free port).")
    replicas: int = Field(default=2, ge=1, le=64, description="Model replicas (Dask actors) per version.")
    max_batch_size: int = Field(default=64, ge=1, description="Rows stacked into one forward pass at most.")
    max_wait_ms: float = Field(
        default=2.0, ge=0, le=1000, description="How long a partial batch waits for more requests."
    )
    max_inflight_batches: int = Field(
        default=2, ge=1, description="Batches sent to one replica before the next must wait (pipelining)."
    )
    max_queue_rows: int = Field(
        default=2048,
        ge=1,
        description="Rows queued per replica; when every queue is full: 503 + Retry-After.",
    )
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="Largest request body (413).")
    max_rows: int = Field(default=10_000, ge=1, description="Most rows in one request (413).")
    nan_policy: NanPolicy = Field(
        default="reject", description="NaN/inf inputs: reject (422) or impute the training mean."
    )
    require_key: bool | None = Field(
        default=None, description="Require `Authorization: Bearer KEY`; default: only beyond loopback."
    )
    request_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Deadline of every request (504 after it, its slot freed); a replica whose call runs "
        "longer is taken out and replaced.",
    )
    max_concurrent_requests: int = Field(
        default=512, ge=1, description="Prediction requests in the server at once; beyond: 503 + Retry-After."
    )
    trusted_hosts: list[str] = Field(
        default_factory=list,
        description="Host headers accepted beyond the loopback names (DNS-rebinding guard); a server bound "
        "beyond loopback accepts any host unless this is set.",
    )
    health_interval_s: float = Field(default=1.0, gt=0, description="Seconds between replica health checks.")
    health_timeout_s: float = Field(default=2.0, gt=0, description="A health check slower than this fails.")
    drain_s: float = Field(
        default=30.0,
        ge=0,
        description="On SIGTERM, requests in flight get this long to finish; the rest are answered 503.",
    )
    price_per_1k_rows: float = Field(default=0.0, ge=0, description="Price printed by `mms usage`.")
    metering_flush_s: float = Field(default=5.0, gt=0, description="Usage counters are written this often.")

    @model_validator(mode="after")
    def _keys_beyond_loopback(self) -> ServeConfig:
        if not is_loopback(self.host) and self.require_key is False:
            raise ValueError(
                f"binding to {self.host} (beyond loopback) requires API keys: drop require_key=false "
                "or bind to 127.0.0.1"
            )
        return self

    @property
    def allowed_hosts(self) -> list[str]:
        """Host header values the server answers (Starlette's TrustedHostMiddleware)."""
        if not is_loopback(self.host) and not self.trusted_hosts:
            return ["*"]  # beyond loopback API keys are required; the operator may pin names here
        return ["127.0.0.1", "localhost", "[::1]", "::1", self.host, *self.trusted_hosts]

    @property
    def auth_required(self) -> bool:
        return self.require_key if self.require_key is not None else not is_loopback(self.host)
