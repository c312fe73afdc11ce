"""Where live statistics come from: a running online server (``GET /v1/models/NAME/stats`` and
``/metrics``) and the files stream consumers write (``consumer-i.json`` in a directory)."""

from __future__ import annotations

import httpx
from pydantic import SecretStr

from mms_core import storage
from mms_core.errors import MonitoringError
from mms_core.monitoring.stats import StatsSnapshot
from mms_core.secrets import redact_text, redact_url


def model_name(model: str) -> str:
    """``NAME`` of ``NAME@ALIAS`` / ``NAME/VERSION``."""
    return model.removeprefix("models:/").split("@", 1)[0].split("/", 1)[0]


def stream_stats_uri(*, storage_root: str, model: str) -> str:
    """Default directory of the stream consumers' statistics for ``model``."""
    return storage.join(storage_root, "monitoring", model_name(model), "stream")


def fetch_server(
    *, url: str, model: str, version: str, api_key: SecretStr | None = None, timeout_s: float = 10.0
) -> tuple[StatsSnapshot, str]:
    """The server's running statistics of ``version`` and its /metrics text.

    Raises:
        MonitoringError: the server does not answer, or refuses (401/403/404: e.g. it does not
            serve ``version``), naming the fix.
    """
    headers = {"Authorization": f"Bearer {api_key.get_secret_value()}"} if api_key else {}
    base, shown = url.rstrip("/"), redact_url(url.rstrip("/"))
    try:
        with httpx.Client(timeout=timeout_s, headers=headers) as client:
            stats = client.get(f"{base}/v1/models/{model_name(model)}/stats", params={"version": version})
            metrics = client.get(f"{base}/metrics")
    except httpx.TransportError as exc:
        raise MonitoringError(
            f"online server {shown} does not answer ({redact_text(repr(exc))}); is `mms serve` running?"
        ) from exc
    if stats.status_code != 200:
        raise MonitoringError(
            f"{shown} answered {stats.status_code} for the statistics of {model_name(model)} v{version}: "
            f"{stats.text[:300]} (a server beyond loopback needs api_key; a version it does not serve "
            "has none: monitor the alias it serves)"
        )
    return StatsSnapshot.model_validate_json(stats.content), metrics.text


def read_stream(uri: str, *, version: str | None = None) -> list[StatsSnapshot]:
    """Every consumer's statistics file under ``uri`` (none there: an empty list); with ``version``,
    only the files of consumers that ran that model version."""
    fs, path = storage.fs_and_path(uri)
    if not fs.exists(path):
        return []
    names = sorted(p for p in fs.ls(path, detail=False) if p.rsplit("/", 1)[-1].startswith("consumer-"))
    snaps = [StatsSnapshot.model_validate_json(fs.cat_file(p)) for p in names if p.endswith(".json")]
    return [s for s in snaps if version is None or s.version == version]
