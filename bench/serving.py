"""Online serving (issue 3): added latency, requests/s per core, dynamic batching gain, and our
``/invocations`` against ``mlflow models serve``, all measured in one run.

    python -m bench.serving [--quick] [--plot-only] [--mixed-only [--mixed-pairs N --mixed-duration S]]
        [--against REV] [--revision-only] [--revision-pairs N] [--revision-duration S]

Each server is its own process on a temporary MMS_HOME whose SQLite MLflow store holds the
registered models: ours is what ``mms serve --model NAME@champion`` runs (LocalCluster of 2
worker processes x 1 thread, 2 replicas, uvicorn; ``serve_mms`` says what it leaves out),
MLflow's is ``mlflow models serve -m models:/digits-classifier/1 --env-manager local``. The load
comes from ``bench._loadgen`` in another process (closed loop, keep-alive, 1 row per request).
Baselines are measured in the same run: the model called in-process (``Predictor.predict_array``
on the same row) for added latency, the same server with ``max_batch_size=1`` for the batching
gain, MLflow's server (same model, same load, same ``dataframe_split`` body) for /invocations.

"At equal p99": each server is swept over client concurrency (1..64); its figure under an SLO is
the highest requests/s among the levels whose p99 stays within it (and that answered only 200s).
The batching gain is the ratio of the two figures under the same SLO: p99 <= 50 ms (headline),
also 25, 100 and 200 ms.

Mixed traffic: on our server (digits MLP, batching 64, after its sweeps), at 16 clients, clean
load alternates with load of which 5% are malformed requests (``bench._loadgen.KINDS``: rows of
lists, wrong width, strings, NaN tokens, deep nesting, a 5000-digit integer, bad UTF-8, not JSON,
text/plain, empty). Each pair is one clean and one mixed window, in the order AB, BA, AB, ... (the
box's speed drifts); the figures are the medians of the per-pair ratios mixed/clean of the good
requests' rps and p99 (goals >= 0.9 and <= 1.5), with their range. A good request counts only if
it got 200 with the prediction the model gives in this process; the malformed ones' answers are
counted by status (4xx expected; 5xx, timeouts and dropped connections fail the goal).
``--mixed-only`` runs just this (and prints, as always, to stdout only).

Against an earlier revision (``--against REV``, default ``dc58bb3``): absolute figures move a lot
between days on a shared box, so "the figures do not fall" after a change of the server is checked
as a ratio against the previous code measured in the same run. ``dc58bb3`` is the last commit
before mms_core/serving/ was split into online/, offline/ and metering/ (2dc97a6) and the online
server restructured (c57d0ad and after): the change this comparison is for.
REV's tracked files are exported with ``git archive`` into a temporary directory; its server is
REV's own ``bench/serving.py --serve`` (REV's tree first on PYTHONPATH and as the working
directory, this virtual env), ours is this working tree's ``serve_mms``; each on its own fresh
MMS_HOME holding the digits MLP registered by this file's ``register_models``, batching 64. Both
are up at once, primed, then measured in N alternating pairs (REV then ours, ours then REV, ...),
each side one load generator: 1 client (p50, p99) then 32 clients (rps), the body and path of the
added-latency and per-core figures. The figures are the medians of the per-pair ratios ours/REV
with their range; goals: p50 <= 1.1x and rps >= 0.9x, all pairs measured, ours answering only
200s. It runs last, after every other server has stopped, and a failure is recorded
(``revision_error``, failed pairs), never raised; ``--revision-only`` runs just this.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench._loadgen import KINDS

HERE = Path(__file__).parent
REPO = HERE.parent
DATA = HERE / "data" / "serving.jsonl"
PNG = HERE / "serving.png"
BIN = Path(sys.executable).parent
FEATURES = [f"pixel_{i}" for i in range(64)]
TINY = "digits-classifier"  # the serving tests' digits MLP (64 -> 128 -> 64 -> 10), trained
HEAVY = "digits-mlp-3x2048"  # 64 -> 3 x 2048 -> 10, random weights: ~1.8 ms per row on 1 thread
SLO_MS = (25, 50, 100, 200)
HEADLINE_SLO_MS = 50
MIXED_CLIENTS, BAD_FRACTION, REQUEST_TIMEOUT_S = 16, 0.05, 5.0
MIXED_GOALS = {"rps_ratio": 0.9, "p99_ratio": 1.5, "server_errors": 0}
DEFAULT_REV = "dc58bb3"  # the last commit before the restructure of mms_core/serving/online/
REVISION_CLIENTS = (1, 32)  # p50 and p99 at 1 client, rps at 32
REVISION_GOALS = {"p50_ratio": 1.1, "rps_ratio": 0.9}


def emit(**fields: object) -> dict:
    machine = f"{platform.machine()} {os.cpu_count()} cpu"
    line = {"bench": "serving", "machine": machine, "date": datetime.now(UTC).strftime("%Y-%m-%d"), **fields}
    print(json.dumps(line), flush=True)
    return line


# ---- models ---------------------------------------------------------------------------------
def make_package(name: str):
    """(PackageConfig, weights) of ``name``: the digits MLP trained as in the serving tests
    (30 full-batch epochs), or the heavy MLP with random weights."""
    import torch
    from safetensors.torch import save as st_save
    from sklearn.datasets import load_digits

    from mms_core.models import ModelSpec, build_model
    from mms_core.packaging import PackageConfig

    digits = load_digits()
    mean, std = digits.data.mean(0), digits.data.std(0) + 1
    spec = ModelSpec() if name == TINY else ModelSpec(kwargs={"hidden": [2048] * 3, "dropout": 0.0})
    torch.manual_seed(0)
    model = build_model(spec=spec, in_features=64, n_classes=10)
    if name == TINY:
        x = torch.tensor((digits.data - mean) / std, dtype=torch.float32)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(30):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), torch.tensor(digits.target)).backward()
            opt.step()
    config = PackageConfig(
        format="fp32", model=spec, features=FEATURES, classes=list(range(10)),
        mean=mean.tolist(), std=std.tolist(),
    )  # fmt: skip
    return config, st_save({k: v.contiguous() for k, v in model.state_dict().items()})


def register_models(*, home: Path, names: tuple[str, ...] = (TINY, HEAVY)) -> str:
    """Register the models (version 1, alias champion) in a fresh store; returns its URI."""
    import pandas as pd
    from sklearn.datasets import load_digits

    from mms_core import registry

    uri = f"sqlite:///{home / 'mlflow.db'}"
    exp = registry.ensure_experiment(tracking_uri=uri, name="bench", artifact_root=(home / "art").as_uri())
    example = pd.DataFrame(load_digits().data[:3].astype(np.float32), columns=FEATURES)
    for name in names:
        config, weights = make_package(name)
        run_id = registry.start_run(tracking_uri=uri, experiment_id=exp, run_name=name, tags={}, params={})
        version = registry.register_package(
            tracking_uri=uri, run_id=run_id, name=name, config=config, weights=weights, example=example,
            tags={registry.TAG_VARIANT: "fp32"},
        )  # fmt: skip
        registry.end_run(tracking_uri=uri, run_id=run_id)
        registry.set_alias(tracking_uri=uri, name=name, alias="champion", version=version)
    return uri


def direct_latency(*, tracking_uri: str, name: str, row: np.ndarray, seconds: float) -> dict:
    """The registered model called in this process on one row, torch on 1 thread (as a replica)."""
    import torch

    from mms_core import registry
    from mms_core.packaging import Predictor

    config, weights, _ = registry.load_package(tracking_uri=tracking_uri, model=f"{name}@champion")
    predictor, x, times = Predictor(config=config, weights=weights), row[None, :], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for _ in range(200):
        predictor.predict_array(x)
    deadline = time.perf_counter() + seconds
    while (t0 := time.perf_counter()) < deadline:
        predictor.predict_array(x)
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    p50, p99 = np.percentile(np.asarray(times) * 1e3, [50, 99])
    return {"model": name, "calls": len(times), "p50_ms": round(p50, 4), "p99_ms": round(p99, 4)}


def expected_predictions(*, tracking_uri: str, name: str, row: np.ndarray) -> list:
    """What a good request for ``row`` must get back: the registered model's prediction in-process."""
    from mms_core import registry
    from mms_core.packaging import Predictor

    config, weights, _ = registry.load_package(tracking_uri=tracking_uri, model=f"{name}@champion")
    return Predictor(config=config, weights=weights).predict_array(row[None, :]).tolist()


