"""`mms stream` as a user runs it on the embedded default broker (NDJSON files under MMS_HOME):
every line answered with the model's prediction, bad lines answered with an error, a re-run idle."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sklearn.datasets import load_digits

from mms_core.packaging import Predictor
from mms_core.registry import load_package

REPO = Path(__file__).resolve().parents[2]
MMS = str(Path(sys.executable).with_name("mms"))
_spec = importlib.util.spec_from_file_location("serving_conftest", REPO / "tests/core/serving/conftest.py")
serving = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serving)


def _stream(home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMS_", "PREFECT_"))}
    env.update(MMS_HOME=str(home), COLUMNS="200")
    args = [MMS, "stream", "--model", "digits-classifier@champion", "--idle-exit-s", "1", "--consumers", "2"]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_mms_stream_answers_ndjson_files_under_mms_home(tmp_path):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    serving.register_digits(
        tracking_uri=tracking, artifact_root=(tmp_path / "artifacts").as_uri(), seed=0, alias="champion"
    )
    rows = load_digits().data[:30]
    inbox = tmp_path / "stream" / "in"
    inbox.mkdir(parents=True)
    for part in range(3):
        lines = [json.dumps({"id": f"{part}-{i}", "inputs": rows[part * 10 + i].tolist()}) for i in range(10)]
        (inbox / f"part-{part}.ndjson").write_text(
            "\n".join(lines + [json.dumps({"id": f"bad-{part}", "inputs": [1, 2]})]) + "\n"
        )

    first = _stream(tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "33 messages" in first.stdout and "3 errors" in first.stdout

    config, weights, _ = load_package(tracking_uri=tracking, model="digits-classifier@champion")
    expected = Predictor(config=config, weights=weights).predict_array(rows.astype("float32")).tolist()
    answers = {}
    for f in sorted((tmp_path / "stream" / "out").glob("*.ndjson")):
        for line in f.read_text().splitlines():
            record = json.loads(line)
            answers[record["id"]] = record
    assert len(answers) == 33
    for part in range(3):
        for i in range(10):
            assert answers[f"{part}-{i}"]["predictions"] == [expected[part * 10 + i]]
    assert all("64 features" in answers[f"bad-{part}"]["error"] for part in range(3))

    again = _stream(tmp_path)
    assert again.returncode == 0 and "0 messages" in again.stdout
