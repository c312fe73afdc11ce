"""The monitoring report: drift table and plot, and the server's health from its /metrics."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from mms_core.monitoring.drift import DriftReport  # noqa: E402
from mms_core.monitoring.stats import StatsSnapshot  # noqa: E402
from mms_core.plots import png_bytes  # noqa: E402

TOP = 20  # features shown in the plot and the table: the most shifted ones


class Health(BaseModel):
    """Serving health summed over the server's lifetime (Prometheus counters) and now (gauges)."""

    requests: int
    errors: int  # every error answer, the client's (4xx) included
    server_errors: int  # 5xx: model failures, overload, replicas lost
    error_rate: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    queue_depth: int
    replica_failures: int


def health_from_metrics(text: str) -> Health:
    """Parse an online server's /metrics exposition (see mms_core/serving/metrics.py)."""
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]

    def total(name: str) -> float:
        return sum(s.value for s in samples if s.name == name)

    buckets: dict[float, float] = {}
    for s in samples:
        if s.name == "mms_request_latency_seconds_bucket":
            le = float(s.labels["le"])
            buckets[le] = buckets.get(le, 0.0) + s.value
    requests, errors = int(total("mms_requests_total")), int(total("mms_errors_total"))
    server = sum(s.value for s in samples if s.name == "mms_errors_total" and s.labels["code"][:1] == "5")
    return Health(
        requests=requests,
        errors=errors,
        server_errors=int(server),
        error_rate=errors / requests if requests else 0.0,
        latency_p50_ms=_quantile_ms(buckets, 0.5),
        latency_p95_ms=_quantile_ms(buckets, 0.95),
        queue_depth=int(total("mms_replica_queue_depth")),
        replica_failures=int(total("mms_replica_failures_total")),
    )


def _quantile_ms(buckets: dict[float, float], q: float) -> float | None:
    """Upper bound of the histogram bucket holding quantile ``q`` (Prometheus' resolution)."""
    if not buckets or not buckets.get(float("inf")):
        return None
    count = buckets[float("inf")]
    for le in sorted(buckets):
        if buckets[le] >= q * count:
            return le * 1e3 if np.isfinite(le) else None
    return None


def markdown(*, model: str, report: DriftReport, health: Health | None) -> str:
    """A table a person reads in the Prefect UI or MLflow: verdict, top features, classes, health."""
    t = report.thresholds
    verdict = (
        f"**DRIFT** in {len(report.drifted_features)} feature(s)"
        if report.drifted
        else "no drift"
        if report.enough_data
        else f"not enough live rows yet (< {t.min_rows})"
    )
    out = [
        f"## Monitoring {model}: {verdict}",
        "",
        f"{report.live_rows} live rows vs {report.reference_rows} training rows; a feature drifts when "
        f"PSI > {t.psi:g} and KS p-value < {t.ks_pvalue:g}. Class-mix PSI: "
        + ("-" if report.class_psi is None else f"{report.class_psi:.3f}"),
        "",
        "| feature | PSI | KS statistic | KS p-value | NaN | drifted |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for f in sorted(report.features, key=lambda f: -f.psi)[:TOP]:
        out.append(
            f"| {f.feature} | {f.psi:.3f} | {f.ks_statistic:.3f} | {f.ks_pvalue:.2g} | {f.nan} | "
            f"{'yes' if f.drifted else ''} |"
        )
    if health is not None:
        p50 = "-" if health.latency_p50_ms is None else f"{health.latency_p50_ms:g} ms"
        p95 = "-" if health.latency_p95_ms is None else f"{health.latency_p95_ms:g} ms"
        out += [
            "",
            "| health | value |",
            "|---|---:|",
            f"| requests | {health.requests} |",
            f"| errors (rate) | {health.errors} ({health.error_rate:.2%}) |",
            f"| of which server errors (5xx) | {health.server_errors} |",
            f"| latency p50 / p95 (bucket bound) | {p50} / {p95} |",
            f"| replica queue depth now | {health.queue_depth} |",
            f"| replicas taken out | {health.replica_failures} |",
        ]
    return "\n".join(out) + "\n"


def drift_png(*, model: str, report: DriftReport, reference: StatsSnapshot, live: StatsSnapshot) -> bytes:
    """PSI of the most shifted features against the threshold, and the class mix side by side."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    top = sorted(report.features, key=lambda f: -f.psi)[:TOP]
    ax1.barh([f.feature for f in top][::-1], [f.psi for f in top][::-1],
             color=["tab:red" if f.drifted else "tab:blue" for f in top][::-1])  # fmt: skip
    ax1.axvline(
        report.thresholds.psi, color="black", linestyle="--", label=f"threshold {report.thresholds.psi:g}"
    )
    ax1.set(xlabel="PSI", title=f"{model}: input drift (top {len(top)})")
    ax1.legend(loc="lower right")
    names = sorted(set(reference.classes) | set(live.classes), key=_natural)
    ref_n, live_n = max(sum(reference.classes.values()), 1), max(sum(live.classes.values()), 1)
    pos = np.arange(len(names))
    ax2.bar(pos - 0.2, [reference.classes.get(c, 0) / ref_n for c in names], 0.4, label="training")
    ax2.bar(pos + 0.2, [live.classes.get(c, 0) / live_n for c in names], 0.4, label="predicted (live)")
    ax2.set(xticks=pos, xticklabels=names, ylabel="share of rows", title="class mix")
    ax2.legend()
    return png_bytes(fig)


def _natural(name: str) -> tuple:
    return (0, float(name), "") if name.lstrip("-").replace(".", "", 1).isdigit() else (1, 0.0, name)