# ---- servers (child processes) ---------------------------------------------------------------
def serve_mms(*, model: str, port: int) -> None:
    """What ``mms serve --model MODEL@champion --port PORT`` runs (mms_cli/serving.py): the
    scheduler's address with no Dask client of our own (the server's runtime opens the one), passed
    to ``build_server``. Left out: the CLI's look for a running ``mms stack`` (a fresh MMS_HOME has
    none), its messages and its exit status."""
    from infra.cluster import dask_scheduler
    from mms_core.config import Settings
    from mms_core.serving.online.config import ServeConfig
    from mms_core.serving.online.server import build_server, serve_forever

    settings = Settings()
    with dask_scheduler(settings) as address:
        server = build_server(
            config=ServeConfig(port=port), model=f"{model}@champion", tracking_uri=settings.tracking_uri,
            scheduler_address=address, home=settings.home,
        )  # fmt: skip
        serve_forever(server)


def serve_inprocess(*, model: str, port: int) -> None:
    """Reference without the Dask hop: the same uvicorn, FastAPI and body parser, the model called
    on the event loop (torch on 1 thread). Not a product path: it only splits the added latency."""
    import orjson
    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import Response

    from mms_core import registry
    from mms_core.config import Settings
    from mms_core.packaging import Predictor
    from mms_core.serving.payload import InputSchema, parse_body

    torch.set_num_threads(1)
    config, weights, _ = registry.load_package(
        tracking_uri=Settings().tracking_uri, model=f"{model}@champion"
    )
    predictor = Predictor(config=config, weights=weights)
    schema = InputSchema(features=config.features, mean=config.mean)
    app = FastAPI()

    async def predict(name: str, request: Request) -> Response:
        x = parse_body(orjson.loads(await request.body()), schema)
        body = {"predictions": predictor.predict_array(x).tolist(), "model": name, "version": "1"}
        return Response(orjson.dumps(body), media_type="application/json")

    # FastAPI resolves string annotations in module globals; these classes are local imports.
    predict.__annotations__ = {"name": str, "request": Request, "return": Response}
    app.post("/v1/models/{name}/predict")(predict)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ---- the run ----------------------------------------------------------------------------------
