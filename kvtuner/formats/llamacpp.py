"""llama.cpp's `-ctk` / `-ctv` cache types: 32-value ggml blocks along head_dim, fp16 scales.

Since PR #21038 mainline rotates a quantized K and V cache with an orthonormal Hadamard matrix
before storing it, when head_dim % 64 == 0 (LLAMA_ATTN_ROT_DISABLE=1 turns it off); attention
rotates Q the same way and the output back, so the read side sees H (Q(H x)) [src/llama-kv-cache.cpp
`build_input_k_rot` / `build_input_v_rot`]. K uses the largest power-of-two chunk (>= 64) dividing
head_dim; V always uses chunks of 64. The block math is ggml_blocks (the `_ref` quantizers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kvtuner.formats.base import Encoded, require_head_dim
from kvtuner.formats.ggml_blocks import QK, TYPE_SIZE, dequantize_blocks, quantize_blocks
from kvtuner.formats.rotation import rotate_chunks

ROTATION_MIN = 64


def rotation_size(head_dim: int, role: Literal["k", "v"]) -> int | None:
    """Chunk size of mainline's K / V rotation for `head_dim`, or None when it does not rotate."""
    if head_dim % ROTATION_MIN:
        return None
    if role == "v":
        return ROTATION_MIN
    n = ROTATION_MIN
    while head_dim % (2 * n) == 0:
        n *= 2
    return n


@dataclass(frozen=True)
class LlamaCppType:
    """One ggml cache type for K (`role="k"`) or V; `rotate=False` is LLAMA_ATTN_ROT_DISABLE=1."""

    name: str
    engine_value: str
    role: Literal["k", "v"] = "k"
    rotate: bool = True

    def _rotation(self, head_dim: int) -> int | None:
        return rotation_size(head_dim, self.role) if self.rotate else None

    def quantize(self, x: torch.Tensor) -> Encoded:
        """`[..., seq, head_dim]` -> blocks uint8 `[..., seq, head_dim / 32 * type_size]`,
        the bytes a ggml tensor of this type holds (of the rotated rows when rotating)."""
        require_head_dim(self, x)
        rows = x.float()
        n = self._rotation(x.shape[-1])
        if n is not None:
            rows = rotate_chunks(rows, n)
        raw = quantize_blocks(self.engine_value, rows.reshape(-1, QK).contiguous())
        blocks = raw.reshape(*x.shape[:-1], -1)
        return Encoded({"blocks": blocks}, tuple(x.shape), x.dtype)

    def dequantize(self, enc: Encoded) -> torch.Tensor:
        """Back to `[..., seq, head_dim]` in the original basis and the input's dtype."""
        size = TYPE_SIZE[self.engine_value]
        rows = dequantize_blocks(self.engine_value, enc.data["blocks"].reshape(-1, size))
        rows = rows.reshape(enc.shape)
        n = self._rotation(enc.shape[-1])
        if n is not None:
            rows = rotate_chunks(rows, n)
        return rows.to(enc.dtype)

    def bits_per_element(self, head_dim: int) -> float:
        return TYPE_SIZE[self.engine_value] * 8 / QK

    def check_head_dim(self, head_dim: int) -> str | None:
        if head_dim % QK:
            return f"llama.cpp's {self.engine_value} stores blocks of 32 along head_dim: head_dim must be a multiple of 32; this model has {head_dim}"
        return None


GGML_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")
FORMATS = {f"llamacpp:{t}": LlamaCppType(f"llamacpp:{t}", t) for t in GGML_TYPES}
