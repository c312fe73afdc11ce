"""The cluster configs in infra/ checked statically: they parse, refer to things that exist, set
only settings the code reads, bind host ports to loopback, and install what pyproject declares."""

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from infra.dask_config import WORKER_DASK_CONFIG
from mms_core.config import Settings
from mms_core.serving.online.config import ServeConfig

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
YAMLS = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s() -> list[dict]:
    return [d for p in sorted((INFRA / "k8s").glob("*.yaml")) for d in _docs(p)]


def _known_env(name: str) -> bool:
    """An MMS_* variable the code reads (Settings or ServeConfig), or a third-party one."""
    if name.startswith("MMS_SERVE_"):
        return name.removeprefix("MMS_SERVE_").lower() in ServeConfig.model_fields
    if name.startswith("MMS_"):
        return name.removeprefix("MMS_").lower() in Settings.model_fields
    return name.startswith(("PREFECT_", "AWS_", "MLFLOW_", "POSTGRES_", "MINIO_"))


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_parses(path):
    assert _docs(path), f"{path} is empty"


def test_k8s_manifests_are_complete_and_refer_to_what_they_define():
    docs = _k8s()
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), d
    kinds = {d["kind"] for d in docs}
    assert {"DaskCluster", "DaskWorkerGroup", "ConfigMap", "Secret", "Deployment", "Service"} <= kinds
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    for d in docs:
        if d["kind"] == "Deployment":
            assert (
                d["spec"]["selector"]["matchLabels"].items()
                <= d["spec"]["template"]["metadata"]["labels"].items()
            )
        if d["kind"] == "Service" and d["metadata"]["name"] in deployments:
            labels = deployments[d["metadata"]["name"]]["spec"]["template"]["metadata"]["labels"]
            assert d["spec"]["selector"].items() <= labels.items(), d["metadata"]["name"]
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP"  # nothing exposed by default
        if d["kind"] == "DaskWorkerGroup":
            assert ("DaskCluster", d["spec"]["cluster"]) in names
    for d in docs:
        for c in _containers(d):
            for ref in c.get("envFrom", []):
                kind, name = ("ConfigMap", ref["configMapRef"]["name"]) if "configMapRef" in ref else (
                    "Secret", ref["secretRef"]["name"])  # fmt: skip
                assert (kind, name) in names, (d["metadata"]["name"], kind, name)
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    secret = next(d for d in docs if d["kind"] == "Secret")
    for key in [*config["data"], *secret["stringData"]]:
        assert _known_env(key), key
    assert all("change-me" in v for v in secret["stringData"].values())  # placeholders only


def test_gpu_workers_run_dask_cuda_with_the_gpu_resource_and_a_gpu_limit():
    (group,) = [d for d in _k8s() if d["kind"] == "DaskWorkerGroup"]
    (c,) = _containers(group)
    args = c["args"]
    assert args[:3] == ["dask", "cuda", "worker"]
    assert args[args.index("--resources") + 1] == "GPU=1"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    (cluster,) = [d for d in _k8s() if d["kind"] == "DaskCluster"]
    (cpu,) = cluster["spec"]["worker"]["spec"]["containers"]
    assert "--resources" not in cpu["args"]  # CPU workers never advertise GPU