class Bench:
    """One run: a temporary MMS_HOME, the request bodies, and every line emitted."""

    def __init__(self, *, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp, self.home = args, tmp, tmp / "home"
        self.home.mkdir()
        self.lines: list[dict] = []
        self.bodies: dict[str, Path] = {}

    def out(self, **fields: object) -> None:
        self.lines.append(emit(**fields))

    def write_bodies(self, row: np.ndarray) -> None:
        values = [float(v) for v in row]
        for name, body in {
            "inputs": {"inputs": [values]},
            "dataframe_split": {"dataframe_split": {"columns": FEATURES, "data": [values]}},
        }.items():
            self.bodies[name] = self.tmp / f"{name}.json"
            self.bodies[name].write_text(json.dumps(body))

    def env(self, *, home: Path | None = None, tree: Path = REPO, max_batch_size: int | None = None) -> dict:
        """A server's environment: nothing of ours but MMS_HOME (``home``, default the run's) and
        the batch size; another revision's ``tree`` first on PYTHONPATH (before the editable install)."""
        home = home or self.home
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MMS_", "PREFECT_", "MLFLOW_"))}
        # `mlflow models serve` execs `uvicorn` from PATH: this venv's bin first, as activating it does.
        env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", MMS_HOME=str(home), PYTHONUNBUFFERED="1",
                   MLFLOW_TRACKING_URI=f"sqlite:///{home}/mlflow.db")  # fmt: skip
        if max_batch_size is not None:
            env["MMS_SERVE_MAX_BATCH_SIZE"] = str(max_batch_size)
        if tree != REPO:
            env["PYTHONPATH"] = str(tree)
        return env

    @contextlib.contextmanager
    def server(self, kind: str, *, model: str = TINY, max_batch_size: int | None = None, workers: int = 1,
               name: str, home: Path | None = None, tree: Path = REPO,
               ) -> Iterator[tuple[int, int]]:  # fmt: skip
        """Start one server process (``kind``: mms, shipped, inprocess, mlflow) from ``tree`` (as its
        working directory) on ``home``; yield (port, pid). Stopped on exit with SIGTERM, then its
        remaining process tree killed (the Dask workers of a server that did not exit in time)."""
        import psutil

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = self.env(home=home, tree=tree, max_batch_size=max_batch_size)
        argv, ready = {
            "mms": ([sys.executable, "-m", "bench.serving", "--serve", model], "/ready"),
            "shipped": ([str(BIN / "mms"), "serve", "--model", f"{model}@champion"], "/ready"),
            "inprocess": ([sys.executable, "-m", "bench.serving", "--serve-inprocess", model], "/docs"),
            "mlflow": ([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{model}/1", "--env-manager",
                        "local", "--host", "127.0.0.1", "-w", str(workers), "-p"], "/ping"),
        }[kind]  # fmt: skip
        log = self.tmp / f"{''.join(c if c.isalnum() or c in '.-' else '_' for c in name)}.log"
        t0 = time.perf_counter()
        argv += [str(port)] if kind == "mlflow" else ["--port", str(port)]
        with log.open("wb") as sink:
            proc = subprocess.Popen(argv, cwd=tree, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            while True:
                with contextlib.suppress(OSError):
                    if urllib.request.urlopen(f"http://127.0.0.1:{port}{ready}", timeout=2).status == 200:
                        break
                if proc.poll() is not None or time.perf_counter() - t0 > 120:
                    raise RuntimeError(f"server {name} did not become ready:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
            seconds = round(time.perf_counter() - t0, 1)
            self.out(
                measure="server_start_s",
                server=name,
                model=model,
                max_batch_size=max_batch_size,
                value=seconds,
            )
            yield port, proc.pid
        finally:
            children: list[psutil.Process] = []
            with contextlib.suppress(psutil.Error):
                children = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            _, alive = psutil.wait_procs(children, timeout=10)
            for child in alive:
                with contextlib.suppress(psutil.Error):
                    child.kill()

    def sweep(self, port_pid: tuple[int, int], *, server: str, model: str = TINY, max_batch_size: int | None,
              endpoint: str, levels: list[int]) -> None:  # fmt: skip
        """One load line per concurrency level; the first level (1 client) runs longer with a CDF.
        The server is warmed up first (unreported) at the top level: batch shapes, connections."""
        port, pid = port_pid
        payload = "dataframe_split" if endpoint == "invocations" else "inputs"
        path = "/invocations" if endpoint == "invocations" else f"/v1/models/{model}/predict"
        a = self.args
        argv = [sys.executable, "-m", "bench._loadgen", "--port", str(port), "--path", path, "--body",
                str(self.bodies[payload]), "--warmup", str(a.warmup), "--watch-pid", str(pid)]  # fmt: skip
        runs = [
            ["--concurrency", "1", "--duration", str(a.seq_duration), "--cdf", "--prime", str(a.prime),
             "--prime-concurrency", str(max(levels))],
            ["--concurrency", ",".join(map(str, levels[1:])), "--duration", str(a.duration)],
        ]  # fmt: skip
        limit = a.prime + (a.warmup + max(a.duration, a.seq_duration)) * len(levels) + 120
        for extra in runs[: 1 + (len(levels) > 1)]:
            done = subprocess.run(  # the time limit: a stuck server fails the run, never hangs it
                [*argv, *extra], cwd=HERE.parent, capture_output=True, text=True, check=True, timeout=limit
            )
            for line in done.stdout.splitlines():
                self.out(measure="load", server=server, model=model, max_batch_size=max_batch_size,
                         endpoint=endpoint, payload=payload, **json.loads(line))  # fmt: skip

    def mixed(self, port_pid: tuple[int, int], *, expect: list) -> None:
        """Clean and mixed (``BAD_FRACTION`` malformed) windows in alternating pairs, one load
        generator per window; a window that fails or overruns is recorded as such, not raised."""
        port, pid = port_pid
        a = self.args
        argv = [sys.executable, "-m", "bench._loadgen", "--port", str(port), "--path",
                f"/v1/models/{TINY}/predict", "--body", str(self.bodies["inputs"]), "--watch-pid",
                str(pid), "--concurrency", str(MIXED_CLIENTS), "--duration", str(a.mixed_duration),
                "--warmup", str(a.warmup), "--expect", json.dumps(expect), "--timeout",
                str(REQUEST_TIMEOUT_S)]  # fmt: skip
        for pair in range(a.mixed_pairs):
            order = ("clean", "mixed") if pair % 2 == 0 else ("mixed", "clean")
            for condition in order:
                fraction = BAD_FRACTION if condition == "mixed" else 0.0
                cmd = [*argv, "--bad-fraction", str(fraction), "--seed", str(pair)]
                fields = {"measure": "mixed_load", "server": "mms", "model": TINY, "max_batch_size": 64,
                          "endpoint": "predict", "payload": "inputs", "pair": pair, "condition": condition,
                          "duration_s": a.mixed_duration}  # fmt: skip
                limit = a.warmup + a.mixed_duration + 2 * REQUEST_TIMEOUT_S + 60
                try:
                    done = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True, timeout=limit)
                except subprocess.TimeoutExpired:
                    self.out(**fields, error=f"load generator still running after {limit:.0f} s: killed")
                    continue
                lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
                if done.returncode != 0 or not lines:
                    self.out(**fields, error=f"load generator exit {done.returncode}: {done.stderr[-500:]}")
                    continue
                self.out(**fields, **lines[0])

    def revision(self) -> None:
        """Ours (this working tree) against ``--against REV`` in alternating pairs (module docstring).
        Never raises an ``Exception``: a failed window is recorded in its pair's line, a failure of
        the block as a ``revision_error`` line; both servers and the temporary directory (REV's tree,
        the two homes) are gone when it returns."""
        from bench.pipeline_walltime import export_baseline

        a, rev = self.args, self.args.against
        try:
            with contextlib.ExitStack() as stack:  # unwinds in reverse: servers first, then the files
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mms-bench-rev-")))
                commit, subject = _git("log", "-1", "--format=%h%n%s", rev, "--").split("\n", 1)
                head = _git("log", "-1", "--format=%h") + " + working tree"
                self.out(
                    measure="revision", against=rev, rev_commit=commit, rev_subject=subject, ours_head=head
                )
                tree = export_baseline(rev, tmp / "tree")
                homes = {side: tmp / f"home-{side}" for side in ("ours", "rev")}
                for home in homes.values():
                    home.mkdir()
                    register_models(home=home, names=(TINY,))
                _check_code(tree, self.env(home=homes["rev"], tree=tree))
                servers = {
                    "ours": stack.enter_context(
                        self.server("mms", max_batch_size=64, name=f"ours vs {rev}", home=homes["ours"])
                    ),
                    "rev": stack.enter_context(
                        self.server(
                            "mms", max_batch_size=64, name=f"{rev} vs ours", home=homes["rev"], tree=tree
                        )
                    ),
                }
                for port_pid in servers.values():  # warm-up, unreported: batch shapes, connections
                    self.ab_load(port_pid, prime=True)
                for pair in range(a.revision_pairs):
                    order = ("rev", "ours") if pair % 2 == 0 else ("ours", "rev")
                    line: dict = {"measure": "revision_pair", "against": rev, "pair": pair,
                                  "order": list(order), "duration_s": a.revision_duration}  # fmt: skip
                    for side in order:
                        try:
                            line[side] = self.ab_load(servers[side])
                        except (subprocess.SubprocessError, ValueError, KeyError) as exc:
                            stderr = getattr(exc, "stderr", None) or ""
                            line[side] = {"error": f"{type(exc).__name__}: {exc} {stderr}"[-500:]}
                    if all("error" not in line[side] for side in order):
                        line |= pair_ratios(line["ours"], line["rev"])
                    self.out(**line)
        except Exception as exc:  # noqa: BLE001 - recorded: the rest of the run's data must survive
            self.out(measure="revision_error", against=rev, error=f"{type(exc).__name__}: {exc}"[-3000:])

    def ab_load(self, port_pid: tuple[int, int], *, prime: bool = False) -> dict:
        """One side of a pair: 1 client then 32 on the same load generator (the sweeps' body, path
        and warm-up); the figures the ratios need. ``prime``: a warm-up at 32 clients, nothing kept."""
        port, pid = port_pid
        a = self.args
        duration = 0.05 if prime else a.revision_duration
        levels = REVISION_CLIENTS[-1:] if prime else REVISION_CLIENTS
        warmup = a.prime if prime else a.warmup
        argv = [sys.executable, "-m", "bench._loadgen", "--port", str(port), "--path",
                f"/v1/models/{TINY}/predict", "--body", str(self.bodies["inputs"]), "--warmup", str(warmup),
                "--duration", str(duration), "--concurrency", ",".join(map(str, levels)),
                "--watch-pid", str(pid)]  # fmt: skip
        limit = (a.prime + a.warmup + duration) * len(levels) + 120
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=True, timeout=limit)
        if prime:
            return {}
        one, many = (json.loads(x) for x in done.stdout.splitlines()[-2:])
        return {
            "p50_ms": one["p50_ms"], "p99_ms": one["p99_ms"], "rps_1": one["rps"], "rps": many["rps"],
            "p50_ms_32": many["p50_ms"], "p99_ms_32": many["p99_ms"], "server_cores_32": many["server_cores"],
            "non_200": _sum_counts([one["non_200"], many["non_200"]]),
        }  # fmt: skip


