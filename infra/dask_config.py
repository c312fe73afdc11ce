"""Dask settings for clusters that run training, shared by infra.cluster (LocalCluster) and
infra.stack (`dask worker` processes, through a DASK_CONFIG file). Imports nothing heavy: the CLI
loads infra.stack at start-up."""

from __future__ import annotations

import yaml

WORKER_DASK_CONFIG: dict = {
    "distributed": {
        "nanny": {
            # Dask sets MALLOC_TRIM_THRESHOLD_=65536 in workers; any value turns off glibc's adaptive
            # mmap threshold, so every per-step buffer >= 128 KiB is a fresh mmap + page faults:
            # ~3x the page faults and ~24% fewer samples/s than torchrun (bench/NOTES.md).
            "pre-spawn-environ": {"MALLOC_TRIM_THRESHOLD_": None},
        },
        # Dask's diagnostics wake every process often: the profiler samples each running task's
        # thread every 10 ms (a rank's supervising task too, which only waits on its rank's
        # process) and every scheduler, nanny and worker checks its event loop every 20 ms. On a
        # 2-core box that took ~0.15 of a core beside two DDP ranks, and their steps slowed
        # (bench/NOTES.md, ddp_overhead). At 100 ms and 200 ms it is ~0.05; the profile is still
        # there and a blocked event loop is still reported (after distributed.admin.tick.limit).
        "worker": {"profile": {"interval": "100ms"}},
        "admin": {"tick": {"interval": "200ms"}},
        # A killed worker comes back through its nanny and a training job waits for it (launch.py
        # fail_over); with the default 15 s, a LocalCluster hard-closes the nanny of a worker that
        # is slow to come back on a loaded machine, and the worker is lost for good.
        "deploy": {"lost-worker-timeout": "10 minutes"},
    }
}


def worker_config_yaml() -> str:
    """WORKER_DASK_CONFIG as YAML, for the DASK_CONFIG of `dask worker` processes."""
    return yaml.safe_dump(WORKER_DASK_CONFIG)


def dotted(tree: dict, prefix: str = "") -> dict[str, object]:
    """dask.config.set replaces whole subtrees given nested dicts; hand it dotted leaf keys."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# Variables the config above removes from workers: they must not be inherited from the parent either.
WORKER_UNSET_ENV: tuple[str, ...] = tuple(
    name
    for name, value in WORKER_DASK_CONFIG["distributed"]["nanny"]["pre-spawn-environ"].items()
    if value is None
)
