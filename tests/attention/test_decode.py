"""The fused decode attention (on the packed codes) against dequantize-then-attend, on random tensors."""

import itertools

import pytest
import torch
from conftest import DEVICE, host_sync_refused
from torch._dynamo.utils import counters

from kvtuner import compiling
from kvtuner.attention import decode
from kvtuner.cache import QuantizedKVLayer
from kvtuner.precision import Layout, PrecisionPair

BITS = (2, 4, 8, 16)


@pytest.fixture(autouse=True, params=["native", "torch"])
def decode_path(request, monkeypatch):
    """Every test runs on kvtuner's CPU kernel and on the pure-torch kernels (on a GPU, only the
    latter: `KVTUNER_TEST_DEVICE=cuda`)."""
    if DEVICE.type != "cpu" and request.param == "native":
        pytest.skip("kvtuner's native kernel runs on the CPU only")
    monkeypatch.setenv("KVTUNER_NATIVE", "1" if request.param == "native" else "0")
    return request.param


HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16  # GQA: two query heads per KV head


def filled_layer(
    pair: PrecisionPair,
    layout: Layout,
    *,
    dtype=torch.float32,
    window: int | None = None,
    batch: int = 1,
    prompt: int = 45,
    steps: int = 7,
    valid: torch.Tensor | None = None,
    head_dim: int = HEAD_DIM,
    seed: int = 0,
) -> QuantizedKVLayer:
    """A layer fed a prompt and `steps` decode tokens, its last step left for the fused attention."""
    gen = torch.Generator().manual_seed(seed)
    layer = QuantizedKVLayer(pair, layout, sliding_window=window)
    layer.valid = None if valid is None else valid.to(DEVICE)
    for n in [prompt] + [1] * steps:
        k = (torch.randn(batch, KV_HEADS, n, head_dim, generator=gen) * 2).to(DEVICE, dtype)
        v = torch.randn(batch, KV_HEADS, n, head_dim, generator=gen).to(DEVICE, dtype)
        layer.fused = n == 1
        if layer.pending is not None:
            layer.finish_attention()
        layer.update(k, v)
    assert layer.pending is not None  # the last step returned no history
    return layer


def query(batch: int = 1, dtype=torch.float32, head_dim: int = HEAD_DIM, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, HEADS, 1, head_dim, generator=gen).to(DEVICE, dtype)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def both(layer, q, mask=None, softcap=None):
    scaling = q.shape[-1] ** -0.5
    fused = decode.decode_attention(q.float(), layer, mask, scaling, softcap)
    plain = decode.reference_decode_attention(q.float(), layer, mask, scaling, softcap)
    return fused, plain


@pytest.mark.parametrize(("key_bits", "value_bits"), list(itertools.product(BITS, BITS)))
@pytest.mark.parametrize("scheme", ["per-token", "kivi"])
@pytest.mark.parametrize("sinks", [0, 4])
def test_every_pair_matches_dequantize_then_attend(key_bits, value_bits, scheme, sinks):
    layout = Layout(scheme=scheme, group_size=8, block_size=8, residual_length=8, sink_tokens=sinks)
    layer = filled_layer(PrecisionPair(key_bits, value_bits), layout)
    fused, plain = both(layer, query())
    assert fused.shape == (1, 1, HEADS, HEAD_DIM)
    assert relative_error(fused, plain) <= 1e-4


@pytest.mark.parametrize("scheme", ["per-token", "kivi"])
@pytest.mark.parametrize("spec", [(4, 4), (4, 2), (8, 16), (2, 2)])
def test_sliding_window_left_padded_batch_and_smoothing(scheme, spec):
    """Window 24 over 52 tokens, 3 rows with 0 / 5 / 11 padding tokens, smoothed per-token stores."""
    layout = Layout(scheme=scheme, block_size=8, residual_length=8, group_size=8)
    valid = torch.ones(3, 52, dtype=torch.bool)
    valid[1, :5] = False
    valid[2, :11] = False
    layer = filled_layer(
        PrecisionPair(*spec), layout, window=24, batch=3, valid=valid, prompt=45, steps=7
    )
    assert layer.stored_tokens <= 24 + 8  # the window (KIVI keeps up to a block more)
    mask = valid.to(DEVICE)[:, None, None, -layer.pending :]  # what sdpa's mask gives a decode step
    fused, plain = both(layer, query(batch=3), mask)
    assert relative_error(fused, plain) <= 1e-4
    # an additive float mask (eager attention) gives the same
    additive = torch.zeros(mask.shape, device=DEVICE).masked_fill(
        ~mask, torch.finfo(torch.float32).min
    )
    fused_add, _ = both(layer, query(batch=3), additive)
    assert relative_error(fused_add, plain) <= 1e-4