def _git(*args: str) -> str:
    """A read-only git command's output; RuntimeError with git's message if it fails (a bad REV)."""
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def _check_code(tree: Path, env: dict) -> None:
    """Raise unless a process started as REV's server is (``env``, ``tree`` as working directory)
    imports REV's modules, not this tree's editable install."""
    names = ("bench.serving", "mms_core", "infra")
    code = f"import importlib.util as u\nfor n in {names!r}:\n    print(u.find_spec(n).origin)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    origins = [Path(o).resolve() for o in done.stdout.splitlines()]
    if (
        done.returncode
        or len(origins) != len(names)
        or not all(o.is_relative_to(tree.resolve()) for o in origins)
    ):
        raise RuntimeError(f"REV's tree would not run its own code: {done.stdout} {done.stderr[-1000:]}")


def measure(bench: Bench) -> list[dict]:
    from sklearn.datasets import load_digits

    a = bench.args
    t0 = time.perf_counter()
    uri = register_models(home=bench.home)
    bench.out(measure="setup_s", value=round(time.perf_counter() - t0, 1), what="train + register 2 models")
    row = load_digits().data[0].astype(np.float32)
    bench.write_bodies(row)
    for model in (TINY, HEAVY):
        bench.out(measure="direct", **direct_latency(tracking_uri=uri, name=model, row=row, seconds=2))
    for model in (TINY, HEAVY):
        for mbs in (64, 1):
            with bench.server("mms", model=model, max_batch_size=mbs, name="mms") as srv:
                bench.sweep(
                    srv, server="mms", model=model, max_batch_size=mbs, endpoint="predict", levels=a.levels
                )
                if model == TINY and mbs == 64:
                    bench.sweep(srv, server="mms", max_batch_size=mbs, endpoint="invocations", levels=a.short)
                    # last on this server: malformed requests must not touch the figures above
                    bench.mixed(srv, expect=expected_predictions(tracking_uri=uri, name=TINY, row=row))
    for workers in a.mlflow_workers:
        with bench.server("mlflow", workers=workers, name=f"mlflow-w{workers}") as srv:
            bench.sweep(
                srv, server=f"mlflow-w{workers}", max_batch_size=None, endpoint="invocations", levels=a.short
            )
    with bench.server("inprocess", name="inprocess") as srv:
        bench.sweep(srv, server="inprocess", max_batch_size=None, endpoint="predict", levels=a.short)
    if a.shipped:
        with bench.server("shipped", max_batch_size=64, name="mms serve (CLI)") as srv:
            bench.sweep(srv, server="mms serve (CLI)", max_batch_size=64, endpoint="predict", levels=[1, 16])
    bench.revision()  # last: every other server has stopped; it records its failures, never raises
    return bench.lines + summarize(bench.lines)


