"""Deployments of the training pipeline: built correctly, and served end to end on the local stack."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import psutil
import pytest
from prefect.client.orchestration import SyncPrefectClient

from flows.deploy import DAILY, MANUAL, MONITORING_CRON, NIGHTLY, RETENTION_CRON, deployments
from infra.stack import stack_down, stack_env, stack_up
from mms_core.spec import PipelineSpec, load_spec
from mms_core.tuning.space import load_tuning

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")
FAST = ["training.epochs=2", "evaluate.min_accuracy=0.0", "registry.experiment=test-deploy"]


def test_deployments_nightly_on_cron_with_spec_and_manual_unscheduled() -> None:
    nightly, manual, predict, rollout, cleanup, cleanup_manual, study, watch, watch_manual = deployments(
        cron="30 3 * * 1"
    )

    assert (nightly.name, manual.name) == (NIGHTLY, MANUAL) == ("digits-nightly", "manual")
    assert nightly.flow_name == manual.flow_name == "training-pipeline"
    assert [s.schedule.cron for s in nightly.schedules] == ["30 3 * * 1"]
    assert manual.schedules == []
    spec = PipelineSpec.model_validate(nightly.parameters["spec"])
    assert spec == load_spec(REPO / "examples" / "digits.yaml")
    assert manual.parameters == {}
    assert nightly.tags == manual.tags == ["mms"] and nightly.description and manual.description
    # Runs load the flow by module path, whatever directory the serving process runs in.
    assert nightly.entrypoint == "flows.training_pipeline.training_pipeline"
    assert (predict.flow_name, predict.name, predict.schedules) == ("batch-predict", "manual", [])
    assert predict.entrypoint == "flows.batch_predict.batch_predict"
    assert (rollout.flow_name, rollout.name, rollout.schedules) == ("serving-rollout", "manual", [])
    assert rollout.entrypoint == "flows.serving_rollout.serving_rollout"
    assert (cleanup.flow_name, cleanup.name, cleanup.parameters) == ("retention", DAILY, {})
    assert [s.schedule.cron for s in cleanup.schedules] == [RETENTION_CRON]
    assert (cleanup_manual.name, cleanup_manual.schedules) == (MANUAL, [])
    assert cleanup_manual.parameters == {"policy": {"dry_run": True}}  # safe by default
    assert cleanup.entrypoint == cleanup_manual.entrypoint == "flows.retention.retention"
    assert (study.flow_name, study.name, study.schedules) == ("tuning", MANUAL, [])
    assert study.entrypoint == "flows.tuning.tuning"
    tune_spec, tune = load_tuning(REPO / "examples" / "digits-tune.yaml")
    assert (watch.flow_name, watch.name, watch_manual.name) == ("monitoring", "hourly", MANUAL)
    assert [s.schedule.cron for s in watch.schedules] == [MONITORING_CRON] and watch_manual.schedules == []
    assert watch.entrypoint == watch_manual.entrypoint == "flows.monitoring.monitoring"
    assert watch.parameters == watch_manual.parameters == {}  # the flow's defaults; UI form to change
    assert study.parameters == {
        "spec": tune_spec.model_dump(mode="json"),
        "tune": tune.model_dump(mode="json"),
    }


def test_serve_refuses_to_run_without_a_prefect_server(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    code = "from flows.deploy import serve_deployments; serve_deployments()"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "PREFECT_API_URL is not set" in proc.stderr and "mms stack up" in proc.stderr


def _stop_group(proc: subprocess.Popen, timeout_s: float = 20) -> None:
    """SIGTERM the serve process's group (it and its flow-run children), then SIGKILL what is left."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)  # its own group: started with start_new_session=True
        _, family = psutil.wait_procs(family, timeout=timeout_s if sig == signal.SIGTERM else 5)
        for p in family:
            with suppress(psutil.NoSuchProcess):
                p.kill()
        if not family:
            break
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _tail(log: Path, n: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else "(no log)"


def _stack_and_client_env(home: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Start the local stack under ``home``; its variables, and an environment for client
    processes (serve, worker, CLIs) that sees only the stack, not this shell's settings."""
    stack = stack_env(stack_up(home=home, with_redis=False, timeout_s=150))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MMS_"))}
    env |= stack | {
        "MMS_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect-client"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    return stack, env


def _wait_for_deployment(client, name: str, serve: subprocess.Popen, log: Path, timeout_s: float) -> None:
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    while True:
        with suppress(ObjectNotFound):
            client.read_deployment_by_name(name)
            return
        assert serve.poll() is None, f"serve process exited with {serve.returncode}:\n{_tail(log)}"
        assert time.monotonic() < deadline, f"deployment {name} not registered in {timeout_s}s:\n{_tail(log)}"
        time.sleep(1)


def _run_deployment(
    client, name: str, *args: str, env: dict, cwd: Path, runner: subprocess.Popen, log: Path, timeout_s: float
):
    """`prefect deployment run NAME ARGS`, then wait until ``runner`` (a serve process or a worker)
    has finished the flow run; it must have completed. Returns the flow run."""
    cli = subprocess.run(
        [PREFECT, "deployment", "run", name, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    found = re.search(r"UUID: ([0-9a-f-]{36})", cli.stdout)
    assert found, cli.stdout
    run = _wait_for_run(client, found.group(1), runner, log, timeout_s=timeout_s)
    assert run.state.is_completed(), f"flow run {run.state_name}: {run.state.message}\n{_tail(log)}"
    return run


def _wait_for_run(client, run_id: str, serve: subprocess.Popen, log: Path, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while True:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run
        assert serve.poll() is None, f"serve process exited with {serve.returncode}:\n{_tail(log)}"
        assert time.monotonic() < deadline, (
            f"flow run still {run.state_name} after {timeout_s}s:\n{_tail(log)}"
        )
        time.sleep(2)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_served_manual_deployment_runs_on_the_stack_and_registers_a_model(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    serve = None
    log = tmp_path / "serve.log"
    try:
        stack, env = _stack_and_client_env(tmp_path)
        code = "from flows.deploy import serve_deployments; serve_deployments()"
        with open(log, "wb") as out:
            serve = subprocess.Popen(
                [sys.executable, "-c", code],
                env=env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        with SyncPrefectClient(stack["PREFECT_API_URL"]) as client:
            _wait_for_deployment(client, f"training-pipeline/{MANUAL}", serve, log, timeout_s=90)
            nightly = client.read_deployment_by_name(f"training-pipeline/{NIGHTLY}")
            assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]

            params = json.dumps(
                {"spec": load_spec(REPO / "examples" / "digits.yaml", overrides=FAST).model_dump(mode="json")}
            )
            run = _run_deployment(
                client, f"training-pipeline/{MANUAL}", "--params", params,
                env=env, cwd=REPO, runner=serve, log=log, timeout_s=180,
            )  # fmt: skip
            assert run.parameters["spec"]["training"]["epochs"] == 2

        registry = MlflowClient(tracking_uri=stack["MMS_MLFLOW_URI"])
        versions = registry.search_model_versions("name='digits-classifier'")
        assert versions, "no version of digits-classifier registered on the stack's MLflow server"
        assert {v.tags.get("mms.prefect_flow_run_id") for v in versions} == {str(run.id)}
        assert registry.get_model_version_by_alias("digits-classifier", "champion").run_id
        # Model files went through the server to its --artifacts-destination, not to MMS_HOME.
        served = list((tmp_path / "mlartifacts").rglob("weights.safetensors"))
        assert served, "no model weights under the MLflow server's artifact destination"
        assert not (tmp_path / "artifacts").exists()
    finally:
        # The serve process first: once its server is gone it ignores SIGTERM (design brief, section 2).
        if serve is not None:
            _stop_group(serve)
        stack_down(home=tmp_path, timeout_s=10)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_work_pool_registration_and_a_prefect_worker_run_a_deployment(tmp_path: Path) -> None:
    """`mms deploy --work-pool` registers every deployment with a process pool and returns; a
    separately started `prefect worker` (cwd elsewhere, as on another machine) picks up and runs a
    deployment run started with `prefect deployment run`."""
    worker = None
    log = tmp_path / "worker.log"
    try:
        stack, env = _stack_and_client_env(tmp_path)
        env["PREFECT_WORKER_QUERY_SECONDS"] = "1"  # poll the pool every second, not every 10
        mms = str(Path(sys.executable).parent / "mms")
        register = [mms, "deploy", "--work-pool", "mms-pool"]
        cli = subprocess.run(register, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert "9 deployments registered with work pool 'mms-pool'" in cli.stdout
        assert "prefect worker start --pool mms-pool" in cli.stdout
        again = subprocess.run(register, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stdout + again.stderr  # re-registering updates in place

        with SyncPrefectClient(stack["PREFECT_API_URL"]) as client:
            assert client.read_work_pool("mms-pool").type == "process"
            nightly = client.read_deployment_by_name(f"training-pipeline/{NIGHTLY}")
            assert nightly.work_pool_name == "mms-pool"
            assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]

            (tmp_path / "elsewhere").mkdir()
            with open(log, "wb") as out:
                worker = subprocess.Popen(
                    [PREFECT, "worker", "start", "--pool", "mms-pool"],
                    env=env,
                    cwd=tmp_path / "elsewhere",
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            run = _run_deployment(  # a dry run: lists, deletes nothing
                client, f"retention/{MANUAL}",
                env=env, cwd=tmp_path / "elsewhere", runner=worker, log=log, timeout_s=150,
            )  # fmt: skip
            assert run.work_pool_name == "mms-pool"
            assert run.parameters["policy"] == {"dry_run": True}

        bad = subprocess.run(
            [mms, "deploy", "--work-pool", "mms-pool"],
            env={k: v for k, v in env.items() if k != "PREFECT_API_URL"}
            | {"MMS_HOME": str(tmp_path / "no-stack")},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert bad.returncode == 1 and "PREFECT_API_URL is not set" in bad.stdout, bad.stdout + bad.stderr
    finally:
        if worker is not None:
            _stop_group(worker)
        stack_down(home=tmp_path, timeout_s=10)
