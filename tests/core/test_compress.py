"""Compression: int8 per-row quantization, magnitude pruning, and the compress step on real shards."""

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from torch import nn

from mms_core import steps, storage
from mms_core.compress import CompressSpec, latency_ms, load_quantized, prune_linear, quantized_bytes
from mms_core.data.ingest import DataSpec
from mms_core.data.shard import ShardSpec, load_manifest, preprocess_and_shard, read_shard
from mms_core.evaluate import predict_classes
from mms_core.models import ModelSpec, build_model
from mms_core.training.checkpoint import state_bytes
from mms_core.training.loop import train_rank
from mms_core.training.spec import TrainJob, TrainSpec

MLP = ModelSpec(name="mlp")


@pytest.fixture(scope="module")
def manifest_uri(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("compress-data"))
    raw = steps.ingest(spec=DataSpec(source="builtin://digits"), root=root)
    return preprocess_and_shard(
        raw_uri=raw.uri, source_sha256=raw.sha256, label="label", spec=ShardSpec(n_shards=4), root=root
    )


@pytest.fixture(scope="module")
def trained_uri(manifest_uri, tmp_path_factory):
    """fp32 weights of an mlp trained for 3 short epochs on one rank."""
    out = tmp_path_factory.mktemp("compress-train")
    job = TrainJob(
        manifest_uri=manifest_uri,
        model=MLP,
        train=TrainSpec(epochs=3, checkpoint_every=0),
        output_uri=str(out / "weights.safetensors"),
        checkpoint_uri=str(out / "ckpt"),
    )
    return train_rank(job=job, rank=0, world_size=1).weights_uri


@pytest.fixture
def weights_copy(trained_uri, tmp_path):
    """A private copy of the trained weights (compress_trained writes its output beside them)."""
    dst = tmp_path / "run" / "model.safetensors"
    dst.parent.mkdir()
    shutil.copyfile(trained_uri, dst)
    return str(dst)


def _test_rows(manifest_uri):
    return read_shard(load_manifest(manifest_uri).test)


def _fresh(seed=0):
    torch.manual_seed(seed)
    return build_model(spec=MLP, in_features=64, n_classes=10).eval()


def _trained(manifest_uri, trained_uri):
    return steps.load_trained(manifest_uri=manifest_uri, model=MLP, weights_uri=trained_uri)


def test_quantized_bytes_are_at_least_3x_smaller_than_fp32():
    model = _fresh()
    fp32, int8 = state_bytes(model), quantized_bytes(model=model)
    assert len(fp32) / len(int8) >= 3.0
    raw = st_load(int8)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    for name in linears:
        assert raw[f"{name}.weight.__int8"].dtype == torch.int8
        assert raw[f"{name}.weight.__scale"].shape == (model.get_submodule(name).out_features,)
        assert raw[f"{name}.bias"].dtype == torch.float32
        assert f"{name}.weight" not in raw


def test_dequantized_weights_within_half_a_step_of_the_originals():
    model = _fresh(3)
    restored = load_quantized(model=_fresh(4), data=quantized_bytes(model=model), int8_kernels=False)
    for (k, a), (k2, b) in zip(model.state_dict().items(), restored.state_dict().items(), strict=True):
        assert k == k2
        if k.endswith("weight"):
            step = a.abs().amax(dim=1, keepdim=True) / 127.0
            assert torch.all((a - b).abs() <= step / 2 + 1e-7), k
            assert not torch.equal(a, b)  # really quantized
        else:
            assert torch.equal(a, b), k


@pytest.mark.parametrize("int8_kernels", [True, False])
def test_load_quantized_predicts_like_the_float_model(manifest_uri, trained_uri, int8_kernels):
    x, y = _test_rows(manifest_uri)
    full = _trained(manifest_uri, trained_uri)
    small = load_quantized(
        model=build_model(spec=MLP, in_features=64, n_classes=10),
        data=quantized_bytes(model=full),
        int8_kernels=int8_kernels,
    )
    assert small.training is False
    if int8_kernels:
        assert not any(type(m) is nn.Linear for m in small.modules())  # dynamic int8 Linear modules
    p_full = predict_classes(model=full, x=x)
    p_small = predict_classes(model=small, x=x)
    assert (p_full == p_small).mean() > 0.95
    assert (p_full == y).mean() > 0.85  # the float model did learn something
    with torch.no_grad():
        xt = torch.from_numpy(x.copy())
        diff = (full(xt) - small(xt)).abs().max().item()
    assert diff < 1.0