def measure_mixed(bench: Bench) -> list[dict]:
    """``--mixed-only``: the models, our server (digits MLP, batching 64) and the mixed pairs."""
    from sklearn.datasets import load_digits

    uri = register_models(home=bench.home)
    row = load_digits().data[0].astype(np.float32)
    bench.write_bodies(row)
    with bench.server("mms", model=TINY, max_batch_size=64, name="mms") as srv:
        bench.sweep(srv, server="mms", max_batch_size=64, endpoint="predict", levels=[1, MIXED_CLIENTS])
        bench.mixed(srv, expect=expected_predictions(tracking_uri=uri, name=TINY, row=row))
    return bench.lines + mixed_summary(bench.lines)


def measure_revision(bench: Bench) -> list[dict]:
    """``--revision-only``: ours against ``--against REV``, nothing else."""
    from sklearn.datasets import load_digits

    bench.write_bodies(load_digits().data[0].astype(np.float32))
    bench.revision()
    return bench.lines + revision_summary(bench.lines)


# ---- summaries ----------------------------------------------------------------------------------
def _loads(lines: list[dict], **match: object) -> list[dict]:
    return [x for x in lines if x.get("measure") == "load" and all(x.get(k) == v for k, v in match.items())]


def best_under(levels: list[dict], slo_ms: float) -> dict | None:
    """The level with the most requests/s among those with p99 <= ``slo_ms`` and only 200s."""
    fit = [lv for lv in levels if lv["p99_ms"] <= slo_ms and not lv["non_200"]]
    return max(fit, key=lambda lv: lv["rps"]) if fit else None


def _brief(level: dict | None) -> dict | None:
    keys = ("concurrency", "rps", "p50_ms", "p99_ms", "server_cores", "server_main_cores", "loadgen_cores")
    return {k: level[k] for k in keys} if level else None


