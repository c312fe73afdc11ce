"""Drift of live inputs against the training data: PSI on the shared bins and a two-sample KS
test on the reservoirs, per feature, plus PSI of the predicted against the training classes."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy.stats import ks_2samp

from mms_core.errors import MonitoringError
from mms_core.monitoring.stats import StatsSnapshot, check_same_bins

EPS = 1e-4  # stands in for an empty bin's share: PSI is undefined at 0


class DriftThresholds(BaseModel):
    """When a feature (or the class mix) counts as drifted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Ranges are checked by the validators below, not Field(gt=...): their messages say what to use.
    psi: float = Field(
        default=0.2, description="PSI above this is a shift, in (0, 10] (0.1 small, 0.2 usual, 0.25 large)."
    )
    ks_pvalue: float = Field(
        default=0.01, description="KS p-value below this says the samples differ, in (0, 1)."
    )
    min_rows: int = Field(default=200, description="Fewer live rows than this (>= 1): no verdict yet.")

    @field_validator("psi")
    @classmethod
    def _psi(cls, v: float) -> float:
        if not 0 < v <= 10:
            raise MonitoringError(
                f"drift threshold psi={v:g} is out of range: use a value in (0, 10], "
                "e.g. 0.1 (small shift), 0.2 (the usual alarm) or 0.25 (large shift)"
            )
        return v

    @field_validator("ks_pvalue")
    @classmethod
    def _ks(cls, v: float) -> float:
        if not 0 < v < 1:
            raise MonitoringError(
                f"drift threshold ks_pvalue={v:g} is out of range: a p-value threshold lies strictly "
                "between 0 and 1, e.g. 0.01"
            )
        return v

    @field_validator("min_rows")
    @classmethod
    def _rows(cls, v: int) -> int:
        if v < 1:
            raise MonitoringError(f"min_rows={v} must be at least 1 (e.g. 200 live rows before a verdict)")
        return v


class FeatureDrift(BaseModel):
    feature: str
    psi: float
    ks_statistic: float
    ks_pvalue: float
    nan: int
    drifted: bool


class DriftReport(BaseModel):
    """Per-feature figures and the verdict: a feature drifts when PSI and KS agree."""

    reference_rows: int
    live_rows: int
    thresholds: DriftThresholds
    features: list[FeatureDrift]
    class_psi: float | None
    enough_data: bool
    drifted_features: list[str]
    drifted: bool

    @property
    def max_psi(self) -> float:
        return max((f.psi for f in self.features), default=0.0)


def psi(reference: np.ndarray | list, live: np.ndarray | list) -> float:
    """Population stability index of two count vectors over the same bins."""
    p = np.asarray(reference, dtype=np.float64)
    q = np.asarray(live, dtype=np.float64)
    if p.sum() == 0 or q.sum() == 0:
        return 0.0
    p = np.clip(p / p.sum(), EPS, None)
    q = np.clip(q / q.sum(), EPS, None)
    return float(np.sum((q - p) * np.log(q / p)))


def compare(*, reference: StatsSnapshot, live: StatsSnapshot, thresholds: DriftThresholds) -> DriftReport:
    """Compare ``live`` (serving) with ``reference`` (training, saved at registration).

    Raises:
        MonitoringError: the two describe different features or were binned with another training
            mean/std (live statistics of a version trained on other data).
    """
    check_same_bins(reference, live, what="cannot compare live statistics with the training data")
    ref_sample, live_sample = np.asarray(reference.sample), np.asarray(live.sample)
    rows = []
    for j, name in enumerate(reference.features):
        value = psi(reference.counts[j], live.counts[j])
        if len(ref_sample) and len(live_sample):
            # asymptotic: the exact method is slow on hundreds of rows and gives up on ties anyway
            ks = ks_2samp(ref_sample[:, j], live_sample[:, j], method="asymp")
            stat, pvalue = float(ks.statistic), float(ks.pvalue)
        else:
            stat, pvalue = 0.0, 1.0
        drifted = value > thresholds.psi and pvalue < thresholds.ks_pvalue
        rows.append(FeatureDrift(feature=name, psi=value, ks_statistic=stat, ks_pvalue=pvalue,
                                 nan=live.nan[j], drifted=drifted))  # fmt: skip
    class_psi = None
    if live.classes and reference.classes:
        names = sorted(set(reference.classes) | set(live.classes))
        class_psi = psi([reference.classes.get(c, 0) for c in names], [live.classes.get(c, 0) for c in names])
    enough = live.rows >= thresholds.min_rows
    drifted_features = [r.feature for r in rows if r.drifted] if enough else []
    return DriftReport(
        reference_rows=reference.rows, live_rows=live.rows, thresholds=thresholds, features=rows,
        class_psi=class_psi, enough_data=enough, drifted_features=drifted_features,
        drifted=enough and (bool(drifted_features) or (class_psi or 0.0) > thresholds.psi),
    )  # fmt: skip
