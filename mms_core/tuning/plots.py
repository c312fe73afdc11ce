"""The study as pictures for MLflow: optimisation history and parameter importances (Optuna's
own matplotlib plots, rendered to PNG bytes)."""

from __future__ import annotations

import logging
import warnings

import matplotlib

matplotlib.use("Agg")  # no display on servers and workers
import optuna  # noqa: E402
import optuna.visualization.matplotlib as ovm  # noqa: E402

from mms_core.plots import png_bytes  # noqa: E402

log = logging.getLogger(__name__)


def study_pngs(study: optuna.Study) -> dict[str, bytes]:
    """``{"optimization_history.png": ..., "param_importances.png": ...}``; importances need two
    completed trials with different parameters, so they are left out before that."""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    out: dict[str, bytes] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if done:
            out["optimization_history.png"] = png_bytes(ovm.plot_optimization_history(study).figure)
        if len(done) >= 2 and len({tuple(sorted(t.params.items())) for t in done}) >= 2:
            try:
                out["param_importances.png"] = png_bytes(ovm.plot_param_importances(study).figure)
            except (ValueError, RuntimeError) as exc:  # e.g. every completed trial scored the same
                log.warning("no parameter-importance plot: %s", exc)
    return out