def test_compose_services_depend_on_services_that_exist_and_bind_host_ports_to_loopback():
    compose = yaml.safe_load((INFRA / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "mlflow", "prefect-server", "redis", "dask-scheduler", "dask-worker",
            "mms-deploy", "prefect-worker", "mms-serve"} <= set(services)  # fmt: skip
    for name, svc in services.items():
        deps = svc.get("depends_on", [])
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, (name, dep)
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
        env = svc.get("environment", {})
        for key in env if isinstance(env, dict) else [e.split("=")[0] for e in env]:
            assert _known_env(key), (name, key)
    assert services["dask-worker"]["deploy"]["replicas"] == 2
    serve = services["mms-serve"]
    assert "0.0.0.0" in serve["command"] and serve["environment"]["MMS_SERVE_REQUIRE_KEY"] == "true"
    mlflow = " ".join(services["mlflow"]["command"])
    assert "postgresql://" in mlflow and "s3://" in mlflow and "--workers=1" in mlflow


def test_compose_variables_all_have_an_example_and_no_real_secret_is_committed():
    text = (INFRA / "compose" / "docker-compose.yml").read_text()
    needed = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", text))  # $${X} is for the container shell
    example = dict(
        line.split("=", 1) for line in (INFRA / "compose" / "example.env").read_text().splitlines()
        if line and not line.startswith("#")
    )  # fmt: skip
    assert needed == set(example)
    assert all(v.startswith("change-me") for v in example.values())
    assert not (INFRA / "compose" / ".env").exists()
    init = (INFRA / "compose" / "postgres-init.sql").read_text()
    assert "CREATE DATABASE prefect" in init and "CREATE DATABASE optuna" in init


def _image_uid() -> int:
    return int(
        re.search(r"useradd [^\n]*--uid (\d+)", (INFRA / "docker" / "Dockerfile").read_text()).group(1)
    )


def _deploy_spec_exists(args: list[str]) -> None:
    """`mms deploy` in the image needs --spec: the installed flows package has no examples/ beside it
    (flows/deploy.py DEFAULT_SPEC), and the image's working directory is the source tree."""
    assert args[:2] == ["mms", "deploy"] and "--spec" in args, args
    assert (REPO / args[args.index("--spec") + 1]).is_file()


def test_compose_shares_mms_home_between_deploy_serve_and_workers():
    services = yaml.safe_load((INFRA / "compose" / "docker-compose.yml").read_text())["services"]
    home = services["mms-deploy"]["environment"]["MMS_HOME"]
    for name in ("mms-deploy", "prefect-worker", "mms-serve", "dask-worker"):
        assert services[name]["environment"]["MMS_HOME"] == home
        # API keys (metering.db) and serving leases live under MMS_HOME; retention runs in the worker.
        assert f"mms-home:{home}" in services[name]["volumes"], name
    _deploy_spec_exists(services["mms-deploy"]["command"])


def test_compose_registers_the_deployments_with_the_pool_its_prefect_workers_poll():
    services = yaml.safe_load((INFRA / "compose" / "docker-compose.yml").read_text())["services"]
    register, worker = services["mms-deploy"]["command"], services["prefect-worker"]["command"]
    pool = register[register.index("--work-pool") + 1]
    assert worker[:3] == ["prefect", "worker", "start"] and worker[worker.index("--pool") + 1] == pool
    assert worker[worker.index("--type") + 1] == "process"  # what flows.deploy registers with
    assert services["mms-deploy"]["restart"] == "on-failure"  # until the Prefect server answers
    assert services["prefect-worker"]["environment"] == services["dask-worker"]["environment"]


def test_k8s_deploy_and_serve_share_mms_home_on_a_read_write_many_volume():
    docs = _k8s()
    (claim,) = [
        d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "mms-home"
    ]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # two pods, maybe on two nodes
    home = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["MMS_HOME"]
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]
        for d in docs
        if d["kind"] in ("Deployment", "Job")
    }
    for name in ("mms-deploy", "prefect-worker", "mms-serve"):
        pod = pods[name]
        (volume,) = [
            v for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "mms-home"
        ]
        (c,) = pod["containers"]
        assert {"name": volume["name"], "mountPath": home} in c["volumeMounts"], name
        assert pod["securityContext"]["fsGroup"] == _image_uid()  # the non-root user can write it
    _deploy_spec_exists(pods["mms-deploy"]["containers"][0]["args"])


def test_k8s_registers_the_deployments_with_the_pool_its_prefect_workers_poll():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _k8s()}
    job = docs[("Job", "mms-deploy")]["spec"]
    register = job["template"]["spec"]["containers"][0]["args"]
    worker = docs[("Deployment", "prefect-worker")]["spec"]["template"]["spec"]["containers"][0]["args"]
    pool = register[register.index("--work-pool") + 1]
    assert worker[:3] == ["prefect", "worker", "start"] and worker[worker.index("--pool") + 1] == pool
    assert worker[worker.index("--type") + 1] == "process"
    assert job["template"]["spec"]["restartPolicy"] == "OnFailure" and job["backoffLimit"] >= 3


