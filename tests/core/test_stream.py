"""Streamed training data (mms_core.data.stream): a manifest of parts built by hand from the digits
shards; the epoch's order, resume, the memory bound, and whole DDP / parameter-server runs on it."""

import io
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mms_core import storage
from mms_core.data.shard import (
    LABEL_COLUMN,
    PARTS_MANIFEST_VERSION,
    Manifest,
    PartInfo,
    ShardInfo,
    load_manifest,
    read_part,
    read_shard,
    shards_for_rank,
)
from mms_core.data.stream import (
    InMemoryRankData,
    StreamedRankData,
    ValSet,
    open_rank_data,
    plan_windows,
    steps_per_epoch,
)
from mms_core.errors import CorruptShardError
from mms_core.models import ModelSpec
from mms_core.training.ddp import run_ddp
from mms_core.training.loop import train_rank
from mms_core.training.param_server import run_param_server
from mms_core.training.spec import SHUFFLE_BUFFER_ROWS, TrainJob, TrainSpec, checkpoint_key
from tests.core.test_fault_tolerance import _job as fault_job
from tests.core.test_fault_tolerance import _steps as checkpoint_steps

PART_ROWS = (48, 17, 60, 33, 48, 5)  # uneven parts, cycled: windows rarely align with batches


def write_parts_manifest(v1_uri: str, root: Path, *, part_rows=PART_ROWS) -> str:
    """The v1 manifest at ``v1_uri`` with every shard cut into Parquet parts of ``part_rows`` rows
    (cycled), laid out as file sources' shards are: a directory per shard, the shard's sha256 the
    hash of its parts' in order, manifest version 2. Same rows, same order within each shard."""
    m = load_manifest(v1_uri)

    def split(info: ShardInfo, name: str) -> ShardInfo:
        x, y = read_shard(info)
        out, parts, lo, k = root / name, [], 0, 0
        while lo < len(x):
            hi = min(lo + part_rows[k % len(part_rows)], len(x))
            df = pd.DataFrame(x[lo:hi], columns=m.features)
            df[LABEL_COLUMN] = y[lo:hi]
            buf = io.BytesIO()
            df.to_parquet(buf, index=False)
            uri = str(out / f"part-{k:05d}.parquet")
            parts.append(
                PartInfo(uri=uri, rows=hi - lo, sha256=storage.write_bytes_atomic(uri, buf.getvalue()))
            )
            lo, k = hi, k + 1
        sha = storage.canonical_hash([p.sha256 for p in parts])
        return ShardInfo(uri=str(out), rows=len(x), sha256=sha, parts=parts)

    manifest = Manifest(
        **{
            **m.model_dump(exclude={"train", "val", "test"}),
            "version": PARTS_MANIFEST_VERSION,
            "train": [split(s, f"train-{i:05d}") for i, s in enumerate(m.train)],
            "val": split(m.val, "val"),
            "test": split(m.test, "test"),
        }
    )
    uri = str(root / "manifest.json")
    storage.write_json_atomic(uri, manifest.model_dump(mode="json"))
    return uri


@pytest.fixture(scope="module")
def parts_uri(digits_manifest, tmp_path_factory):
    return write_parts_manifest(digits_manifest(4), tmp_path_factory.mktemp("digits-parts"))


def _rank_data(manifest_uri, *, rank=0, world_size=1, batch=32, buffer=100, seed=0) -> StreamedRankData:
    train = TrainSpec(seed=seed, batch_size=batch, shuffle_buffer_rows=buffer)
    data = open_rank_data(
        manifest=load_manifest(manifest_uri),
        rank=rank,
        world_size=world_size,
        device=torch.device("cpu"),
        train=train,
    )
    assert isinstance(data, StreamedRankData)
    return data


def _rows(batches) -> list[bytes]:
    """Each row as bytes (features then label): rows are compared whole."""
    return [
        np.asarray(xr).tobytes() + int(yr).to_bytes(8, "little", signed=True)
        for x, y in batches
        for xr, yr in zip(x, y, strict=True)
    ]


def _all(batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in batches]


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=False)
    )


# ---- the epoch's order -------------------------------------------------------------------------


