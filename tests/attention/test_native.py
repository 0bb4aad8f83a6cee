"""kvtuner's CPU decode kernel (`kvtuner.attention.native`) against the pure-torch
`kernels.decode_layer`, argument for argument, on random stores."""

import itertools
import os
import shutil

import pytest
import torch

from kvtuner.attention import kernels, native

# where a C++ compiler is present the kernel must build: a broken build fails here, not skips
pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler"
)


def test_the_kernel_builds_and_loads():
    assert native.available()


def stores(
    *,
    batch=2,
    kv_heads=2,
    g=3,
    d=64,
    n=300,
    sinks=4,
    residual=9,
    kbits=4,
    vbits=4,
    kgroup=64,
    vgroup=32,
    per_channel=False,
    dtype=torch.float32,
    channel_scale=False,
    masked=False,
    stacked=False,
    seed=0,
):
    """Arguments of `kernels.decode_layer` for random stores (codes, scales and zeros)."""
    gen = torch.Generator().manual_seed(seed)
    if per_channel:  # KIVI keys hold whole blocks
        n -= n % kgroup

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.rand(*shape, generator=gen) * scale + shift).to(dtype)

    q = torch.randn(batch, kv_heads, g, d, generator=gen)
    sink = rand(2, batch, kv_heads, sinks, d, scale=2, shift=-1)
    res = rand(2, batch, kv_heads, residual, d, scale=2, shift=-1)

    def packed(bits, capacity):
        width = -(-d * bits // 8)
        return torch.randint(0, 256, (batch, kv_heads, capacity, width), generator=gen).to(
            torch.uint8
        )

    # stacked: keys and values as slices of one grown buffer (strided views, as StackedKV holds)
    capacity = n + 40 if stacked else n
    kpacked, vpacked = packed(kbits, capacity)[..., :n, :], packed(vbits, capacity)[..., :n, :]
    if per_channel:
        kscale = rand(batch, kv_heads, n // kgroup, d, scale=0.2)
        kzero = rand(batch, kv_heads, n // kgroup, d, scale=1, shift=-0.5)
    else:
        kscale = rand(batch, kv_heads, n, d // kgroup, scale=0.2)
        kzero = rand(batch, kv_heads, n, d // kgroup, scale=1, shift=-0.5)
    vscale = rand(batch, kv_heads, n, d // vgroup, scale=0.2)
    vzero = rand(batch, kv_heads, n, d // vgroup, scale=1, shift=-0.5)
    kcs = rand(batch, kv_heads, 1, d, scale=1, shift=0.5) if channel_scale else None
    vcs = rand(batch, kv_heads, 1, d, scale=1, shift=0.5) if channel_scale else None
    bias = None
    if masked:  # a left-padded row and a window: -inf over the oldest tokens
        bias = torch.zeros(batch, 1, 1, sinks + n + residual)
        bias[0, ..., : sinks + 5] = -torch.inf
        bias[-1, ..., sinks + 100 : sinks + 140] = -torch.inf
        bias[-1, ..., -3:] += torch.rand(3, generator=gen)
    return (
        q, sink, res, kpacked, kscale, kzero, kcs, vpacked, vscale, vzero, vcs, bias,
        kbits, kgroup, vbits, vgroup, per_channel,
    )  # fmt: skip


def check(args, tolerance=1e-4):
    ref = kernels.decode_layer(*args)
    out = native.decode_layer(*args)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    error = ((out - ref).norm() / ref.norm()).item()
    assert error <= tolerance, error


@pytest.mark.parametrize(("kbits", "vbits"), list(itertools.product((2, 4, 8), (2, 4, 8))))
@pytest.mark.parametrize("per_channel", [False, True])
def test_every_bits_pair_and_both_schemes(kbits, vbits, per_channel):
    kgroup = 32 if per_channel else 64
    check(stores(kbits=kbits, vbits=vbits, per_channel=per_channel, kgroup=kgroup, n=320))


@pytest.mark.parametrize("g", [1, 2, 3, 4, 7, 8, 9])
@pytest.mark.parametrize("d", [64, 128, 256, 80, 16])
def test_query_heads_per_kv_head_and_head_sizes(g, d):
    """g <= 8 and head_dim 64/128/256 take the register path, the rest the buffered one."""
    check(stores(g=g, d=d, kgroup=16, vgroup=16, n=150, kv_heads=1, batch=1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_channel", [False, True])
def test_half_precision_stores(dtype, per_channel):
    check(stores(dtype=dtype, per_channel=per_channel, kgroup=32, vgroup=64))


@pytest.mark.parametrize("per_channel", [False, True])
def test_masks_channel_scales_and_strided_stacked_views(per_channel):
    args = stores(masked=True, channel_scale=True, stacked=True, per_channel=per_channel, kgroup=32)
    assert not args[3].is_contiguous()
    check(args)


def test_no_sinks_no_residual_and_one_chunk():
    check(stores(sinks=0, residual=0, n=64))
    check(stores(sinks=0, residual=0, n=1000, g=7, kv_heads=2))


def test_a_fully_masked_row_is_nan_as_softmax_gives():
    args = list(stores(masked=True))
    bias = args[11]
    bias[1] = -torch.inf
    out = native.decode_layer(*args)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()


def test_bad_arguments_raise_instead_of_reading_out_of_bounds():
    args = list(stores())
    args[12] = 3  # key bits
    with pytest.raises(RuntimeError, match="key bits"):
        native.decode_layer(*args)
    args = list(stores(masked=True))
    args[11] = args[11][..., 1:]  # a bias one token short
    with pytest.raises(RuntimeError, match="bias covers"):
        native.decode_layer(*args)


def test_the_library_is_named_by_source_torch_and_flags():
    path = native.library_path()
    assert path.exists() and path.parent == native.cache_dir()
    assert path.name.startswith("kvtuner_native_") and path.suffix == ".so"


@pytest.mark.filterwarnings("ignore:kvtuner. building")
def test_a_failed_build_warns_once_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("KVTUNER_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.warns(UserWarning, match="not available"):
        assert native._load() is False
    assert not list(tmp_path.rglob("*.so"))  # nothing half-written


def _layer_with_history(head_dim=64):
    from kvtuner.cache import QuantizedKVLayer
    from kvtuner.precision import Layout, PrecisionPair

    gen = torch.Generator().manual_seed(0)
    layer = QuantizedKVLayer(PrecisionPair(4, 2), Layout(scheme="per-token", group_size=32))
    for n in (70, 1, 1):
        if layer.pending is not None:
            layer.finish_attention()
        layer.fused = n == 1
        layer.update(
            torch.randn(1, 2, n, head_dim, generator=gen),
            torch.randn(1, 2, n, head_dim, generator=gen),
        )
    return layer


@pytest.mark.parametrize("setting", ["1", "0"])
def test_decode_attention_takes_the_kernel_unless_turned_off(monkeypatch, setting):
    from kvtuner.attention import decode

    monkeypatch.setenv("KVTUNER_NATIVE", setting)
    calls = []
    real = native.decode_layer
    monkeypatch.setattr(native, "decode_layer", lambda *a: calls.append(1) or real(*a))
    layer = _layer_with_history()
    q = torch.randn(1, 6, 1, 64, generator=torch.Generator().manual_seed(1))
    out = decode.decode_attention(q, layer, None, 0.125)
    plain = decode.reference_decode_attention(q, layer, None, 0.125)
    assert len(calls) == (1 if setting == "1" else 0)
    assert ((out - plain).norm() / plain.norm()).item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [16, 64])
@pytest.mark.parametrize("smoothed", [False, True])
def test_quantize_rows_is_quantize_per_token_bit_for_bit(dtype, bits, group, smoothed):
    from kvtuner.quant.quantizer import quantize_per_token

    gen = torch.Generator().manual_seed(bits * group)
    x = (torch.randn(2, 3, 4, 5, 64, generator=gen) * 3).to(dtype)
    x[0, 0, 0, 0, 3] = float("nan")  # a non-finite group stays non-finite, as in torch
    x[0, 0, 0, 1, 40] = float("inf")
    x[1, 1, 1, 1, :16] = 0.5  # a constant group: scale 0
    cs = (torch.rand(2, 3, 4, 1, 64, generator=gen) + 0.3).to(dtype) if smoothed else None
    ref = quantize_per_token(x if cs is None else x / cs, bits, group)
    # into strided rows of larger buffers, as a store's spare rows are
    packed = torch.zeros(2, 3, 4, 9, 64 * bits // 8, dtype=torch.uint8)[..., 2:7, :]
    scale = torch.zeros(2, 3, 4, 9, 64 // group, dtype=dtype)[..., 2:7, :]
    zero = torch.zeros_like(scale)
    native.quantize_rows(x, cs, packed, scale, zero, bits, group)
    assert torch.equal(packed, ref.packed)
    assert torch.equal(scale.nan_to_num(7.0), ref.scale.nan_to_num(7.0))
    assert torch.equal(zero.nan_to_num(7.0), ref.zero.nan_to_num(7.0))


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_store_the_same_bytes_with_and_without_the_kernel(monkeypatch, smooth, dtype):
    from kvtuner.quant.store import TokenStore

    def fill(setting):
        monkeypatch.setenv("KVTUNER_NATIVE", setting)
        gen = torch.Generator().manual_seed(3)
        store = TokenStore(4, 32, smooth=smooth)
        for n in [40] + [1] * 30:  # the prompt, then decode steps (the buffer grows twice)
            store.append((torch.randn(2, 1, 2, n, 64, generator=gen) * 2).to(dtype))
        return store

    calls = []
    real = native.quantize_rows
    monkeypatch.setattr(native, "quantize_rows", lambda *a: calls.append(1) or real(*a))
    fast = fill("1")
    assert len(calls) == 30  # every decode step, not the prompt
    plain = fill("0")
    assert len(calls) == 30 and fast.seq_len == plain.seq_len == 70
    for a, b in zip((fast.packed, fast.scale, fast.zero), (plain.packed, plain.scale, plain.zero)):
        assert torch.equal(a, b)


def test_the_ops_trace_under_torch_compile():
    """A model compiled whole (fullgraph) can call the ops: they have fake (shape) kernels."""
    args = stores(n=128)
    tensors, ints = args[:12], args[12:]
    compiled = torch.compile(
        lambda *t: native.decode_layer(*t, *ints), backend="eager", fullgraph=True
    )
    assert torch.equal(compiled(*tensors), native.decode_layer(*args))