def test_dockerfile_installs_what_pyproject_and_the_makefile_do():
    docker = (INFRA / "docker" / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    (make_torch,) = re.findall(r"pip install -q (torch==[\d.]+)", makefile)
    assert re.findall(r"pip install (torch==[\d.]+)", docker) == [make_torch]
    extras = re.search(r"ARG EXTRAS=([\w,]+)", docker).group(1).split(",")
    assert set(extras) <= set(pyproject["project"]["optional-dependencies"])
    assert 'pip install "/src[${EXTRAS}]"' in docker
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    copied = set(re.findall(r"^COPY (\w+) /src/\1$", docker, flags=re.M))
    assert set(packages) <= copied  # every package pyproject installs is in the image
    assert re.search(r"^USER (?!root)\w+", docker, flags=re.M)
    assert "COPY infra/docker/dask-worker.yaml /etc/dask/" in docker


def test_the_image_dask_config_is_the_one_local_clusters_get():
    assert yaml.safe_load((INFRA / "docker" / "dask-worker.yaml").read_text()) == WORKER_DASK_CONFIG


# Every key SLURMCluster/SLURMJob read with dask.config.get("jobqueue.<config_name>.<key>") (dask-jobqueue
# 0.9.0). Only the section named `slurm` has defaults from dask-jobqueue itself; any other config name
# without one of these fails at SLURMCluster(config_name=...) with a KeyError.
JOBQUEUE_SLURM_KEYS = {
    "name", "cores", "memory", "processes", "python", "interface", "death-timeout", "local-directory",
    "shared-temp-directory", "extra", "worker-command", "worker-extra-args", "shebang", "queue", "account",
    "walltime", "env-extra", "job-script-prologue", "job-cpu", "job-mem", "job-extra",
    "job-extra-directives", "job-directives-skip", "log-directory", "scheduler-options",
}  # fmt: skip


def test_jobqueue_config_has_what_dask_jobqueue_needs():
    queues = yaml.safe_load((INFRA / "slurm" / "jobqueue.yaml").read_text())["jobqueue"]
    for name in ("slurm", "slurm-gpu"):
        q = queues[name]
        assert not JOBQUEUE_SLURM_KEYS - set(q), (name, sorted(JOBQUEUE_SLURM_KEYS - set(q)))
        assert q["processes"] == 1 and isinstance(q["cores"], int)
        args = q["worker-extra-args"]
        assert args[args.index("--nthreads") + 1] == "1"  # one rank per worker process
        assert any("DASK_CONFIG=" in line and "infra/docker/dask-worker.yaml" in line
                   for line in q["job-script-prologue"])  # fmt: skip
    assert queues["slurm"]["worker-command"] == "distributed.cli.dask_worker"
    assert (
        queues["slurm-gpu"]["worker-command"] == "dask_cuda.cli"
    )  # python -m dask_cuda.cli = dask cuda worker
    gpu = queues["slurm-gpu"]
    assert gpu["worker-extra-args"][gpu["worker-extra-args"].index("--resources") + 1] == "GPU=1"
    assert any("gpu" in d for d in gpu["job-extra-directives"])


def test_the_infra_readme_describes_every_file():
    readme = (INFRA / "README.md").read_text()
    for path in [*YAMLS, INFRA / "docker" / "Dockerfile"]:
        rel = path.relative_to(INFRA).as_posix()
        if rel.startswith(("k8s/", "compose/", "docker/", "slurm/")):
            assert rel in readme, rel


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    if doc["kind"] == "Deployment":
        return spec["template"]["spec"]["containers"]
    if doc["kind"] in ("DaskCluster", "DaskWorkerGroup"):
        out = spec["worker"]["spec"]["containers"]
        return out + (spec["scheduler"]["spec"]["containers"] if "scheduler" in spec else [])
    return []
