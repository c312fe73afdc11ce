"""A model MMS registers loads and serves with MLflow alone, without MMS (issue 15).

"Without MMS" is an interpreter of this venv in which importing ``mms``, ``mms_core`` or
``mms_cli`` raises ImportError: a ``sitecustomize`` on PYTHONPATH (which does not hold the repo)
installs a sys.meta_path finder that refuses them before anything else is imported, and drops
MMS's editable-install finder, so ``mms_portable`` can come only from the model's own code
directory. Chosen over a fresh virtual env with only the model's requirements for CI time (an
install of torch and mlflow per run); sitecustomize rather than a wrapper script because
``mlflow models serve`` loads the model in a uvicorn child process, which inherits the environment.

The reference is MMS's own predictor of the same registered version (registry.load_package, as
the online server, batch and stream load it): the predictions must be identical.
"""

import ast
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import mms_portable
from mms_core import registry, steps
from mms_core.compress import CompressSpec
from mms_core.data.shard import load_manifest, read_shard
from mms_core.evaluate import EvalSpec
from mms_core.models import ModelSpec
from mms_core.packaging import PackageConfig, Predictor, write_package
from mms_core.serving.offline.predictors import cached_predictor
from mms_core.spec import PipelineSpec, RegisterSpec
from mms_core.training.checkpoint import state_bytes
from mms_core.training.loop import train_rank
from mms_core.training.spec import TrainJob, TrainSpec

NAME = "portable-digits"
MLP = ModelSpec(name="mlp")
REPO = Path(__file__).resolve().parents[2]
NOT_PUBLISHED = ("mms", "mms_core", "mms_cli")

NO_MMS_SITECUSTOMIZE = f"""
import sys

class _NoMMS:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {NOT_PUBLISHED!r}:
            raise ImportError(f"{{name}} is blocked: this interpreter stands for one without MMS")
        return None

# MMS's editable install maps its packages whatever sys.path says: without it, mms_portable can
# only come from a model's code directory.
sys.meta_path[:] = [_NoMMS()] + [
    f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")
]
"""

LOAD_SCRIPT = """
import json, sys
import mlflow, numpy as np, pandas as pd

uris, rows, columns = json.loads(sys.argv[1]), np.load(sys.argv[2]), json.loads(sys.argv[3])
out = {}
for key, uri in uris.items():
    try:
        model = mlflow.pyfunc.load_model(uri)
    except Exception as exc:
        out[key] = {"error": f"{type(exc).__name__}: {exc}"}
        continue
    out[key] = {"predictions": np.asarray(model.predict(pd.DataFrame(rows, columns=columns))).tolist()}
import mms_portable
out["portable_file"] = mms_portable.__file__
out["mms_modules"] = sorted(m for m in sys.modules if m.partition(".")[0] in ("mms", "mms_core", "mms_cli"))
try:
    import mms_core
    out["mms_core_imports"] = True
except ImportError:
    out["mms_core_imports"] = False
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory, global_tracking_uri):
    """A fresh MLflow sqlite store, also the global tracking URI (put back afterwards)."""
    root = tmp_path_factory.mktemp("portable-mlflow")
    with global_tracking_uri(f"sqlite:///{root}/mlflow.db") as uri:
        yield {"uri": uri, "artifacts": root.as_uri() + "/artifacts"}


@pytest.fixture(scope="module")
def registered(store, digits_manifest, tmp_path_factory):
    """A trained digits MLP registered as the pipeline does it: champion + int8 sibling."""
    manifest_uri, root = digits_manifest(2), tmp_path_factory.mktemp("portable-train")
    job = TrainJob(
        manifest_uri=manifest_uri,
        model=MLP,
        train=TrainSpec(epochs=2, checkpoint_every=0),
        output_uri=f"{root}/model/model.safetensors",
        checkpoint_uri=f"{root}/ckpt",
    )
    weights_uri = train_rank(job=job, rank=0, world_size=1).weights_uri
    spec = PipelineSpec(
        model=MLP, evaluate=EvalSpec(min_accuracy=0.5), registry=RegisterSpec(model_name=NAME, experiment="p")
    )
    uri = store["uri"]
    exp = registry.ensure_experiment(tracking_uri=uri, name="p", artifact_root=store["artifacts"])
    run_id = registry.start_run(tracking_uri=uri, experiment_id=exp, run_name="p", tags={}, params={})
    result = steps.register_trained(
        tracking_uri=uri,
        run_id=run_id,
        spec=spec,
        manifest_uri=manifest_uri,
        weights_uri=weights_uri,
        evaluation=steps.evaluate_trained(manifest_uri=manifest_uri, model=MLP, weights_uri=weights_uri),
        compressed=steps.compress_trained(
            manifest_uri=manifest_uri, model=MLP, weights_uri=weights_uri, spec=CompressSpec()
        ),
        lineage={},
    )
    assert result.alias == "champion" and result.compressed_version is not None
    manifest = load_manifest(manifest_uri)
    x, _ = read_shard(manifest.test)
    rows = (x[:200] * np.asarray(manifest.std) + np.asarray(manifest.mean)).astype(np.float32)
    return {
        "uri": uri,
        "exp": exp,
        "run_id": run_id,
        "champion": f"models:/{NAME}@champion",
        "int8": f"models:/{NAME}/{result.compressed_version}",
        "frame": pd.DataFrame(rows, columns=manifest.features),
        "manifest": manifest,
    }


def _mms_predictions(*, uri: str, model: str, frame: pd.DataFrame) -> list:
    """What MMS's own serving paths predict for this version (registry.load_package + Predictor)."""
    config, weights, _ = registry.load_package(tracking_uri=uri, model=model.removeprefix("models:/"))
    return Predictor(config=config, weights=weights).predict(frame).tolist()


