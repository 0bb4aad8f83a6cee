"""ggml block bytes, checked byte for byte against the gguf package's numpy quantizers."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from kvtuner.formats.ggml_blocks import TYPE_SIZE, dequantize_blocks, quantize_blocks

QUANTIZABLE = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # gguf has no iq4_nl quantizer


def edge_rows() -> torch.Tensor:
    """All zeros, one large value, a negative maximum, a constant row, tiny values, ties."""
    rows = torch.zeros(6, 32)
    rows[1, 5] = 1000.0
    rows[2] = torch.linspace(-3, 1, 32)  # the largest magnitude is negative
    rows[3] = 0.75
    rows[4] = torch.linspace(-1e-6, 1e-6, 32)
    rows[5] = torch.arange(32) - 16.0  # integers: ties at x / d + 0.5
    return rows


def random_rows(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(200, 32, generator=g) * torch.rand(200, 1, generator=g) * 10


@pytest.mark.parametrize("kind", QUANTIZABLE)
@pytest.mark.parametrize(
    "rows", [random_rows(0), random_rows(1), edge_rows()], ids=["r0", "r1", "edge"]
)
def test_bytes_equal_gguf(kind, rows):
    mine = quantize_blocks(kind, rows).numpy()
    ref = quantize(rows.numpy(), getattr(Q, kind.upper()))
    assert mine.shape == (rows.shape[0], TYPE_SIZE[kind])
    np.testing.assert_array_equal(mine, ref)


@pytest.mark.parametrize("kind", QUANTIZABLE)
def test_dequantize_equals_gguf(kind):
    rows = torch.cat([random_rows(2), edge_rows()])
    raw = quantize(rows.numpy(), getattr(Q, kind.upper()))
    mine = dequantize_blocks(kind, torch.from_numpy(raw)).numpy()
    np.testing.assert_array_equal(mine, dequantize(raw, getattr(Q, kind.upper())))


def test_iq4_nl_dequantize_equals_gguf():
    g = torch.Generator().manual_seed(3)
    raw = torch.randint(0, 256, (50, 18), dtype=torch.uint8, generator=g)
    raw[:, :2] = torch.randn(50, generator=g).to(torch.float16).view(torch.uint8).reshape(50, 2)
    mine = dequantize_blocks("iq4_nl", raw).numpy()
    np.testing.assert_array_equal(mine, dequantize(raw.numpy(), Q.IQ4_NL))


def test_unknown_type_is_refused():
    with pytest.raises(ValueError, match="unknown ggml type"):
        quantize_blocks("q3_k", torch.zeros(1, 32))
