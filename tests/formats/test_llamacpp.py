"""llama.cpp cache types on `[..., seq, head_dim]`: gguf's bytes, mainline's rotation, head sizes."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from kvtuner.formats import fake_quantize, get_format, nbytes
from kvtuner.formats.llamacpp import GGML_TYPES, rotation_size
from kvtuner.formats.rotation import rotate_chunks


def ggml_gen_hadamard(n: int) -> np.ndarray:
    """src/llama-kv-cache.cpp `ggml_gen_hadamard`, loop for loop."""
    data = np.zeros((n, n), dtype=np.float32)
    data[0, 0] = 1.0 / np.sqrt(np.float32(n))
    s = 1
    while s < n:
        for i in range(s):
            for j in range(s):
                val = data[i, j]
                data[i + s, j] = val
                data[i, j + s] = val
                data[i + s, j + s] = -val
        s *= 2
    return data


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10(x.pow(2).mean() / (x - y).pow(2).mean()))


def kv(head_dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 9, head_dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_unrotated_bytes_equal_gguf_rows(kind):
    x = kv(96)  # 96 % 64 != 0: mainline does not rotate this head size anyway
    x[0, 0, 0] = 0.0
    x[0, 0, 1, 17] = -40.0
    for rotate in (True, False):
        enc = get_format(f"llamacpp:{kind}", rotate=rotate).quantize(x)
        ref = quantize(x.reshape(-1, 96).numpy(), getattr(Q, kind.upper()))
        np.testing.assert_array_equal(enc.data["blocks"].reshape(ref.shape).numpy(), ref)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q5_1"])
@pytest.mark.parametrize("role", ["k", "v"])
def test_rotated_bytes_are_gguf_of_the_rotated_rows(kind, role):
    x = kv(128, seed=1)
    n = rotation_size(128, role)
    rotated = rotate_chunks(x, n)
    enc = get_format(f"llamacpp:{kind}", role=role).quantize(x)
    ref = quantize(rotated.reshape(-1, 128).numpy(), getattr(Q, kind.upper()))
    np.testing.assert_array_equal(enc.data["blocks"].reshape(ref.shape).numpy(), ref)


def test_rotation_matrix_is_ggmls_and_its_own_inverse():
    for n in (64, 128, 256):
        h = torch.from_numpy(ggml_gen_hadamard(n))
        x = torch.randn(5, n, generator=torch.Generator().manual_seed(n))
        torch.testing.assert_close(rotate_chunks(x, n), x @ h, rtol=0, atol=1e-5)
        torch.testing.assert_close(rotate_chunks(rotate_chunks(x, n), n), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("head_dim", "k", "v"),
    [
        (64, 64, 64),
        (128, 128, 64),
        (192, 64, 64),
        (256, 256, 64),
        (96, None, None),
        (80, None, None),
    ],
)
def test_rotation_sizes_follow_mainline(head_dim, k, v):
    # build_input_k_rot: the largest power of two >= 64 dividing head_dim; build_input_v_rot: 64
    assert rotation_size(head_dim, "k") == k
    assert rotation_size(head_dim, "v") == v


def test_rotation_spreads_an_outlier_channel():
    x = kv(128, seed=2)
    x[..., 3] *= 30  # one outlier channel, as keys often have
    plain = fake_quantize(get_format("llamacpp:q4_0", rotate=False), x)
    rotated = fake_quantize(get_format("llamacpp:q4_0"), x)
    assert sqnr_db(x, rotated) > sqnr_db(x, plain) + 3


@pytest.mark.parametrize(
    ("kind", "bits", "min_db"),
    [
        ("q8_0", 8.5, 40.0),
        ("q5_0", 5.5, 25.0),
        ("q5_1", 6.0, 25.0),
        ("q4_0", 4.5, 18.0),
        ("q4_1", 5.0, 18.0),
        ("iq4_nl", 4.5, 19.0),
    ],
)
def test_storage_and_round_trip(kind, bits, min_db):
    fmt = get_format(f"llamacpp:{kind}")
    x = kv(128, seed=3).to(torch.bfloat16)
    enc = fmt.quantize(x)
    assert fmt.bits_per_element(128) == bits
    assert enc.nbytes() == nbytes(fmt, tuple(x.shape)) == bits * x.numel() / 8
    y = fmt.dequantize(enc)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    assert sqnr_db(x.float(), y.float()) >= min_db


def test_q8_0_error_is_at_most_half_a_step():
    x = kv(64, seed=4)
    fmt = get_format("llamacpp:q8_0", rotate=False)
    d = x.reshape(-1, 32).abs().amax(-1, keepdim=True) / 127
    err = (fake_quantize(fmt, x) - x).reshape(-1, 32).abs()
    # half a step, plus the fp16 rounding of d (relative 2^-11) times the largest code
    assert bool((err <= d / 2 + 127 * d * 2**-11 + 1e-7).all())


@pytest.mark.parametrize("kind", GGML_TYPES)
def test_head_sizes_not_multiple_of_32_are_refused(kind):
    fmt = get_format(f"llamacpp:{kind}")
    assert fmt.check_head_dim(128) is None
    msg = fmt.check_head_dim(80)
    assert msg is not None and "multiple of 32" in msg and "80" in msg
    with pytest.raises(ValueError, match="multiple of 32"):
        fmt.quantize(torch.zeros(1, 1, 2, 80))