def summarize(lines: list[dict]) -> list[dict]:
    """The figures of issue 3 from the load lines, each also printed as a JSON line."""
    out: list[dict] = []
    direct = next(x for x in lines if x.get("measure") == "direct" and x["model"] == TINY)
    for server in ("mms", "inprocess", "mlflow-w1", "mms serve (CLI)"):
        for s in _loads(lines, server=server, model=TINY, concurrency=1)[:1]:
            out.append(emit(
                summary="added_latency", server=server, endpoint=s["endpoint"], payload=s["payload"],
                p50_ms=s["p50_ms"], p99_ms=s["p99_ms"], direct_p50_ms=direct["p50_ms"],
                direct_p99_ms=direct["p99_ms"], added_p50_ms=round(s["p50_ms"] - direct["p50_ms"], 3),
                added_p99_ms=round(s["p99_ms"] - direct["p99_ms"], 3),
                anchor="Ray Serve adds 1-2 ms; TorchServe ~3 ms (p50 4 ms vs 1 ms model)",
            ))  # fmt: skip
    peak = max(_loads(lines, server="mms", model=TINY, max_batch_size=64), key=lambda x: x["rps"])
    out.append(emit(
        summary="throughput_per_core", model=TINY, endpoint=peak["endpoint"], **_brief(peak),
        rps_per_server_core=round(peak["rps"] / peak["server_cores"]),
        rps_per_box_core=round(peak["rps"] / os.cpu_count()),
        anchor="Ray Serve: 3-4k QPS of no-op requests on 8 cores (~375-500 per core)",
    ))  # fmt: skip
    for model in (TINY, HEAVY):
        on = _loads(lines, server="mms", model=model, max_batch_size=64, endpoint="predict")
        off = _loads(lines, server="mms", model=model, max_batch_size=1, endpoint="predict")
        pairs = {slo: (best_under(on, slo), best_under(off, slo)) for slo in SLO_MS}
        ratios = {
            f"p99<={s}ms": round(a["rps"] / b["rps"], 2) if a and b else None for s, (a, b) in pairs.items()
        }
        out.append(emit(
            summary="batching_gain", model=model, slo_p99_ms=HEADLINE_SLO_MS,
            batched=_brief(pairs[HEADLINE_SLO_MS][0]), unbatched=_brief(pairs[HEADLINE_SLO_MS][1]),
            ratio=ratios[f"p99<={HEADLINE_SLO_MS}ms"], ratio_by_slo=ratios,
            ratio_at_peak=round(max(x["rps"] for x in on) / max(x["rps"] for x in off), 2),
            anchor="Triton dynamic batching: 3.7x",
        ))  # fmt: skip
    ours = {x["concurrency"]: x for x in _loads(lines, server="mms", endpoint="invocations")}
    for server in sorted({x["server"] for x in _loads(lines) if x["server"].startswith("mlflow")}):
        theirs = {x["concurrency"]: x for x in _loads(lines, server=server)}
        o, t = max(ours.values(), key=lambda x: x["rps"]), max(theirs.values(), key=lambda x: x["rps"])
        by_level = {c: round(ours[c]["rps"] / x["rps"], 2) for c, x in theirs.items() if c in ours}
        o_slo, t_slo = (best_under(list(d.values()), HEADLINE_SLO_MS) for d in (ours, theirs))
        out.append(emit(
            summary="vs_mlflow", mlflow=server, payload="dataframe_split", ours_peak=_brief(o),
            mlflow_peak=_brief(t), ratio_peak_rps=round(o["rps"] / t["rps"], 2),
            slo_p99_ms=HEADLINE_SLO_MS, ours_at_slo=_brief(o_slo), mlflow_at_slo=_brief(t_slo),
            ratio_at_slo=round(o_slo["rps"] / t_slo["rps"], 2) if o_slo and t_slo else None,
            ratio_by_concurrency=by_level,
            goal=3.0, meets_goal=o["rps"] / t["rps"] >= 3.0,
        ))  # fmt: skip
    return out + mixed_summary(lines) + revision_summary(lines)


def _median(xs: list[float]) -> float | None:
    return round(float(np.median(xs)), 3) if xs else None


def _sum_counts(dicts: list[dict]) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))


def mixed_summary(lines: list[dict]) -> list[dict]:
    """The mixed-traffic figures from the ``mixed_load`` lines (none if there are none): per pair
    the ratios mixed/clean of the good requests' rps and p99, their medians and ranges; the
    malformed requests' answers; the failures (5xx, timeouts, dropped connections, wrong or non-200
    answers to good requests) in either condition. Requests still in flight when a window closed
    (``after_window``) are left out of rps and p99 but not out of the answers and failures."""
    runs = [x for x in lines if x.get("measure") == "mixed_load"]
    if not runs:
        return []
    pairs: dict[int, dict[str, dict]] = {}
    for r in runs:
        pairs.setdefault(r["pair"], {})[r["condition"]] = r
    rps_ratios, p99_ratios = [], []
    for p in pairs.values():
        c, m = p.get("clean"), p.get("mixed")
        if not c or not m or "error" in c or "error" in m:
            continue
        if c["rps"] > 0:
            rps_ratios.append(round(m["rps"] / c["rps"], 3))
        if c["p99_ms"] > 0 and np.isfinite(m["p99_ms"]):  # NaN p99: no good answer in the window
            p99_ratios.append(round(m["p99_ms"] / c["p99_ms"], 3))
    ok = [r for r in runs if "error" not in r]
    by_cond = {cond: [r for r in ok if r["condition"] == cond] for cond in ("clean", "mixed")}
    bad = [r["bad"] for r in by_cond["mixed"] if "bad" in r]
    bad_statuses = _sum_counts([b["statuses"] for b in bad])
    by_kind: dict[str, dict[str, int]] = {}
    for b in bad:
        for kind, counts in b["by_kind"].items():
            by_kind[kind] = _sum_counts([by_kind.get(kind, {}), counts])
    late = [r.get("after_window", {}) for r in ok]  # requests still in flight when a window closed
    good_failures = _sum_counts(
        [r["non_200"] for r in ok]
        + [{"wrong": r["wrong"]} for r in ok if r.get("wrong")]
        + [{k: v for k, v in x.get("good", {}).items() if k != "ok"} for x in late]
    )
    for x in late:
        for kind, counts in x.items():
            if kind != "good":
                by_kind[kind] = _sum_counts([by_kind.get(kind, {}), counts])
                bad_statuses = _sum_counts([bad_statuses, counts])
    by_kind = {k: by_kind[k] for k in KINDS if k in by_kind}
    server_errors = sum(v for k, v in _sum_counts([good_failures, bad_statuses]).items() if k[:1] == "5")
    bad_failures = {k: v for k, v in bad_statuses.items() if k.startswith("5") or not k[:1].isdigit()}
    rps_ratio, p99_ratio = _median(rps_ratios), _median(p99_ratios)
    complete = len(rps_ratios) == len(pairs) and len(p99_ratios) == len(pairs) and len(ok) == len(runs)
    meets = (
        complete and rps_ratio >= MIXED_GOALS["rps_ratio"] and p99_ratio <= MIXED_GOALS["p99_ratio"]
        and server_errors == 0 and not good_failures and not bad_failures
    )  # fmt: skip

    def cond(name: str) -> dict:
        """Medians over the condition's windows (a window without good answers has NaN latencies)."""
        rs = by_cond[name]
        med = {k: _median([r[k] for r in rs if np.isfinite(r[k])]) for k in ("rps", "p50_ms", "p99_ms")}
        return med | {"windows": len(rs)}

    failed = [f"pair {r['pair']} {r['condition']}: {r['error'][:200]}" for r in runs if "error" in r]
    spread = {  # min and max of the per-pair ratios
        "rps_ratio_range": [min(rps_ratios), max(rps_ratios)] if rps_ratios else None,
        "p99_ratio_range": [min(p99_ratios), max(p99_ratios)] if p99_ratios else None,
    }

    return [emit(
        summary="mixed_traffic", server="mms", model=TINY, endpoint="predict", concurrency=MIXED_CLIENTS,
        bad_fraction=BAD_FRACTION, pairs=len(pairs), duration_s=runs[0].get("duration_s"),
        clean=cond("clean"), mixed=cond("mixed"), rps_ratio=rps_ratio, p99_ratio=p99_ratio, **spread,
        rps_ratios=rps_ratios, p99_ratios=p99_ratios,
        bad_requests=sum(bad_statuses.values()), bad_statuses=bad_statuses, bad_by_kind=by_kind,
        bad_failures=bad_failures, good_failures=good_failures, server_errors=server_errors,
        failed_windows=failed, goals=MIXED_GOALS, meets_goal=bool(meets),
    )]  # fmt: skip


