"""The zoo's GPT: shapes, causal masking, sizes, and training on the standard library's source
through the real loop (ingest -> shard -> train_rank), with tokens/s and MFU."""

import math

import pytest
import torch
import torch.nn.functional as F

from mms_core import steps
from mms_core.data.ingest import DataSpec
from mms_core.data.shard import ShardSpec, load_manifest, preprocess_and_shard, read_shard
from mms_core.errors import ModelLoadError
from mms_core.evaluate import evaluate
from mms_core.models import ModelSpec, build_model
from mms_core.training import mfu as mfu_mod
from mms_core.training.loop import forward_loss, train_rank
from mms_core.training.spec import TrainJob, TrainSpec
from mms_portable import gpt as gpt_mod

SEQ, VOCAB = 16, 256


def _tiny(**kwargs) -> gpt_mod.GPT:
    torch.manual_seed(0)
    return build_model(spec=ModelSpec(name="gpt", kwargs=kwargs), in_features=SEQ, n_classes=VOCAB)


def _ids(rows: int, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- the module


def test_logits_put_the_vocabulary_second_and_accept_float_ids():
    model = _tiny().eval()
    idx = _ids(3)
    logits = model(idx.float())  # shards hold features as float32

    assert logits.shape == (3, VOCAB, SEQ)
    assert torch.equal(logits, model(idx))
    targets = torch.roll(idx, 1, dims=0)
    with_targets, loss = model(idx, targets)
    assert torch.equal(with_targets, logits)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)
    assert loss.item() == pytest.approx(math.log(VOCAB), abs=0.1)  # small init: near uniform


def test_future_tokens_do_not_change_earlier_logits():
    model = _tiny(size="mini").eval()
    a = _ids(2)
    b = a.clone()
    b[:, 9:] = (b[:, 9:] + 1) % VOCAB  # change every token from position 9 on

    la, lb = model(a), model(b)
    assert torch.allclose(la[:, :, :9], lb[:, :, :9], atol=1e-6)
    assert not torch.allclose(la[:, :, 9:], lb[:, :, 9:])


def test_gpt2_small_has_124m_parameters_built_on_the_meta_device():
    with torch.device("meta"):
        exact = build_model(
            spec=ModelSpec(name="gpt", kwargs={"size": "gpt2", "pad_vocab_to": 1}),
            in_features=1024,
            n_classes=50257,
        )
        padded = build_model(
            spec=ModelSpec(name="gpt", kwargs={"size": "gpt2"}), in_features=1024, n_classes=50257
        )

    assert exact.num_params(matmul_only=False) == 124_439_808  # GPT-2 small, output layer tied
    assert padded.config.vocab_rows == 50304
    assert padded.num_params(matmul_only=False) == pytest.approx(124e6, rel=0.01)
    assert all(p.is_meta for p in padded.parameters())


def test_output_layer_is_the_token_embedding():
    model = _tiny()
    state = model.state_dict()

    assert not any("head" in k for k in state)  # one matrix, one entry: safetensors-friendly
    with torch.no_grad():
        model.wte.weight.zero_()
    assert torch.count_nonzero(model(_ids(1))) == 0  # zero embedding -> zero logits


def test_sizes_overrides_and_vocabulary_padding():
    model = _tiny(size="mini", n_layer=1, vocab_size=500)
    cfg = model.config

    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (1, 4, 256)
    assert cfg.vocab_rows == 512 and model.wte.weight.shape == (512, 256)
    assert model(_ids(2)).shape == (2, VOCAB, SEQ)  # logits for the data's ids only
    expected = 6 * model.num_params() + 12 * cfg.n_layer * cfg.n_embd * SEQ
    assert model.flops_per_token() == expected
    assert model.num_params() == model.num_params(matmul_only=False) - SEQ * 256


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"size": "huge"}, "unknown GPT size 'huge'"), ({"n_embd": 100, "n_head": 3}, "multiple of n_head")],
)
def test_bad_sizes_are_model_load_errors(kwargs, match):
    with pytest.raises(ModelLoadError, match=match):
        _tiny(**kwargs)


def test_compile_applies_to_cuda_training_only():
    gpt_mod._compiled_forward.cache_clear()
    model = _tiny(compile=True).train()
    loss, _, _ = forward_loss(model, _ids(2).float(), _ids(2)[:, 0])
    loss.backward()
    # On a CPU the eager path ran: not even the torch.compile wrapper was made.
    assert gpt_mod._compiled_forward.cache_info().currsize == 0


