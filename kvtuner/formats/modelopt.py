"""NVIDIA ModelOpt / TensorRT-LLM KV formats: the candidates of ModelOpt's KV AutoQuantize.

- FP8: E4M3 with one scale per tensor, amax / 448 under max calibration (the same math as vLLM's
  fp8_e4m3, kvtuner.formats.vllm.Fp8PerTensor).
- NVFP4: E2M1 in blocks of 16 with an E4M3 block scale and a per-tensor scale amax / (448 * 6)
  (kvtuner.formats.nvfp4).
- FP8-K / NVFP4-V: a pair, FP8 keys with NVFP4 values; exported per layer as "FP8_K_NVFP4_V"
  [NVIDIA/Model-Optimizer tests/unit/torch/export/test_convert_hf_config.py].
Per-layer names in hf_quant_config.json: "FP8", "NVFP4", "FP8_K_NVFP4_V".
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtuner.formats.base import KVFormat
from kvtuner.formats.nvfp4 import NVFP4
from kvtuner.formats.vllm import Fp8PerTensor

FP8 = Fp8PerTensor(name="modelopt:fp8", engine_value="FP8")
NVFP4_KV = NVFP4(name="modelopt:nvfp4", engine_value="NVFP4")


@dataclass(frozen=True)
class KVPair:
    """A per-layer KV choice: one format for keys, one for values, and the engine's name for it."""

    name: str
    engine_value: str
    key: KVFormat
    value: KVFormat

    def bits_per_element(self, head_dim: int) -> float:
        """Mean storage bits of a K and a V element."""
        return (self.key.bits_per_element(head_dim) + self.value.bits_per_element(head_dim)) / 2

    def check_head_dim(self, head_dim: int) -> str | None:
        return self.key.check_head_dim(head_dim) or self.value.check_head_dim(head_dim)


FP8_KV = KVPair("modelopt:fp8_kv", "FP8", FP8, FP8)
NVFP4_KV_PAIR = KVPair("modelopt:nvfp4_kv", "NVFP4", NVFP4_KV, NVFP4_KV)
FP8_K_NVFP4_V = KVPair("modelopt:fp8_k_nvfp4_v", "FP8_K_NVFP4_V", FP8, NVFP4_KV)
PAIRS = {p.name: p for p in (FP8_KV, NVFP4_KV_PAIR, FP8_K_NVFP4_V)}