def pair_ratios(ours: dict, rev: dict) -> dict[str, float | None]:
    """One pair's ratios ours/REV: 1-client p50 and p99, 32-client rps (None where REV's is 0 or
    NaN: no answer in its window)."""

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 3) if b and np.isfinite(a) and np.isfinite(b) else None

    return {
        "p50_ratio": ratio(ours["p50_ms"], rev["p50_ms"]),
        "p99_ratio": ratio(ours["p99_ms"], rev["p99_ms"]),
        "rps_ratio": ratio(ours["rps"], rev["rps"]),
    }


def revision_summary(lines: list[dict]) -> list[dict]:
    """The A/B against REV from the ``revision*`` lines (none if there are none): the medians of the
    per-pair ratios ours/REV with their ranges, each side's median figures, non-200 answers, what
    failed, and the goals (p50 <= 1.1x, rps >= 0.9x, every pair measured, ours answering only 200s)."""
    head = next((x for x in lines if x.get("measure") == "revision"), None)
    pairs = [x for x in lines if x.get("measure") == "revision_pair"]
    errors = [x for x in lines if x.get("measure") == "revision_error"]
    if head is None and not pairs and not errors:
        return []
    head = head or {}
    sides = ("ours", "rev")
    good = [p for p in pairs if all("error" not in p.get(s, {"error": "missing"}) for s in sides)]
    per_pair = [pair_ratios(p["ours"], p["rev"]) for p in good]
    ratios: dict = {}
    for key in ("p50_ratio", "p99_ratio", "rps_ratio"):
        xs = [r[key] for r in per_pair if r[key] is not None]
        ratios |= {key: _median(xs), f"{key}_range": [min(xs), max(xs)] if xs else None, f"{key}s": xs}
    figures = {
        side: {k: _median([p[side][k] for p in good]) for k in ("p50_ms", "p99_ms", "rps")} for side in sides
    }
    non_200 = {side: _sum_counts([p[side]["non_200"] for p in good]) for side in sides}
    failed = [
        f"pair {p['pair']} {s}: {p[s]['error'][:200]}"
        for p in pairs
        for s in sides
        if "error" in p.get(s, {})
    ]
    failed += [e["error"][-500:] for e in errors]
    complete = bool(pairs) and not errors and all(len(ratios[f"{k}s"]) == len(pairs) for k in REVISION_GOALS)
    meets = (
        complete and ratios["p50_ratio"] <= REVISION_GOALS["p50_ratio"]
        and ratios["rps_ratio"] >= REVISION_GOALS["rps_ratio"] and not non_200["ours"]
    )  # fmt: skip
    rev = head.get("against") or next((x["against"] for x in pairs + errors), None)
    return [emit(
        summary="revision_ab", rev=rev, rev_commit=head.get("rev_commit"),
        rev_subject=head.get("rev_subject"), ours_head=head.get("ours_head"), server="mms", model=TINY,
        endpoint="predict", payload="inputs", max_batch_size=64, clients=list(REVISION_CLIENTS),
        pairs=len(pairs), duration_s=pairs[0]["duration_s"] if pairs else None, **ratios,
        ours_figures=figures["ours"], rev_figures=figures["rev"], non_200=non_200, failed=failed,
        goals=REVISION_GOALS, meets_goal=bool(meets),
    )]  # fmt: skip


