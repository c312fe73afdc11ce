"""`mms tune` as a user runs it: the real console script on embedded defaults, tmp MMS_HOME."""

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

REPO = Path(__file__).resolve().parents[2]
MMS = str(Path(sys.executable).with_name("mms"))


def _mms(*args: str, home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMS_", "PREFECT_"))}
    env.update(MMS_HOME=str(home), COLUMNS="200", PYTHONUNBUFFERED="1")
    return subprocess.run([MMS, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_bad_search_space_exits_2_naming_the_problem(tmp_path):
    spec = tmp_path / "tune.yaml"
    text = (REPO / "examples" / "digits-tune.yaml").read_text()
    spec.write_text(text.replace("{type: float, low: 0.0001,", "{type: float, low: 0,"))
    proc = _mms("tune", str(spec), home=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "log range needs low > 0" in proc.stdout
    assert not (tmp_path / "optuna.db").exists()


@pytest.mark.slow
def test_mms_tune_runs_the_study_and_shows_the_best_trial(tmp_path):
    proc = _mms(
        "tune",
        "examples/digits-tune.yaml",
        "--trials",
        "3",
        "--set",
        "tuning.trial_epochs=2",
        "--set",
        "tuning.retrain=false",
        home=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "trials" in proc.stdout and "best (val_accuracy)" in proc.stdout
    (summary,) = optuna.get_all_study_summaries(storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert summary.n_trials == 3 and f"study {summary.study_name}" in proc.stdout
    assert f"{summary.best_trial.value:.4f}" in proc.stdout
