"""The launcher's view of the cluster: which workers are alive decides fail-over, so it must
never read a stale or partial list."""

import dask
from distributed import Client, LocalCluster

from mms_core.training.launch import worker_addresses


def test_worker_addresses_never_reads_the_clients_refreshing_cache():
    # The client's periodic refresh stores an identity fetched with no workers; with a 2 ms
    # refresh, client.scheduler_info() returned no workers in ~14% of 3000 reads (a false
    # "worker left the cluster" in CI). worker_addresses asks the scheduler itself.
    with (
        dask.config.set({"distributed.client.scheduler-info-interval": "2ms"}),
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        expected = sorted(cluster.scheduler.workers)
        seen = [worker_addresses(client) for _ in range(1500)]
    assert len(expected) == 2
    assert all(s == expected for s in seen), [s for s in seen if s != expected][:3]


def test_training_ranks_go_only_to_gpu_workers_when_the_cluster_has_any():
    from distributed import Scheduler, SpecCluster, Worker

    from mms_core.training.launch import choose_workers, rank_workers
    from mms_core.training.spec import TrainJob, TrainSpec

    workers = {
        "cpu-0": {"cls": Worker, "options": {"nthreads": 1}},
        "cpu-1": {"cls": Worker, "options": {"nthreads": 1}},
        "gpu-0": {"cls": Worker, "options": {"nthreads": 1, "resources": {"GPU": 1}}},
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": None}}
    job = TrainJob(manifest_uri="unused", model={}, train=TrainSpec(), output_uri="o", checkpoint_uri="c")
    with SpecCluster(workers=workers, scheduler=scheduler) as cluster, Client(cluster) as client:
        client.wait_for_workers(3)
        gpu = [w.address for name, w in cluster.workers.items() if name.startswith("gpu")]
        assert rank_workers(client) == gpu
        assert choose_workers(client, job=job) == gpu  # world_size defaults to the GPU workers
        assert len(worker_addresses(client)) == 3
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cpu_only,
        Client(cpu_only) as client,
    ):
        assert rank_workers(client) == worker_addresses(client) and len(rank_workers(client)) == 2