def _no_mms_env(where: Path, tracking_uri: str) -> dict[str, str]:
    """Environment of an interpreter that cannot import MMS (see the module docstring)."""
    site = where / "no-mms-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(NO_MMS_SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMS_", "PYTHON"))}
    env["PYTHONPATH"] = str(site)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # uvicorn, here
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def _load_without_mms(*, where: Path, tracking_uri: str, uris: dict[str, str], frame: pd.DataFrame) -> dict:
    """Run LOAD_SCRIPT in an interpreter without MMS: each URI's predictions (or load error) for
    ``frame``, and what it imported."""
    np.save(where / "rows.npy", frame.to_numpy())
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, json.dumps(uris), f"{where}/rows.npy", json.dumps(list(frame))],
        env=_no_mms_env(where, tracking_uri),
        cwd=where,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_champion_and_int8_sibling_load_without_mms_and_predict_like_mms(registered, tmp_path):
    frame = registered["frame"]
    uris = {"champion": registered["champion"], "int8": registered["int8"]}
    out = _load_without_mms(where=tmp_path, tracking_uri=registered["uri"], uris=uris, frame=frame)
    assert out["mms_core_imports"] is False and out["mms_modules"] == []
    assert not Path(out["portable_file"]).is_relative_to(REPO)  # the copy the model carries
    for key, uri in uris.items():
        assert "predictions" in out[key], out[key]
        expected = _mms_predictions(uri=registered["uri"], model=uri, frame=frame)
        assert out[key]["predictions"] == expected, key
    agree = np.asarray(out["int8"]["predictions"]) == np.asarray(out["champion"]["predictions"])
    assert agree.mean() > 0.95  # the int8 sibling is a different network: close, not equal


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_without_mms_answers_like_mms(registered, tmp_path):
    port, log = _free_port(), (tmp_path / "serve.log").open("w")
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", registered["champion"]]
    cmd += ["--env-manager", "local", "-p", str(port), "-h", "127.0.0.1", "--workers", "1"]
    server = subprocess.Popen(
        cmd,
        env=_no_mms_env(tmp_path, registered["uri"]),
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the uvicorn child stops with it
    )
    frame = registered["frame"].iloc[:50]
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        body = {"dataframe_split": frame.to_dict(orient="split", index=False)}
        response = httpx.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=30)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    assert response.status_code == 200, response.text
    expected = _mms_predictions(uri=registered["uri"], model=registered["champion"], frame=frame)
    assert response.json()["predictions"] == expected


@pytest.mark.parametrize("variant", ["champion", "int8"])
def test_logged_model_names_only_published_pinned_requirements_and_carries_its_code(registered, variant):
    local = Path(mlflow.artifacts.download_artifacts(registered[variant]))
    lines = [ln.strip() for ln in (local / "requirements.txt").read_text().splitlines() if ln.strip()]
    names = {ln.partition("==")[0].lower() for ln in lines}
    assert names == {"mlflow", "torch", "safetensors", "numpy", "pandas"}, lines
    assert not names & set(NOT_PUBLISHED)
    for line in lines:
        name, sep, pin = line.partition("==")
        assert sep and pin and not any(c in pin for c in "<>=!~*+, ;"), line
    assert f"torch=={torch.__version__.partition('+')[0]}" in lines
    assert (local / "code" / "mms_portable" / "predictor.py").is_file()
    assert (local / "artifacts" / "package" / "weights.safetensors").is_file()