@pytest.mark.parametrize("scheme", ["per-token", "kivi"])
@pytest.mark.parametrize("spec", [(4, 4), (4, 2), (2, 8), (16, 4)])
def test_bfloat16_stores(scheme, spec):
    """bf16 codes' scales: the fused path and a float32 dequantization of the same parts agree."""
    layout = Layout(scheme=scheme, block_size=8, residual_length=8)
    layer = filled_layer(PrecisionPair(*spec), layout, dtype=torch.bfloat16)
    fused, plain = both(layer, query(dtype=torch.bfloat16))
    assert fused.dtype == torch.float32  # the query's dtype (float32 here)
    assert relative_error(fused, plain) <= 1e-4


@pytest.mark.parametrize("scheme", ["per-token", "kivi"])
@pytest.mark.parametrize("prompt", [1, 2])
@pytest.mark.parametrize("spec", [(4, 4), (4, 2)])  # K and V stacked in one store, or two
def test_a_prompt_shorter_than_the_sinks_leaves_empty_stores(scheme, prompt, spec):
    """Two tokens of prompt and one step: everything sits in the sinks (or KIVI's residual), the
    packed stores are still empty, and the step attends to what is held (`kvtuner generate
    --prompt Hi` crashed here)."""
    layout = Layout(scheme=scheme, block_size=8, residual_length=8, sink_tokens=4)
    layer = filled_layer(PrecisionPair(*spec), layout, prompt=prompt, steps=1)
    assert layer.stores.seq_len == 0
    fused, plain = both(layer, query())
    assert relative_error(fused, plain) <= 1e-4


def test_softcap_and_odd_head_dim():
    """Gemma 2's logit soft-capping, and a head of 80 channels (2-bit codes: 20 bytes a row)."""
    layout = Layout(scheme="per-token", group_size=None)
    layer = filled_layer(PrecisionPair(2, 4), layout, head_dim=80)
    fused, plain = both(layer, query(head_dim=80), softcap=5.0)
    assert relative_error(fused, plain) <= 1e-4


@pytest.mark.parametrize("scheme", ["per-token", "kivi"])
def test_a_query_in_any_memory_layout(scheme):
    """A batch's query need not be contiguous (a projection that writes batch-minor output, a
    slice of a fused q/k/v projection): the answer is the contiguous query's."""
    layout = Layout(scheme=scheme, block_size=8, residual_length=8, sink_tokens=4)
    layer = filled_layer(PrecisionPair(4, 2), layout, batch=3)
    q = query(batch=3)
    strided = q.permute(3, 1, 2, 0).contiguous().permute(3, 1, 2, 0)  # batch is the fastest axis
    assert not strided.is_contiguous() and torch.equal(strided, q)
    fused = decode.decode_attention(strided, layer, None, HEAD_DIM**-0.5)
    assert torch.equal(fused, decode.decode_attention(q, layer, None, HEAD_DIM**-0.5))
    _, plain = both(layer, q)
    assert relative_error(fused, plain) <= 1e-4


def test_long_history_is_chunked_eagerly_and_matches(monkeypatch):
    """Past EAGER_CHUNK tokens the eager kernels work chunk by chunk (bounded float codes)."""
    from kvtuner.attention import kernels

    monkeypatch.setattr(kernels, "EAGER_CHUNK", 64)
    monkeypatch.setenv("KVTUNER_COMPILE", "0")
    for scheme in ("per-token", "kivi"):
        layout = Layout(scheme=scheme, block_size=16, residual_length=16, group_size=8)
        layer = filled_layer(PrecisionPair(4, 2), layout, prompt=300, steps=3)
        fused, plain = both(layer, query())
        assert relative_error(fused, plain) <= 1e-4