def test_v1_manifests_stay_in_memory_and_parts_manifests_stream(digits_manifest, parts_uri):
    v1 = open_rank_data(
        manifest=load_manifest(digits_manifest(4)),
        rank=0,
        world_size=2,
        device=torch.device("cpu"),
        train=TrainSpec(shuffle_buffer_rows=7),
    )
    assert isinstance(v1, InMemoryRankData)
    streamed = _rank_data(parts_uri, world_size=2)
    rank_shards = shards_for_rank(load_manifest(parts_uri), rank=0, world_size=2)
    assert streamed.parts == [p for s in rank_shards for p in s.parts]
    assert sum(p.rows for p in streamed.parts) == len(v1.x)


@pytest.mark.parametrize("batch", [32, 50])
def test_an_epoch_visits_every_row_once_in_an_order_fixed_by_seed_epoch_and_rank(parts_uri, batch):
    data = _rank_data(parts_uri, batch=batch)
    want = sorted(_rows([read_shard(s) for s in load_manifest(parts_uri).train]))
    n = steps_per_epoch(load_manifest(parts_uri), world_size=1, batch_size=batch)
    epoch1 = _all(data.batches(epoch=1, skip=0, n_steps=n))
    assert len(epoch1) == n and all(len(x) == batch for x, _ in epoch1[:-1])
    assert sorted(_rows(epoch1)) == want  # every row exactly once (the last batch holds the rest)
    epoch2 = _all(data.batches(epoch=2, skip=0, n_steps=n))
    assert sorted(_rows(epoch2)) == want
    assert _rows(epoch1) != _rows(epoch2)
    assert _equal(epoch1, _all(_rank_data(parts_uri, batch=batch).batches(epoch=1, skip=0, n_steps=n)))
    assert not _equal(
        epoch1, _all(_rank_data(parts_uri, batch=batch, seed=1).batches(epoch=1, skip=0, n_steps=n))
    )
    # rows are shuffled across the parts of a window, not part after part
    windows = data.stream(epoch=1, skip=0, n_steps=n).windows
    assert len(windows) > 1 and max(w.rows for w in windows) <= 100
    part_of = {row: k for k, p in enumerate(data.parts) for row in _rows([read_part(p)])}
    seq = [part_of[row] for row in _rows(epoch1)]
    runs = [1 + int(np.count_nonzero(np.diff(seq[w.start : w.start + w.rows]))) for w in windows]
    assert any(r > len(w.parts) for r, w in zip(runs, windows, strict=True))


def test_a_rank_with_more_rows_stops_at_the_common_step_count(parts_uri):
    manifest = load_manifest(parts_uri)
    n = steps_per_epoch(manifest, world_size=2, batch_size=32)
    rows = [sum(s.rows for s in shards_for_rank(manifest, rank=r, world_size=2)) for r in range(2)]
    for r in range(2):
        batches = _all(_rank_data(parts_uri, rank=r, world_size=2).batches(epoch=1, skip=0, n_steps=n))
        assert len(batches) == n
        assert sum(len(y) for _, y in batches) == min(rows[r], n * 32)


def test_windows_group_whole_parts_up_to_the_buffer():
    parts = [PartInfo(uri=str(i), rows=r, sha256="") for i, r in enumerate([40, 40, 30, 150, 10, 10])]
    windows = plan_windows(parts, max_rows=100)
    assert [[p.uri for p in w.parts] for w in windows] == [["0", "1"], ["2"], ["3"], ["4", "5"]]
    assert [(w.start, w.rows) for w in windows] == [(0, 80), (80, 30), (110, 150), (260, 20)]


# ---- resume -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aligned_parts(digits_manifest, tmp_path_factory) -> list[PartInfo]:
    """Parts of 48 rows only: with a buffer of 96 and batches of 32 or 16, windows start on batch
    boundaries (a resume there skips whole windows and reads from the next one's first row)."""
    uri = write_parts_manifest(digits_manifest(4), tmp_path_factory.mktemp("aligned"), part_rows=(48,))
    shards = shards_for_rank(load_manifest(uri), rank=1, world_size=2)
    return [p for s in shards for p in s.parts if p.rows == 48]