def test_portable_code_imports_only_its_declared_dependencies():
    allowed = set(sys.stdlib_module_names) | set(mms_portable.DEPENDENCIES) | {"mms_portable"}
    package = Path(mms_portable.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            assert {n.partition(".")[0] for n in names} <= allowed, f"{path.name}: {names}"


def test_portable_loader_builds_only_built_in_networks_and_checks_the_weights(user_module, tmp_path):
    """What a model taken out of MMS trusts: the networks it carries, and weights matching their hash."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 3))
    config = PackageConfig(
        format="fp32",
        model=ModelSpec(name=f"{user_module}:build"),
        features=[f"f{i}" for i in range(4)],
        classes=[0, 1, 2],
        mean=[0.0] * 4,
        std=[1.0] * 4,
    )
    user = write_package(directory=tmp_path / "user", config=config, weights=state_bytes(net))
    with pytest.raises(mms_portable.PortableModelError, match="not one of the built-in networks"):
        mms_portable.load_package(user)
    assert user_module not in sys.modules  # refused by name, never imported

    zoo = config.model_copy(update={"model": ModelSpec(name="mlp", kwargs={"hidden": [12], "dropout": 0.0})})
    weights = state_bytes(mms_portable.ZOO["mlp"](in_features=4, n_classes=3, hidden=(12,), dropout=0.0))
    package = write_package(directory=tmp_path / "zoo", config=zoo, weights=weights)
    assert mms_portable.load_package(package).predict_array(np.zeros((2, 4), np.float32)).shape == (2,)
    (package / mms_portable.WEIGHTS).write_bytes(state_bytes(net))
    with pytest.raises(mms_portable.PortableModelError, match="altered or corrupted"):
        mms_portable.load_package(package)


# mms_core/mlflow_model.py as it was before this change (git 71e1749), docstrings and comments left out.
OLD_PYFUNC = """
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext


class MMSClassifier(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        from mms_core.packaging import Predictor

        self.predictor = Predictor.from_directory(Path(context.artifacts["package"]))

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        return self.predictor.predict(model_input)


mlflow.models.set_model(MMSClassifier())
"""


def test_version_logged_with_the_old_mms_core_pyfunc_still_loads_in_mms(registered, tmp_path):
    """Registered before this change: the pyfunc imports mms_core, requirements list `mms`."""
    frame, uri = registered["frame"].iloc[:40], registered["uri"]
    config, weights, _ = registry.load_package(tracking_uri=uri, model=f"{NAME}@champion")
    package = write_package(directory=tmp_path / "package", config=config, weights=weights)
    (tmp_path / "mlflow_model.py").write_text(OLD_PYFUNC)
    with mlflow.start_run(run_id=registered["run_id"]):
        info = mlflow.pyfunc.log_model(
            name="model-legacy",
            python_model=str(tmp_path / "mlflow_model.py"),
            artifacts={"package": str(package)},
            pip_requirements=["torch", "safetensors", "pandas", "numpy", "mms"],
        )
    legacy = mlflow.register_model(info.model_uri, f"{NAME}-legacy").version
    expected = _mms_predictions(uri=uri, model=f"{NAME}@champion", frame=frame)
    assert _mms_predictions(uri=uri, model=f"{NAME}-legacy/{legacy}", frame=frame) == expected
    old_config, old_weights, _ = registry.load_package(tracking_uri=uri, model=f"{NAME}-legacy/{legacy}")
    assert cached_predictor(config=old_config, weights=old_weights).predict(frame).tolist() == expected
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}-legacy/{legacy}")
    assert np.asarray(pyfunc.predict(frame)).tolist() == expected


def test_user_model_registration_says_what_it_needs_and_fails_clearly_without_mms(
    registered, user_module, tmp_path, caplog
):
    manifest, uri = registered["manifest"], registered["uri"]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10))
    spec = ModelSpec(name=f"{user_module}:build", kwargs={"width": 12})
    with caplog.at_level("WARNING", logger="mms_core.registry"):
        version = registry.register_package(
            tracking_uri=uri,
            run_id=registered["run_id"],
            name=f"{NAME}-user",
            config=PackageConfig.from_manifest(manifest, model=spec, format="fp32"),
            weights=state_bytes(net),
            example=registered["frame"].iloc[:3],
            tags={registry.TAG_VARIANT: "fp32"},
        )
    warning = " ".join(r.getMessage() for r in caplog.records if r.name == "mms_core.registry")
    assert f"'{user_module}:build'" in warning and "MMS_TRUSTED_MODEL_MODULES" in warning

    uris = {"user": f"models:/{NAME}-user/{version}"}
    out = _load_without_mms(where=tmp_path, tracking_uri=uri, uris=uris, frame=registered["frame"].iloc[:3])
    error = out["user"]["error"]
    assert "user model" in error and user_module in error and "MMS_TRUSTED_MODEL_MODULES" in error
