"""ModelOpt's KV candidates: FP8 and NVFP4 reuse the engine math; FP8-K/NVFP4-V is a pair."""

import pytest
import torch

from kvtuner.formats import PAIRS, fake_quantize, get_format
from kvtuner.formats.modelopt import FP8_K_NVFP4_V


def test_fp8_is_vllms_fp8_math():
    x = torch.randn(2, 4, 5, 64, generator=torch.Generator().manual_seed(0))
    a = get_format("modelopt:fp8").quantize(x)
    b = get_format("vllm:fp8_e4m3").quantize(x)
    assert a.meta == b.meta
    assert torch.equal(a.data["codes"].view(torch.uint8), b.data["codes"].view(torch.uint8))


def test_nvfp4_is_the_shared_nvfp4():
    x = torch.randn(2, 4, 5, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(
        fake_quantize(get_format("modelopt:nvfp4"), x), fake_quantize(get_format("vllm:nvfp4"), x)
    )


def test_fp8_k_nvfp4_v_pair():
    pair = PAIRS["modelopt:fp8_k_nvfp4_v"]
    assert pair is FP8_K_NVFP4_V
    assert pair.engine_value == "FP8_K_NVFP4_V"
    assert pair.key.name == "modelopt:fp8" and pair.value.name == "modelopt:nvfp4"
    # ModelOpt's effective bits: FP8 8, NVFP4 4.5
    assert pair.bits_per_element(128) == pytest.approx((8 + 4.5) / 2)
    assert PAIRS["modelopt:fp8_kv"].bits_per_element(128) == 8
    assert PAIRS["modelopt:nvfp4_kv"].bits_per_element(128) == 4.5


def test_pair_refuses_what_either_side_refuses():
    assert FP8_K_NVFP4_V.check_head_dim(128) is None
    assert "multiple of 16" in FP8_K_NVFP4_V.check_head_dim(40)
