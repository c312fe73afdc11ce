"""mms_core.monitoring: running statistics (merge, JSON), PSI/KS drift on real digits data,
threshold checks, the health summary of a real /metrics exposition, the report."""

import numpy as np
import pytest
from pydantic import ValidationError
from sklearn.datasets import load_digits

from mms_core.errors import MonitoringError
from mms_core.monitoring.drift import DriftThresholds, compare, psi
from mms_core.monitoring.report import drift_png, health_from_metrics, markdown
from mms_core.monitoring.stats import N_BINS, RunningStats, StatsSnapshot, merge
from mms_core.serving.online.metrics import ServingMetrics

DIGITS = load_digits()
X, Y = DIGITS.data, DIGITS.target
FEATURES = [f"pixel_{i}" for i in range(64)]
MEAN, STD = X[:1200].mean(0).tolist(), X[:1200].std(0).tolist()


def _stats(x, y=None, seed=0) -> RunningStats:
    s = RunningStats(features=FEATURES, mean=MEAN, std=STD, seed=seed)
    for start in range(0, len(x), 64):  # request-sized updates
        s.update(x[start : start + 64], None if y is None else y[start : start + 64])
    return s


def test_counts_merge_exactly_and_survive_json():
    a, b = _stats(X[:700], Y[:700]), _stats(X[700:1200], Y[700:1200], seed=1)
    merged = merge([a.snapshot(), b.snapshot()])
    whole = _stats(X[:1200], Y[:1200]).snapshot()
    assert merged.rows == whole.rows == 1200
    assert merged.counts == whole.counts and merged.classes == whole.classes
    assert np.asarray(merged.counts).shape == (64, N_BINS)
    assert np.asarray(merged.counts).sum(axis=1).tolist() == [1200] * 64
    assert len(merged.sample) == 500  # 292 + 208 rows, in proportion to 700 : 500
    again = StatsSnapshot.model_validate_json(merged.model_dump_json())
    assert again == merged


def test_reservoir_is_a_uniform_sample_and_nans_are_counted_not_binned():
    s = _stats(np.arange(5000, dtype=float)[:, None].repeat(64, axis=1))
    sample = np.asarray(s.snapshot().sample)[:, 0]
    assert len(sample) == 500 and 2000 < sample.mean() < 3000  # not just the first rows
    one_by_one = RunningStats(features=FEATURES, mean=MEAN, std=STD)
    for v in range(3000):  # one-row requests take the scalar path
        one_by_one.update(np.full((1, 64), float(v)), [v % 10])
    sample = np.asarray(one_by_one.snapshot().sample)[:, 0]
    assert len(set(sample)) == 500 and 1100 < sample.mean() < 1900
    assert one_by_one.snapshot().classes == {str(k): 300 for k in range(10)}
    x = X[:10].copy()
    x[:3, 5] = np.nan
    snap = _stats(x).snapshot()
    assert snap.nan[5] == 3 and sum(snap.counts[5]) == 7 and sum(snap.counts[4]) == 10


def test_psi_is_zero_for_identical_mixes_and_grows_with_the_shift():
    ref = [100, 200, 300, 400]
    assert psi(ref, ref) == pytest.approx(0.0)
    assert psi(ref, [50, 100, 150, 200]) == pytest.approx(0.0)  # proportions matter, not totals
    assert 0 < psi(ref, [120, 200, 300, 380]) < psi(ref, [400, 300, 200, 100])


def test_held_out_digits_do_not_drift_and_shifted_ones_do():
    reference = _stats(X[:1200], Y[:1200]).snapshot()
    same = compare(
        reference=reference, live=_stats(X[1200:], Y[1200:]).snapshot(), thresholds=DriftThresholds()
    )
    assert same.enough_data and not same.drifted and same.drifted_features == []
    brighter = np.clip(X[1200:] * 1.6 + 3, 0, 25)  # a scanner that got brighter
    shifted = compare(
        reference=reference, live=_stats(brighter, np.zeros(len(brighter))).snapshot(),
        thresholds=DriftThresholds(),
    )  # fmt: skip
    assert shifted.drifted and len(shifted.drifted_features) > 10
    assert shifted.max_psi > 1.0 and shifted.class_psi > 1.0  # everything predicted as one class
    too_few = compare(
        reference=reference, live=_stats(brighter[:50]).snapshot(), thresholds=DriftThresholds()
    )
    assert not too_few.enough_data and not too_few.drifted


@pytest.mark.parametrize(
    ("kw", "message"),
    [({"psi": 0}, "psi=0 is out of range: use a value in (0, 10]"), ({"psi": -1}, "psi=-1 is out of range"),
     ({"psi": 11}, "e.g. 0.1 (small shift)"), ({"ks_pvalue": 1.5}, "ks_pvalue=1.5 is out of range"),
     ({"ks_pvalue": 0}, "strictly between 0 and 1"), ({"min_rows": 0}, "min_rows=0 must be at least 1")],
)  # fmt: skip
def test_thresholds_out_of_range_are_refused_with_the_range_to_use(kw, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        DriftThresholds(**kw)
    assert isinstance(info.value, ValueError)


def test_statistics_binned_for_other_training_data_are_not_combined():
    reference = _stats(X[:1200], Y[:1200]).snapshot()
    other = RunningStats(features=FEATURES, mean=[m + 1 for m in MEAN], std=STD, version="2")
    other.update(X[1200:])
    with pytest.raises(MonitoringError, match="different training mean/std"):
        compare(reference=reference, live=other.snapshot(), thresholds=DriftThresholds())
    with pytest.raises(MonitoringError, match="different features"):
        merge([reference, reference.model_copy(update={"features": [f"f{i}" for i in range(64)]})])
    with pytest.raises(MonitoringError, match="no statistics to merge"):
        merge([])


def test_health_and_report_from_a_real_metrics_exposition():
    m = ServingMetrics()
    for code, seconds in [("200", 0.003)] * 17 + [("422", 0.001)] + [("503", 0.2)] * 2:
        m.requests.labels(endpoint="predict", code=code).inc()
        m.latency.labels(endpoint="predict").observe(seconds)
    m.errors.labels(code="422").inc()
    m.errors.labels(code="503").inc(2)
    text = m.render([{"id": 0, "version": "1", "queued": 2, "inflight": 1, "latency_ms": 1.0}]).decode()
    health = health_from_metrics(text)
    assert (health.requests, health.errors, health.queue_depth) == (20, 3, 3)
    assert health.error_rate == pytest.approx(0.15)
    assert health.latency_p50_ms == pytest.approx(5.0) and health.latency_p95_ms == pytest.approx(250.0)

    reference = _stats(X[:1200], Y[:1200]).snapshot()
    live = _stats(np.clip(X[1200:] + 4, 0, 20), Y[1200:]).snapshot()
    report = compare(reference=reference, live=live, thresholds=DriftThresholds())
    text = markdown(model="digits@champion", report=report, health=health)
    assert "**DRIFT**" in text and "| errors (rate) | 3 (15.00%) |" in text
    top = max(report.features, key=lambda f: f.psi)
    assert f"| {top.feature} | {top.psi:.3f} |" in text
    assert drift_png(model="digits", report=report, reference=reference, live=live)[:4] == b"\x89PNG"