@pytest.mark.parametrize(
    ("layout", "batch", "buffer"),
    [
        ("uneven", 32, 100),
        ("uneven", 50, 40),
        ("uneven", 32, 10**6),
        ("aligned", 32, 96),
        ("aligned", 16, 96),
    ],
)
def test_resume_from_any_step_gives_the_rest_of_the_epoch_bit_identically(
    parts_uri, aligned_parts, layout, batch, buffer
):
    if layout == "uneven":
        data = _rank_data(parts_uri, rank=1, world_size=2, batch=batch, buffer=buffer)
        n = steps_per_epoch(load_manifest(parts_uri), world_size=2, batch_size=batch)
    else:
        data = StreamedRankData(
            parts=aligned_parts,
            device=torch.device("cpu"),
            seed=0,
            rank=1,
            batch_size=batch,
            shuffle_buffer_rows=buffer,
        )
        n = -(-48 * len(aligned_parts) // batch)
    full = _all(data.batches(epoch=3, skip=0, n_steps=n))
    assert len(full) == n
    windows = data.stream(epoch=3, skip=0, n_steps=n).windows
    starts = {w.start for w in windows}
    assert any(s * batch not in starts for s in range(n))  # resumes that land inside a window
    if layout == "aligned":  # and resumes on a window's first row
        assert len([s for s in range(1, n) if s * batch in starts]) >= 3
    for skip in range(n + 1):
        read: list[int] = []
        stream = data.stream(
            epoch=3, skip=skip, n_steps=n, on_window=lambda w, _, read=read: read.append(w.index)
        )
        assert _equal(_all(stream), full[skip:]), skip
        # the windows wholly before the resume point are never read
        assert all(w.start + w.rows > skip * batch for w in windows if w.index in read)


def test_a_windows_parts_are_checked_when_read(parts_uri, tmp_path):
    m = load_manifest(parts_uri)
    victim = m.train[0].parts[1]
    bad = victim.model_copy(update={"sha256": "0" * 64})
    shard = m.train[0].model_copy(update={"parts": [*m.train[0].parts[:1], bad, *m.train[0].parts[2:]]})
    data = StreamedRankData(
        parts=shard.parts, device=torch.device("cpu"), seed=0, rank=0, batch_size=32, shuffle_buffer_rows=50
    )
    with pytest.raises(CorruptShardError, match="part-00001"):
        _all(data.batches(epoch=1, skip=0, n_steps=100))


# ---- memory --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefetch", [False, True])
def test_a_stream_holds_at_most_a_window_or_two_with_prefetch(parts_uri, prefetch):
    """Every window read is within the buffer, and while a batch is used at most one window's rows
    (two with prefetch: the next one, read meanwhile) are alive: weak references to each window's
    features tell which are."""
    data = _rank_data(parts_uri, batch=16, buffer=70)
    data.prefetch = prefetch
    n = steps_per_epoch(load_manifest(parts_uri), world_size=1, batch_size=16)
    sizes: list[int] = []
    alive: list[weakref.ref] = []

    def on_window(w, features: np.ndarray) -> None:
        assert len(features) == w.rows
        sizes.append(w.rows)
        alive.append(weakref.ref(features))

    most = 0
    for _ in data.stream(epoch=1, skip=0, n_steps=n, on_window=on_window):
        most = max(most, sum(r() is not None for r in alive))
    assert len(sizes) > 5 and max(sizes) <= 70
    assert 1 <= most <= (2 if prefetch else 1)  # with prefetch, 2 once the next read finished in time


# ---- validation ----------------------------------------------------------------------------------


def test_validation_of_parts_streams_part_by_part_and_sums_over_them(digits_manifest, parts_uri):
    from mms_core.training.loop import val_loss_accuracy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 10))
    whole = ValSet(info=load_manifest(digits_manifest(4)).val, device=torch.device("cpu"))
    parts = ValSet(info=load_manifest(parts_uri).val, device=torch.device("cpu"))
    assert len(list(whole.chunks())) == 1 and len(list(parts.chunks())) == len(
        load_manifest(parts_uri).val.parts
    )
    # same rows: the same figures up to the order of float sums
    assert val_loss_accuracy(model, parts.chunks()) == pytest.approx(val_loss_accuracy(model, whole.chunks()))


# ---- the shuffle buffer in the spec --------------------------------------------------------------


def test_the_shuffle_buffer_at_its_default_leaves_checkpoint_keys_as_they_were():
    model = ModelSpec(name="mlp")
    default = checkpoint_key(manifest_hash="m", model=model, train=TrainSpec())
    assert TrainSpec().shuffle_buffer_rows == SHUFFLE_BUFFER_ROWS
    legacy = TrainSpec().model_dump(
        mode="json", exclude={"resume", "max_restarts", "timeout_s", "shuffle_buffer_rows"}
    )
    assert (
        default
        == storage.canonical_hash(
            {"manifest": "m", "model": model.model_dump(mode="json"), "training": legacy}
        )[:24]
    )
    assert (
        checkpoint_key(manifest_hash="m", model=model, train=TrainSpec(shuffle_buffer_rows=1000)) != default
    )


# ---- whole runs ----------------------------------------------------------------------------------