def test_load_quantized_at_init_agrees_with_float(manifest_uri):
    """At init the logits are nearly tied, so only the weight rounding is compared here
    (the int8 activation kernels are covered on the trained model above)."""
    x, _ = _test_rows(manifest_uri)
    full = _fresh(11)
    small = load_quantized(model=_fresh(12), data=quantized_bytes(model=full), int8_kernels=False)
    assert (predict_classes(model=full, x=x) == predict_classes(model=small, x=x)).mean() > 0.95


@pytest.mark.parametrize("amount", [0.25, 0.5, 0.8])
def test_prune_linear_zeroes_the_requested_share_of_smallest_weights(amount):
    model = _fresh(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = prune_linear(model=model, amount=amount)
    assert out is model
    assert model.state_dict().keys() == before.keys()  # no weight_orig / weight_mask left behind
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        w, w0 = m.weight.detach(), before[f"{name}.weight"]
        zeros = int((w == 0).sum())
        assert zeros == round(amount * w.numel()), name
        # the zeroed ones are the smallest in magnitude; the others are untouched
        kept = w != 0
        assert torch.equal(w[kept], w0[kept])
        assert w0[~kept].abs().max() <= w0[kept].abs().min()
        assert torch.equal(m.bias.detach(), before[f"{name}.bias"])


def test_prune_linear_with_zero_amount_is_a_no_op():
    model = _fresh(2)
    before = state_bytes(model)
    prune_linear(model=model, amount=0.0)
    assert state_bytes(model) == before


def test_compress_trained_is_3x_smaller_with_a_small_accuracy_drop(manifest_uri, weights_copy):
    res = steps.compress_trained(
        manifest_uri=manifest_uri,
        model=MLP,
        weights_uri=weights_copy,
        spec=CompressSpec(max_accuracy_drop=0.02),
    )
    assert res.size_ratio >= 3.0
    assert res.size_ratio == pytest.approx(res.full_bytes / res.compressed_bytes)
    assert res.full_bytes == len(storage.read_bytes(weights_copy))
    assert res.weights_uri == weights_copy.rsplit("/", 1)[0] + "/model-int8.safetensors"
    data = storage.read_bytes(res.weights_uri)
    assert len(data) == res.compressed_bytes
    assert any(k.endswith(".__int8") for k in st_load(data))

    full_eval = steps.evaluate_trained(manifest_uri=manifest_uri, model=MLP, weights_uri=weights_copy)
    assert res.full_accuracy == pytest.approx(full_eval.accuracy)
    assert res.full_accuracy > 0.85
    assert res.accuracy_drop == pytest.approx(res.full_accuracy - res.compressed_accuracy)
    assert res.accuracy_drop <= 0.02
    assert res.within_budget is True
    assert res.full_latency_ms > 0 and res.compressed_latency_ms > 0

    # the written int8 file reproduces the reported compressed accuracy
    x, y = _test_rows(manifest_uri)
    small = load_quantized(model=build_model(spec=MLP, in_features=64, n_classes=10), data=data)
    assert (predict_classes(model=small, x=x) == y).mean() == pytest.approx(res.compressed_accuracy)


def test_compress_trained_with_pruning_writes_zeros_and_flags_budget(manifest_uri, weights_copy):
    res = steps.compress_trained(
        manifest_uri=manifest_uri,
        model=MLP,
        weights_uri=weights_copy,
        spec=CompressSpec(prune_amount=0.5, max_accuracy_drop=0.0),
    )
    raw = st_load(storage.read_bytes(res.weights_uri))
    q = [v for k, v in raw.items() if k.endswith(".__int8")]
    share = sum(int((t == 0).sum()) for t in q) / sum(t.numel() for t in q)
    assert share >= 0.5
    assert res.within_budget is (res.accuracy_drop <= 0.0)


def test_compress_trained_without_quantization_keeps_fp32_size(manifest_uri, weights_copy):
    res = steps.compress_trained(
        manifest_uri=manifest_uri, model=MLP, weights_uri=weights_copy, spec=CompressSpec(quantize=False)
    )
    assert res.compressed_bytes == res.full_bytes
    assert res.size_ratio == pytest.approx(1.0)
    assert res.accuracy_drop == pytest.approx(0.0)
    assert storage.read_bytes(res.weights_uri) == storage.read_bytes(weights_copy)


def test_latency_ms_is_positive_and_restores_eval_mode():
    model = _fresh().train()
    x = np.random.default_rng(0).normal(size=(16, 64)).astype(np.float32)
    ms = latency_ms(model=model, x=x, repeats=5)
    assert ms > 0 and np.isfinite(ms)
    assert model.training is False
    assert (
        latency_ms(model=load_quantized(model=_fresh(), data=quantized_bytes(model=model)), x=x, repeats=5)
        > 0
    )