def plot(lines: list[dict]) -> Path:
    """Left: requests/s against p99 over each concurrency sweep; right: latency CDF, 1 client."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    curves = {
        "ours, digits MLP, batching (64)": ("mms", TINY, 64, "predict", "#2a7", "-"),
        "ours, digits MLP, no batching": ("mms", TINY, 1, "predict", "#2a7", ":"),
        "ours, MLP 3x2048, batching (64)": ("mms", HEAVY, 64, "predict", "#27c", "-"),
        "ours, MLP 3x2048, no batching": ("mms", HEAVY, 1, "predict", "#27c", ":"),
        "ours, digits, /invocations": ("mms", TINY, 64, "invocations", "#2a7", "--"),
        "mlflow models serve -w 1": ("mlflow-w1", TINY, None, "invocations", "#c55", "--"),
        "mlflow models serve -w 2": ("mlflow-w2", TINY, None, "invocations", "#c55", "-."),
    }
    for label, (server, model, mbs, endpoint, color, style) in curves.items():
        pts = sorted(_loads(lines, server=server, model=model, max_batch_size=mbs, endpoint=endpoint),
                     key=lambda x: x["concurrency"])  # fmt: skip
        if pts:
            left.plot([p["p99_ms"] for p in pts], [p["rps"] for p in pts], style, marker="o", ms=3,
                      color=color, label=label)  # fmt: skip
    left.axvline(HEADLINE_SLO_MS, color="k", lw=0.8, ls=":", label=f"SLO: p99 {HEADLINE_SLO_MS} ms")
    left.set(xscale="log", xlabel="p99 latency, ms (log)", ylabel="requests/s (1 row each)",
             title="Closed loop, 1..64 concurrent clients")  # fmt: skip
    left.legend(fontsize=7)
    seqs = {
        "ours (/v1 predict)": ("mms", 64, "#2a7"),
        "in-process FastAPI, no Dask hop": ("inprocess", None, "#999"),
        "mlflow models serve -w 1 (/invocations)": ("mlflow-w1", None, "#c55"),
        "mms serve (CLI)": ("mms serve (CLI)", 64, "#a5c"),
    }
    for label, (server, mbs, color) in seqs.items():
        seq = [x for x in _loads(lines, server=server, model=TINY, max_batch_size=mbs) if "cdf_ms" in x]
        for x in seq[:1]:
            right.plot(x["cdf_ms"], np.linspace(0, 1, len(x["cdf_ms"])), color=color, label=label)
    direct = next(x for x in lines if x.get("measure") == "direct" and x["model"] == TINY)
    right.axvline(
        direct["p50_ms"], color="k", lw=0.8, ls=":", label=f"model alone: {direct['p50_ms']:.3f} ms"
    )
    right.set(xscale="log", xlabel="latency, ms (log)", ylabel="fraction of requests",
              title="1 client, sequential requests, digits MLP")  # fmt: skip
    right.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Online serving, {lines[0]['machine']}, {lines[0]['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(PNG, dpi=100)
    plt.close(fig)
    return PNG


def _env_line(args: argparse.Namespace) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "distributed", "mlflow", "uvicorn", "fastapi", "httptools", "uvloop"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    command = "python -m bench.serving" + (" --quick" if args.quick else "")
    if args.mixed_only:
        command += f" --mixed-only --mixed-pairs {args.mixed_pairs} --mixed-duration {args.mixed_duration:g}"
    if args.revision_only:
        command += " --revision-only"
    if args.revision_only or args.against != DEFAULT_REV:
        command += f" --against {args.against}"
    if args.revision_only:
        command += f" --revision-pairs {args.revision_pairs} --revision-duration {args.revision_duration:g}"
    return {"measure": "env", "command": command, "platform": platform.platform(), "versions": found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run (~1.5 min): short windows, fewer levels"
    )
    parser.add_argument("--plot-only", action="store_true", help=f"redraw {PNG.name} from {DATA.name}")
    parser.add_argument(
        "--mixed-only", action="store_true", help="only the mixed-traffic pairs (clean vs 5%% malformed)"
    )
    parser.add_argument("--mixed-pairs", type=int, help="clean/mixed pairs (default: 5; --quick: 3)")
    parser.add_argument("--mixed-duration", type=float, help="seconds per window (default: 2; --quick: 1)")
    parser.add_argument(
        "--against", default=DEFAULT_REV, metavar="REV",
        help=f"the revision whose server ours is compared with (default: {DEFAULT_REV}, see above)",
    )  # fmt: skip
    parser.add_argument("--revision-only", action="store_true", help="only the A/B against --against REV")
    parser.add_argument("--revision-pairs", type=int, help="REV/ours pairs (default: 8; --quick: 4)")
    parser.add_argument("--revision-duration", type=float, help="seconds per window (default: 2; --quick: 1)")
    parser.add_argument("--serve", metavar="MODEL", help=argparse.SUPPRESS)  # child process: our server
    parser.add_argument("--serve-inprocess", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve or args.serve_inprocess:
        serve = serve_mms if args.serve else serve_inprocess
        serve(model=args.serve or args.serve_inprocess, port=args.port)
        return
    if args.plot_only:
        print(plot([json.loads(x) for x in DATA.read_text().splitlines() if x.strip()]))
        return
    q = args.quick
    args.levels, args.short = ([1, 8, 32], [1, 16]) if q else ([1, 2, 4, 8, 16, 32, 64], [1, 4, 16, 64])
    args.duration, args.warmup, args.seq_duration, args.prime = (1, 0.3, 1.5, 0.5) if q else (2, 0.5, 4, 1.5)
    args.mlflow_workers, args.shipped = ([1], False) if q else ([1, 2], True)
    args.mixed_pairs = args.mixed_pairs or (3 if q else 5)
    args.mixed_duration = args.mixed_duration or (1.0 if q else 2.0)
    args.revision_pairs = args.revision_pairs or (4 if q else 8)
    args.revision_duration = args.revision_duration or (1.0 if q else 2.0)
    if args.mixed_only and args.revision_only:
        parser.error("--mixed-only and --revision-only: one at a time")
    env = emit(**_env_line(args))
    run = measure_mixed if args.mixed_only else measure_revision if args.revision_only else measure
    with tempfile.TemporaryDirectory(prefix="mms-bench-serving-") as tmp:
        lines = run(Bench(args=args, tmp=Path(tmp)))
    if not q and not args.mixed_only and not args.revision_only:
        plot([env, *lines])


if __name__ == "__main__":
    main()