def _job(manifest_uri, out: Path, **train) -> TrainJob:
    """The fault-tolerance tests' job, with a shuffle buffer small enough for several windows."""
    return fault_job(manifest_uri, out, **{"shuffle_buffer_rows": 100, **train})


def test_streamed_training_resumes_mid_window_bit_exactly(parts_uri, tmp_path):
    """As test_fault_tolerance's resume test, on parts: a run whose checkpoints after the first are
    lost resumes there (mid-epoch, mid-window) and ends with the uninterrupted run's weights."""
    full = train_rank(job=_job(parts_uri, tmp_path / "full"), rank=0, world_size=1)
    assert full.history[-1].val_accuracy > 0.8
    crashed = tmp_path / "crashed"
    train_rank(job=_job(parts_uri, crashed), rank=0, world_size=1)
    kept = checkpoint_steps(crashed / "ckpt")
    for step in kept[1:]:
        for f in (crashed / "ckpt" / f"step-{step:08d}").iterdir():
            f.unlink()
        (crashed / "ckpt" / f"step-{step:08d}").rmdir()
    (crashed / "weights.safetensors").unlink()
    spe = steps_per_epoch(load_manifest(parts_uri), world_size=1, batch_size=32)
    epoch, skip = kept[0] // spe + 1, kept[0] % spe
    windows = _rank_data(parts_uri, batch=32, buffer=100).stream(epoch=epoch, skip=0, n_steps=spe).windows
    assert skip and skip * 32 not in {w.start for w in windows}  # mid-epoch and mid-window

    events: list[dict] = []
    resumed = train_rank(job=_job(parts_uri, crashed), rank=0, world_size=1, emit=events.append)
    assert events[0] == {"kind": "resume", "step": kept[0], "epoch": epoch, "skip": skip}
    assert resumed.params_sha256 == full.params_sha256
    assert resumed.history[-1].val_accuracy == full.history[-1].val_accuracy
    assert (crashed / "weights.safetensors").read_bytes() == (
        tmp_path / "full" / "weights.safetensors"
    ).read_bytes()


@pytest.fixture(scope="module")
def cluster3(training_cluster):
    with training_cluster(3) as client:
        yield client


def test_ddp_on_parts_with_a_small_buffer_learns(cluster3, parts_uri, tmp_path):
    job = _job(parts_uri, tmp_path, epochs=5, world_size=2, shuffle_buffer_rows=64)
    results = run_ddp(client=cluster3, job=job)
    assert len(results) == 2 and results[0].params_sha256 == results[1].params_sha256
    hist = results[0].history
    assert [m.epoch for m in hist] == [1, 2, 3, 4, 5]
    assert hist[-1].val_accuracy > 0.85 and hist[-1].train_loss < hist[0].train_loss  # chance: 0.1


KILL_AFTER_STEP = 60


@pytest.mark.slow
def test_ddp_on_parts_resumes_bit_exactly_after_a_worker_is_killed(
    cluster3, parts_uri, tmp_path, kill_worker
):
    """Two ranks on three workers: the group restarts on two after a SIGKILL, so the same world
    size, and the run ends with the uninterrupted run's parameters."""

    def job(out: Path) -> TrainJob:
        return _job(parts_uri, out, epochs=8, batch_size=8, checkpoint_every=20, world_size=2, timeout_s=60)

    reference = run_ddp(client=cluster3, job=job(tmp_path / "ref"))[0]
    events: list[dict] = []
    killed: list[int] = []

    def on_event(ev: dict) -> None:
        events.append(ev)
        if ev.get("step", 0) >= KILL_AFTER_STEP and not killed:
            killed.append(kill_worker(cluster3, 1))

    results = run_ddp(client=cluster3, job=job(tmp_path / "run"), on_event=on_event)
    assert killed, "training ended before the worker could be killed: make the run longer"
    resumes = [e for e in events if e["kind"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] > 0
    assert len(results) == 2 and {r.params_sha256 for r in results} == {reference.params_sha256}


def test_param_server_on_parts_learns(cluster3, parts_uri, tmp_path):
    job = _job(
        parts_uri,
        tmp_path,
        strategy="param_server",
        param_server={"shards": 1, "staleness_bound": 0},
        checkpoint_every=0,
        world_size=2,
    )
    results = run_param_server(client=cluster3, job=job)
    hist = results[0].history
    assert [m.epoch for m in hist] == [1, 2, 3]
    assert hist[-1].val_accuracy > 0.8
