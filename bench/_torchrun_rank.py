"""One torchrun rank for ``bench.ddp_overhead``: the reference launcher for the same loop.

torchrun sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; this joins the gloo group with
env:// init, runs :func:`mms_core.training.loop.train_rank` on the job read from ``--job`` and,
on rank 0, writes the RankResult as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from mms_core.training.loop import train_rank
from mms_core.training.spec import RankResult, TrainJob


def run_rank(*, job_path: Path, out_path: Path) -> RankResult:
    """Join the process group from torchrun's environment, train, and write rank 0's result."""
    faulthandler.enable()  # a native abort (e.g. in gloo) then shows the Python stack in torchrun's output
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    job = TrainJob.model_validate_json(job_path.read_text())
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=job.train.timeout_s))
    try:
        result = train_rank(job=job, rank=rank, world_size=world_size)
        dist.barrier()  # tear down together; outside train_rank's timed section
    finally:
        dist.destroy_process_group()
    if rank == 0:
        out_path.write_text(result.model_dump_json())
    return result


def main(argv: list[str] | None = None) -> None:
    """Parse ``--job`` and ``--out`` and run this rank."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--job", type=Path, required=True, help="TrainJob JSON file.")
    parser.add_argument("--out", type=Path, required=True, help="Where rank 0 writes its RankResult JSON.")
    args = parser.parse_args(argv)
    run_rank(job_path=args.job, out_path=args.out)


if __name__ == "__main__":
    main()