def test_forward_loss_targets_are_the_inputs_shifted_with_the_label_appended():
    model = _tiny().eval()
    x = _ids(4)
    y = torch.tensor([1, 2, 3, 4])
    loss, correct, count = forward_loss(model, x.float(), y)

    targets = torch.cat([x[:, 1:], y[:, None]], dim=1)
    logits = model(x)
    assert count == 4 * SEQ
    assert loss.item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)
    assert correct.item() == (logits.argmax(1) == targets).sum().item()


# ---------------------------------------------------------------- MFU


def test_mfu_is_unknown_on_cpu_unless_the_peak_is_set(monkeypatch):
    monkeypatch.delenv(mfu_mod.PEAK_ENV, raising=False)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device has a table entry")
    assert mfu_mod.peak_flops() is None
    assert mfu_mod.mfu(flops_per_token=1e6, tokens_per_s=1e3) is None

    monkeypatch.setenv(mfu_mod.PEAK_ENV, "2")
    assert mfu_mod.mfu(flops_per_token=1e9, tokens_per_s=1e3, devices=2) == pytest.approx(0.25)


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def manifest_uri(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gpt-data"))
    raw = steps.ingest(spec=DataSpec(source="builtin://pystdlib?seq_len=32&max_bytes=60000"), root=root)
    spec = ShardSpec(n_shards=1, val_fraction=0.1, test_fraction=0.1)
    return preprocess_and_shard(
        raw_uri=raw.uri, source_sha256=raw.sha256, label="label", spec=spec, root=root
    )


def test_tiny_gpt_trains_on_cpu_and_its_loss_falls(manifest_uri, tmp_path, monkeypatch):
    monkeypatch.setenv(mfu_mod.PEAK_ENV, "0.5")  # a made-up CPU peak, so that MFU is reported
    job = TrainJob(
        manifest_uri=manifest_uri,
        model=ModelSpec(name="gpt", kwargs={"size": "tiny"}),
        train=TrainSpec(epochs=3, batch_size=16, lr=2e-3, checkpoint_every=0, resume=False),
        output_uri=str(tmp_path / "model.safetensors"),
        checkpoint_uri=str(tmp_path / "ckpt"),
    )
    events = []
    result = train_rank(job=job, rank=0, world_size=1, emit=events.append)
    h = result.history

    assert [m.epoch for m in h] == [1, 2, 3]
    assert h[0].train_loss < math.log(VOCAB) - 1.0  # already well below uniform after one epoch
    assert h[2].train_loss < h[1].train_loss < h[0].train_loss
    assert h[2].val_loss < h[0].val_loss and h[2].val_accuracy > 0.3
    rows = sum(s.rows for s in load_manifest(manifest_uri).train)
    assert result.samples == 3 * rows * 32  # a language model's samples are tokens
    model = build_model(spec=job.model, in_features=32, n_classes=VOCAB)
    for m in h:
        assert m.tokens_per_s == m.samples_per_s > 0
        assert m.mfu == pytest.approx(model.flops_per_token() * m.tokens_per_s / 0.5e12)
    assert [e["kind"] for e in events if e["kind"] == "epoch"] == ["epoch"] * 3

    # The saved weights evaluate per token on the test split: perplexity = exp(mean loss).
    ev = steps.evaluate_trained(manifest_uri=manifest_uri, model=job.model, weights_uri=result.weights_uri)
    x, y = read_shard(load_manifest(manifest_uri).test)
    assert ev.rows == len(x) and ev.tokens == len(x) * 32 and ev.confusion == []
    assert ev.perplexity == pytest.approx(math.exp(ev.loss))
    assert ev.loss < math.log(VOCAB) - 1.0 and 0.3 < ev.accuracy < 1.0
    net = steps.load_trained(manifest_uri=manifest_uri, model=job.model, weights_uri=result.weights_uri)
    again = evaluate(model=net, x=x[:7], y=y[:7], n_classes=VOCAB, batch_size=3)  # batching does not matter
    loss, correct, count = forward_loss(net, torch.from_numpy(x[:7]), torch.from_numpy(y[:7]))
    assert again.loss == pytest.approx(loss.item(), rel=1e-5) and again.accuracy == correct.item() / count
