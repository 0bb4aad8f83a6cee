"""Quantizers with real packed storage: per-token and per-channel min/max, 2/4/8 bits."""

from kvtuner.quant.packing import pack, packed_size, unpack
from kvtuner.quant.quantizer import (
    QuantizedTensor,
    dequantize,
    dequantize_parts,
    dequantize_reference,
    fake_quantize,
    quantize_per_channel,
    quantize_per_token,
)

__all__ = [
    "QuantizedTensor",
    "dequantize",
    "dequantize_parts",
    "dequantize_reference",
    "fake_quantize",
    "pack",
    "packed_size",
    "quantize_per_channel",
    "quantize_per_token",
    "unpack",
]
