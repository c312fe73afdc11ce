"""GPT training throughput, side by side: a plain PyTorch loop vs the same model and batch through MMS.

    python -m bench.gpt_throughput [--size gpt2 --seq 1024 --batch 16 --steps 300 --epochs 2]
                                   [--mms auto|cli|ddp|both|none] [--device auto|cpu|cuda]

The issue's goal: GPT-2-small, seq 1024, >= 420k tokens/s through `mms run` on one H100 (plain
PyTorch with a naive loop did 388k, llm.c ~463k; design brief, section 4). One run measures:

(a) ``plain``: a plain training loop in this process: the zoo's GPT (same config as
    examples/gpt2-small.yaml: byte tokens, embedding padded to 50304 rows), random token ids
    generated on the device (throughput does not depend on the ids' values), AdamW (fused on
    CUDA), bf16 autocast and ``torch.compile(model)`` on CUDA, ``--batch`` x ``--seq`` per step.
    ``--warmup`` steps (compiling included) are run first and not timed; then ``--steps`` steps
    between two device synchronisations give tokens/s and MFU (mms_core.training.mfu).
(b) ``mms``: the same model and batch through our training path, on pystdlib token windows
    made by ingest (load_source + snapshot) and ``preprocess_and_shard``, two ways:
    ``cli``: ``mms run examples/gpt2-small.yaml --set ...`` as a subprocess on a fresh
    MMS_HOME (temp dir; PREFECT_* and the MMS_* server variables dropped, so the CLI sets
    PREFECT_HOME etc. itself and uses embedded servers; MMS_PEAK_TFLOPS stays), tokens/s read
    back from the MLflow run's ``tokens_per_s`` history (one point per epoch, logged by
    tasks/training_events.py); this is literally "through `mms run`".
    ``ddp``: the same spec (the same YAML and --set overrides through ``load_spec``) as the
    TrainJob the flow's train task builds, run by ``mms_core.training.ddp.run_ddp`` on the cluster
    ``infra.cluster.dask_client`` builds (LocalCUDACluster when CUDA is present); tokens/s is
    rank 0's last ``EpochMetrics.tokens_per_s``; ``cluster`` in its line names the cluster class.
    The figure is the LAST epoch's: epoch 1 includes compiling. The data size is chosen so that an
    epoch has exactly ``--steps`` full batches (``rows_for_steps``): the timed windows of both
    paths are equally long and no partial last batch triggers a recompile; ``--max-bytes`` sets
    the corpus size by hand instead.

Why both mms ways, and ``--mms auto``: ``cli`` is what the issue names, but it needs Prefect and
MLflow (~60 packages with their dependencies, 150+ MB installed), which the GPU machine lacks and
cannot download, while ``ddp`` needs only dask/distributed/dask-cuda and pydantic(-settings),
14 MB of wheels. The training itself is the same code either way: ``mms run``'s train task
calls ``run_strategy`` -> ``run_ddp`` with this TrainJob on the same cluster, and the flow's
Prefect/MLflow work happens in the flow process between epochs (MLflow metrics per epoch), not
inside the timed epoch. So ``auto`` runs ``cli`` where prefect and mlflow import, else ``ddp``;
``both`` runs both (the CPU smoke test does, to check they agree).

Output: JSON lines on stdout, each also appended to ``--out`` (bench/data/gpt_throughput.jsonl): one per path
(``plain``, ``mms``), then ``summary`` with ratio mms/plain and, on CUDA, each figure over the
anchors 388k (plain PyTorch), 420k (goal), 463k (llm.c); ``meets_goal`` says >= 420k. Progress
goes to stderr.

GPU (the ``run`` tool, one H100; the image has CUDA torch but no dask or pydantic). Here, once,
in the repo root (23 wheels, 14 MB, into ./.whl, which the script adds to .git/info/exclude):

    bash ../shared/tools/gpu-wheels.sh pydantic==2.14.3 pydantic-core==2.50.4 \\
        pydantic-settings==2.16.3 annotated-types==0.8.0 typing-inspection==0.4.5 python-dotenv==1.2.4

then ``run`` with carry [".whl"], timeout_s 600 and this command, as ONE line (about 4-6
minutes: two compiles, 300 timed steps per path, two 1.5 GB epoch-end checkpoints):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;
    export PYTHONUNBUFFERED=1 MMS_WORKER_MEMORY=32GiB; nvidia-smi -L; set -o pipefail;
    python3 -m bench.gpt_throughput --device cuda --out $OUT/gpt_throughput.jsonl 2>&1
    | tee $OUT/gpt_throughput.log

``--mms auto`` picks ``ddp`` there. MMS_WORKER_MEMORY only matters if dask-cuda fails to import
and infra.cluster falls back to a LocalCluster (4 GiB per worker is too little for a 124M model's
checkpoint; the mms line's ``cluster`` then says LocalCluster, not LocalCUDACluster). Afterwards,
append the returned gpt_throughput.jsonl to bench/data/gpt_throughput.jsonl and run ``python -m
bench.report``: bench/RESULTS.md's GPT section then tabulates its lines (plain and mms tokens/s
and MFU, ratio mms/plain, each over 388k/420k/463k, >= 420k, the device and date), labelled as a
device-tool run (bench/report_gpu.py quotes the GPU command above from this docstring).

CPU smoke test (every path but the CUDA-only options; ~1-1.5 minutes on 2 cores):

    python -m bench.gpt_throughput --size tiny --seq 64 --batch 8 --steps 30 --warmup 5 \\
        --epochs 2 --mms both --device cpu --out /tmp/gpt_throughput.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "bench" / "data" / "gpt_throughput.jsonl"
SPEC = "examples/gpt2-small.yaml"
BENCH = "gpt_throughput"
VOCAB = 256  # byte tokens, as the spec's builtin://pystdlib?tokenizer=byte
VAL_FRACTION = TEST_FRACTION = 0.01  # as examples/gpt2-small.yaml
LR, WEIGHT_DECAY = 6e-4, 0.1  # as examples/gpt2-small.yaml
CPU_THREADS = 1  # the plain loop's torch threads on a CPU: what a rank gets (TrainJob.num_threads)
POOL = 32  # distinct random batches the plain loop cycles through
ANCHORS = {"plain_pytorch_388k": 388e3, "goal_420k": 420e3, "llm_c_463k": 463e3}
ANCHOR_SHAPE = ("gpt2", 1024, 16)  # the anchors' model, sequence length and batch
EXPERIMENT = "bench-gpt-throughput"
# Dropped for `mms run` (as tests/flows/conftest.py does): embedded servers on the fresh MMS_HOME.
# MMS_PEAK_TFLOPS and the like stay.
FRESH_HOME_UNSET = ("MMS_HOME", "MMS_MLFLOW_URI", "MMS_DASK_ADDRESS", "MMS_STORAGE_URI")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="gpt2", help="Zoo GPT size (default: %(default)s).")
    p.add_argument("--seq", type=int, default=1024, help="Tokens per row (default: %(default)s).")
    p.add_argument("--batch", type=int, default=16, help="Rows per step (default: %(default)s).")
    p.add_argument("--steps", type=int, default=300, help="Timed plain steps; steps per mms epoch.")
    p.add_argument("--warmup", type=int, default=20, help="Untimed plain steps first (default: %(default)s).")
    p.add_argument("--epochs", type=int, default=2, help="mms epochs; the last is reported (default: 2).")
    p.add_argument("--max-bytes", type=int, default=None, help="Corpus bytes (default: --steps per epoch).")
    p.add_argument("--vocab-size", type=int, default=None, help="Embedding rows (default: 50304 for gpt2*).")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--mms", choices=["auto", "cli", "ddp", "both", "none"], default="auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="On CUDA.")
    p.add_argument("--out", type=Path, default=DATA, help="JSON lines appended here (default: %(default)s).")
    p.add_argument("--timeout", type=float, default=1200, help="Seconds allowed for `mms run`.")
    return p.parse_args(argv)


def resolve_device(choice: str) -> bool:
    """True for CUDA. ``cpu`` hides the GPUs from this process, the Dask workers and `mms run`."""
    if choice == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    return choice != "cpu" and torch.cuda.is_available()


def mms_ways(choice: str) -> list[str]:
    if choice == "auto":
        has_flow_deps = all(importlib.util.find_spec(m) for m in ("prefect", "mlflow"))
        return ["cli"] if has_flow_deps else ["ddp"]
    return {"both": ["ddp", "cli"], "none": []}.get(choice, [choice])


def model_kwargs(args: argparse.Namespace, *, compile: bool) -> dict[str, Any]:
    vocab = args.vocab_size or (50304 if args.size.startswith("gpt2") else VOCAB)
    return {"size": args.size, "vocab_size": vocab, "compile": compile}


def rows_for_steps(*, steps: int, batch: int) -> int:
    """Rows R whose training split (after shard.py's rounding of val/test) is exactly steps*batch."""
    target = steps * batch
    for rows in range(target, 2 * target + 100):
        held_out = max(1, round(rows * TEST_FRACTION)) + max(1, round(rows * VAL_FRACTION))
        if rows - held_out == target:
            return rows
    raise AssertionError("unreachable: the training split grows by at most one row per row")


def spec_overrides(args: argparse.Namespace, *, cuda: bool) -> list[str]:
    """--set overrides of examples/gpt2-small.yaml shared by both mms ways."""
    max_bytes = args.max_bytes or rows_for_steps(steps=args.steps, batch=args.batch) * args.seq + 1
    kw = model_kwargs(args, compile=cuda and args.compile)
    return [
        f"data.source=builtin://pystdlib?seq_len={args.seq}&max_bytes={max_bytes}&tokenizer=byte",
        "preprocess.n_shards=1",
        f"preprocess.val_fraction={VAL_FRACTION}",
        f"preprocess.test_fraction={TEST_FRACTION}",
        f"model.kwargs.size={kw['size']}",
        f"model.kwargs.vocab_size={kw['vocab_size']}",
        f"model.kwargs.compile={str(kw['compile']).lower()}",
        f"training.epochs={args.epochs}",
        f"training.batch_size={args.batch}",
        f"training.precision={'bf16' if cuda else 'fp32'}",
        "training.world_size=1",
        "training.checkpoint_every=0",
        "training.resume=false",
        "evaluate.min_accuracy=0.0",
        "compress.quantize=false",
        "registry.model_name=gpt-throughput",
        f"registry.experiment={EXPERIMENT}",
    ]


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def run_plain(args: argparse.Namespace, *, cuda: bool) -> dict[str, Any]:
    """The plain loop; see the module docstring, (a)."""
    import torch

    from mms_core.models import ModelSpec, build_model
    from mms_core.training.mfu import mfu

    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    spec = ModelSpec(name="gpt", kwargs=model_kwargs(args, compile=False))
    model = build_model(spec=spec, in_features=args.seq, n_classes=VOCAB).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=cuda)
    net = torch.compile(model) if cuda and args.compile else model
    pool = torch.randint(0, VOCAB, (POOL, args.batch, args.seq + 1), device=device)

    def step(i: int) -> torch.Tensor:
        tokens = pool[i % POOL]
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        with autocast:
            _, loss = net(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    warmup_s, _ = _timed(step, range(args.warmup), cuda=cuda)
    seconds, loss = _timed(step, range(args.steps), cuda=cuda)
    tps = args.steps * args.batch * args.seq / seconds
    row = {
        "path": "plain",
        "tokens_per_s": round(tps, 1),
        "mfu": _round(mfu(flops_per_token=model.flops_per_token(), tokens_per_s=tps)),
        "step_ms": round(1e3 * seconds / args.steps, 3),
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "warmup_s": round(warmup_s, 2),
        "final_loss": round(loss.item(), 4),
        "params": model.num_params(matmul_only=False),
        "flops_per_token": model.flops_per_token(),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }
    return row


def _timed(step: Any, indices: range, *, cuda: bool) -> tuple[float, Any]:
    """Seconds for ``step(i)`` over ``indices``, between device synchronisations; the last loss."""
    loss = None
    t0 = time.perf_counter()
    for i in indices:
        loss = step(i)
    _sync(cuda)
    return time.perf_counter() - t0, loss


def free_memory(cuda: bool) -> None:
    """Drop what the plain loop left (compiled graphs, cached blocks): the mms worker shares the GPU."""
    import torch

    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def prepare_shards(*, spec: Any, root: str) -> str:
    """Ingest + shard as the flow's tasks do (steps.ingest without its MLflow import); manifest URI."""
    from mms_core.data.ingest import load_source, snapshot
    from mms_core.data.shard import preprocess_and_shard

    raw = snapshot(df=load_source(spec=spec.data), label=spec.data.label, root=root)
    return preprocess_and_shard(
        raw_uri=raw.uri, source_sha256=raw.sha256, label=raw.label, spec=spec.preprocess, root=root
    )


def run_mms_ddp(args: argparse.Namespace, *, cuda: bool, home: Path) -> dict[str, Any]:
    """``run_ddp`` of the spec's TrainJob on ``dask_client(Settings())``; see the docstring, (b)."""
    from infra.cluster import dask_client
    from mms_core.config import Settings
    from mms_core.spec import load_spec
    from mms_core.training.ddp import run_ddp
    from mms_core.training.spec import TrainJob

    spec = load_spec(REPO / SPEC, overrides=spec_overrides(args, cuda=cuda))
    settings = Settings(home=home, dask_address=None)  # embedded cluster, as `mms run` on a fresh home
    t0 = time.perf_counter()
    manifest_uri = prepare_shards(spec=spec, root=settings.storage_root)
    job = TrainJob(
        manifest_uri=manifest_uri,
        model=spec.model,
        train=spec.training,
        output_uri=str(home / "model.safetensors"),
        checkpoint_uri=str(home / "checkpoints"),
    )
    with dask_client(settings) as client:
        cluster = type(client.cluster).__name__ if client.cluster else "scheduler"
        rank0 = run_ddp(client=client, job=job)[0]
    epochs = [_epoch(m.model_dump()) for m in rank0.history]
    wall = time.perf_counter() - t0
    return _mms_row("ddp", epochs=epochs, manifest_uri=manifest_uri, args=args, wall_s=wall) | {
        "cluster": cluster
    }


def mms_command() -> list[str]:
    """The `mms` console script beside this interpreter, else the same app through ``-c``."""
    script = Path(sys.executable).with_name("mms")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from mms_cli.main import app; app()"]


def run_mms_cli(args: argparse.Namespace, *, cuda: bool, home: Path) -> dict[str, Any]:
    """`mms run examples/gpt2-small.yaml --set ...` on a fresh MMS_HOME; see the docstring, (b)."""
    cmd = [*mms_command(), "run", SPEC]
    for item in spec_overrides(args, cuda=cuda):
        cmd += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k not in FRESH_HOME_UNSET and not k.startswith("PREFECT_")}
    env["MMS_HOME"] = str(home)
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout, check=False
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(
            f"mms run failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    epochs, manifest_uri = _mlflow_epochs(home)
    row = _mms_row("cli", epochs=epochs, manifest_uri=manifest_uri, args=args, wall_s=wall)
    return row | {"mms_command": "MMS_HOME=<tmp> mms run " + shlex.join(cmd[cmd.index("run") + 1 :])}


def _mlflow_epochs(home: Path) -> tuple[list[dict[str, Any]], str]:
    """Per-epoch metrics of the only run on ``home``'s MLflow store, and its shard manifest."""
    from mlflow import MlflowClient

    from mms_core.config import Settings

    client = MlflowClient(tracking_uri=Settings(home=home).tracking_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    series: dict[int, dict[str, Any]] = {}
    for key in ("tokens_per_s", "mfu", "train_loss"):
        for m in client.get_metric_history(run.info.run_id, key):
            series.setdefault(m.step, {"epoch": m.step})[key] = m.value
    manifests = sorted((home / "data" / "shards").glob("*/manifest.json"))
    return [_epoch(series[k]) for k in sorted(series)], str(manifests[-1])


def _epoch(m: dict[str, Any]) -> dict[str, Any]:
    return {
        "epoch": m["epoch"],
        "tokens_per_s": round(m["tokens_per_s"], 1),
        "mfu": _round(m.get("mfu")),
        "train_loss": round(m["train_loss"], 4),
    }


def _mms_row(
    via: str, *, epochs: list[dict[str, Any]], manifest_uri: str, args: argparse.Namespace, wall_s: float
) -> dict[str, Any]:
    from mms_core.data.shard import load_manifest
    from mms_core.training.loop import steps_per_epoch

    last = epochs[-1]
    return {
        "path": "mms",
        "via": via,
        "tokens_per_s": last["tokens_per_s"],
        "mfu": last["mfu"],
        "steps_per_epoch": steps_per_epoch(load_manifest(manifest_uri), world_size=1, batch_size=args.batch),
        "epochs": epochs,
        "wall_s": round(wall_s, 1),
    }


def summary(plain: dict, mms: list[dict], *, cuda: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Ratio mms/plain per mms way; on CUDA, every figure over the anchors."""
    figures = {"plain": plain["tokens_per_s"]} | {f"mms_{r['via']}": r["tokens_per_s"] for r in mms}
    row: dict[str, Any] = {"path": "summary", "tokens_per_s": figures}
    row["ratio_mms_plain"] = {r["via"]: round(r["tokens_per_s"] / plain["tokens_per_s"], 3) for r in mms}
    if cuda:
        row["vs_anchors"] = {
            k: {a: round(v / ref, 3) for a, ref in ANCHORS.items()} for k, v in figures.items()
        }
        row["meets_goal"] = {r["via"]: r["tokens_per_s"] >= ANCHORS["goal_420k"] for r in mms}
        row["anchor_shape"] = (args.size, args.seq, args.batch) == ANCHOR_SHAPE
    return row


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def stamp(args: argparse.Namespace, *, cuda: bool) -> dict[str, Any]:
    import torch

    return {
        "bench": BENCH,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.platform()} nproc={len(os.sched_getaffinity(0))}",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "config": {"seq": args.seq, "batch": args.batch, **model_kwargs(args, compile=cuda and args.compile)},
        "command": "python -m bench.gpt_throughput " + shlex.join(sys.argv[1:]),
    }


def emit(row: dict[str, Any], base: dict[str, Any], *, out: Path) -> None:
    """Print one JSON line and append it to ``out`` (bench/data/gpt_throughput.jsonl)."""
    line = json.dumps({**base, **row})
    print(line, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(line + "\n")


def log(msg: str) -> None:
    print(f"[gpt_throughput {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cuda = resolve_device(args.device)
    if not cuda:
        import torch

        torch.set_num_threads(CPU_THREADS)
    base = stamp(args, cuda=cuda)
    log(f"plain loop: {args.warmup} warm-up + {args.steps} timed steps on {base['device']}")
    plain = run_plain(args, cuda=cuda)
    free_memory(cuda)
    emit(plain, base, out=args.out)
    mms = []
    for via in mms_ways(args.mms):
        per_epoch = f"--max-bytes {args.max_bytes}" if args.max_bytes else f"{args.steps} steps"
        log(f"mms ({via}): {args.epochs} epochs of {per_epoch}")
        with tempfile.TemporaryDirectory(prefix=f"mms-bench-gpt-{via}-") as tmp:
            run = run_mms_cli if via == "cli" else run_mms_ddp
            mms.append(run(args, cuda=cuda, home=Path(tmp)))
        emit(mms[-1], base, out=args.out)
    emit(summary(plain, mms, cuda=cuda, args=args), base, out=args.out)


if __name__ == "__main__":
    main()
