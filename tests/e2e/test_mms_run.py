"""`mms run` end to end, as a user runs it: the real console script, embedded defaults, tmp MMS_HOME."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from mlflow import MlflowClient

from infra import embedded_prefect

REPO = Path(__file__).resolve().parents[2]
MMS = str(Path(sys.executable).with_name("mms"))

# What must not reach `mms run`'s first screen besides its progress, Prefect's run log and the
# summary: "Warning" (case-sensitive) also matches UserWarning, FutureWarning, DeprecationWarning.
NOISE = (
    "Warning",
    "Downloading artifacts",  # MLflow's tqdm bar per artifact download
    "Successfully registered model",  # mlflow.register_model's prints
    "Created version '",
    "Validating input example against model signature",  # MLflow INFO lines
    "Creating initial MLflow database tables",
    "distributed.",  # the LocalCluster's scheduler and nannies at INFO
    "Starting temporary server",  # Prefect's per-process server: the embedded one replaced it
    "View at http",  # a Prefect UI link: the embedded server serves no UI
)


def _mms(*args: str, home: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMS_", "PREFECT_", "MLFLOW_"))}
    env.update(MMS_HOME=str(home), COLUMNS="200", PYTHONUNBUFFERED="1")
    return subprocess.run([MMS, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_mms_run_default_digits_spec_registers_champion(tmp_path):
    proc = _mms("run", home=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "digits-classifier v1 -> @champion" in proc.stdout
    assert "training epochs" in proc.stdout  # the progress display ran
    noisy = [line for line in (proc.stdout + proc.stderr).splitlines() if any(t in line for t in NOISE)]
    assert not noisy, "library noise on `mms run`'s screen (the demo spec):\n" + "\n".join(noisy)
    server = embedded_prefect.status(home=tmp_path)  # kept for the next command
    assert server is not None and f"embedded API {server.api_url}" in proc.stdout

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("digits-classifier", "champion")
    run = client.get_run(champion.tags["mms.run_id"])
    metrics = run.data.metrics
    # The default spec's gate (min_accuracy 0.95) passed, and compression kept its promise.
    assert metrics["test_accuracy"] >= 0.95
    assert metrics["compress_size_ratio"] >= 3.0
    assert metrics["compress_accuracy_drop"] <= 0.01
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 30
    assert {"mms.manifest_hash", "mms.spec_hash", "mms.git_commit", "mms.prefect_flow_run_id"} <= set(
        champion.tags
    )
    versions = client.search_model_versions("name='digits-classifier'")
    assert sorted(v.tags["mms.variant"] for v in versions) == ["fp32", "int8"]

    # Batch prediction with the champion, through the CLI: the same answers as the registered model.
    from sklearn.datasets import load_digits

    from mms_core.packaging import Predictor
    from mms_core.registry import load_package

    digits = load_digits()
    rows = pd.DataFrame(digits.data.astype(np.float32), columns=[f"pixel_{i}" for i in range(64)])
    rows.insert(0, "image_id", range(len(rows)))
    rows.to_parquet(tmp_path / "digits.parquet", index=False)
    out = tmp_path / "predictions"
    proc = _mms(
        "predict",
        "--model",
        "digits-classifier@champion",
        "--input",
        str(tmp_path / "digits.parquet"),
        "--output",
        str(out),
        "--id-column",
        "image_id",
        home=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert embedded_prefect.status(home=tmp_path) == server  # attached to the same server, no new start
    got = pd.read_parquet(out)
    config, weights, version = load_package(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", model="digits-classifier@champion"
    )
    assert version == str(champion.version)
    assert got["id"].tolist() == list(range(len(rows)))
    assert (got["prediction"].to_numpy() == Predictor(config=config, weights=weights).predict(rows)).all()
    assert (got["prediction"].to_numpy() == digits.target).mean() > 0.95

    proc = _mms("stack", "down", home=tmp_path, timeout=60)
    assert proc.returncode == 0 and "embedded-prefect" in proc.stdout, proc.stdout + proc.stderr
    assert embedded_prefect.status(home=tmp_path) is None and not psutil.pid_exists(server.pid)


def test_mms_run_rejects_a_bad_override_with_exit_code_2(tmp_path):
    proc = _mms("run", "--set", "training.epochs=-1", home=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "training.epochs" in proc.stdout and "greater than or equal to 1" in proc.stdout
    assert not (tmp_path / "mlflow.db").exists()  # nothing ran


def test_every_command_has_help():
    for args in (
        ["--help"],
        ["run", "--help"],
        ["deploy", "--help"],
        ["stack", "--help"],
        ["stack", "up", "--help"],
    ):
        proc = subprocess.run([MMS, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "Usage" in proc.stdout, args


def test_mms_predict_names_an_unknown_model(tmp_path):
    (tmp_path / "in.csv").write_text("a,b\n1,2\n")
    proc = _mms(
        "predict",
        "--model",
        "nope@champion",
        "--input",
        str(tmp_path / "in.csv"),
        "--output",
        str(tmp_path / "out"),
        home=tmp_path,
        timeout=200,
    )
    assert proc.returncode == 1
    assert "no registered model 'nope@champion'" in proc.stdout
    assert not (tmp_path / "out").exists()