@pytest.mark.parametrize(
    ("scheme", "spec", "dtype"),
    [
        ("per-token", (4, 4), torch.float32),
        ("kivi", (4, 2), torch.float32),
        ("per-token", (8, 2), torch.bfloat16),
    ],
)
def test_compiled_kernels_agree_with_eager(monkeypatch, scheme, spec, dtype):
    """torch.compile'd kernels (the default past COMPILE_FROM tokens) give the eager numbers,
    before and after the stores grow (a new capacity must not recompile or misread)."""
    layout = Layout(scheme=scheme, block_size=8, residual_length=8, group_size=8)
    layer = filled_layer(PrecisionPair(*spec), layout, dtype=dtype, prompt=120, steps=3)
    q = query(dtype=dtype)
    monkeypatch.setenv("KVTUNER_COMPILE", "0")
    eager = decode.decode_attention(q, layer, None, 0.25)
    monkeypatch.setenv("KVTUNER_COMPILE", "1")
    compiled = decode.decode_attention(q, layer, None, 0.25)
    assert not compiling.failed()
    assert relative_error(compiled, eager) <= 1e-4
    plain = decode.reference_decode_attention(q, layer, None, 0.25)
    assert relative_error(compiled, plain) <= (1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("scheme", ["per-token", "kivi"])
@pytest.mark.parametrize("compiled", [False, True])
def test_a_decode_step_never_waits_for_the_device(monkeypatch, scheme, compiled):
    """One decode step as transformers runs it, the new token's update and the fused attention
    over the packed stores of a left-padded batch, never makes the host wait for the device."""
    monkeypatch.setenv("KVTUNER_COMPILE", "1" if compiled else "0")
    layout = Layout(scheme=scheme, block_size=8, residual_length=8, group_size=8)
    valid = torch.ones(2, 60, dtype=torch.bool)
    valid[1, :6] = False
    layer = filled_layer(PrecisionPair(4, 2), layout, batch=2, prompt=50, steps=2, valid=valid)
    q, valid = query(batch=2), valid.to(DEVICE)
    decode.decode_attention(q, layer, valid[:, None, None, :52], 0.25)  # compiles
    gen = torch.Generator().manual_seed(5)
    # on the device before the guard: a copy from host memory waits for the device itself
    steps = torch.randn(8, 2, 2, KV_HEADS, 1, HEAD_DIM, generator=gen).to(DEVICE)
    graphs = counters["stats"]["unique_graphs"]
    with host_sync_refused(monkeypatch, DEVICE):
        for step, (k, v) in enumerate(steps, start=1):  # crosses a KIVI block flush
            layer.finish_attention()
            layer.update(k, v)
            mask = valid[:, None, None, : 52 + step]
            out = decode.decode_attention(q, layer, mask, 0.25)
    assert not compiling.failed()
    # a longer history is no new graph (at most one, when a store's buffer first grows): the
    # mask's parts once made every step compile anew (5 s a step on 2 cores)
    assert counters["stats"]["unique_graphs"] - graphs <= 1
    plain = decode.reference_decode_attention(q, layer, mask, 0.25)
    assert relative_error(out, plain) <= 1e-4


@pytest.mark.parametrize("scheme", ["per-token", "kivi"])
@pytest.mark.parametrize("sinks", [0, 4])
def test_compiled_layer_graph_with_window_padding_and_sinks(
    monkeypatch, decode_path, scheme, sinks
):
    """The one-graph path (`kernels.decode_parts`, compiled) with every part of the bias: a
    sliding window's skipped tokens, a left-padded batch, sinks and KIVI's residual."""
    if decode_path == "native":
        pytest.skip("the native kernel runs these layers on the CPU")
    monkeypatch.setenv("KVTUNER_COMPILE", "1")
    graphs = []
    real = decode._decode_layer
    monkeypatch.setattr(decode, "_decode_layer", lambda *a: graphs.append(1) or real(*a))
    layout = Layout(scheme=scheme, block_size=8, residual_length=8, group_size=8,
                    sink_tokens=sinks, smooth=False)  # fmt: skip
    valid = torch.ones(3, 70, dtype=torch.bool)
    valid[1, :5] = False
    valid[2, :11] = False
    for steps in (3, 6):  # two stored counts and residual lengths
        layer = filled_layer(PrecisionPair(4, 2), layout, window=40, batch=3, valid=valid,
                             prompt=60, steps=steps)  # fmt: skip
        mask = valid.to(DEVICE)[:, None, None, : 60 + steps][..., -layer.pending :]
        fused, plain = both(layer, query(batch=3), mask)
        assert relative_error(fused, plain) <= 1e-4
    assert graphs and not compiling.failed()
