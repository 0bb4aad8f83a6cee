"""The name -> format registry: every format's interface, storage table, overrides, refusals."""

import pytest
import torch

from kvtuner.formats import FORMATS, KVFormat, check_head_dim, fake_quantize, get_format, nbytes

# real storage bits per element at head_dim 128 (scales included; LMDeploy with a 16-bit model)
BITS_AT_128 = {
    "vllm:fp8_e4m3": 8.0,
    "vllm:int8_per_token_head": 8 + 32 / 128,
    "vllm:fp8_per_token_head": 8 + 32 / 128,
    "vllm:int4_per_token_head": 4 + 32 / 128,
    "vllm:nvfp4": 4.5,
    "llamacpp:q8_0": 8.5,
    "llamacpp:q4_0": 4.5,
    "llamacpp:q4_1": 5.0,
    "llamacpp:q5_0": 5.5,
    "llamacpp:q5_1": 6.0,
    "llamacpp:iq4_nl": 4.5,
    "lmdeploy:int4": 4 + 2 * 16 / 128,
    "lmdeploy:int8": 8 + 2 * 16 / 128,
    "modelopt:fp8": 8.0,
    "modelopt:nvfp4": 4.5,
}


def test_every_format_is_registered_with_its_storage():
    assert set(FORMATS) == set(BITS_AT_128)
    for name, fmt in FORMATS.items():
        assert isinstance(fmt, KVFormat)
        assert fmt.name == name
        assert fmt.bits_per_element(128) == BITS_AT_128[name], name


@pytest.mark.parametrize("name", sorted(BITS_AT_128))
def test_parts_hold_exactly_nbytes_and_round_trip_keeps_shape_and_dtype(name):
    fmt = get_format(name)
    x = torch.randn(1, 2, 5, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    enc = fmt.quantize(x)
    assert enc.nbytes() == nbytes(fmt, tuple(x.shape)) == BITS_AT_128[name] * x.numel() / 8
    y = fake_quantize(fmt, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    rel = (y.float() - x.float()).pow(2).mean() / x.float().pow(2).mean()
    assert rel < 0.05, name  # every format here is at least ~13 dB on a Gaussian


def test_overrides_replace_fields():
    v = get_format("llamacpp:q4_0", role="v", rotate=False)
    assert (v.role, v.rotate) == ("v", False)
    assert get_format("llamacpp:q4_0").role == "k"  # the registered one is unchanged
    assert get_format("vllm:fp8_e4m3", scale=0.5).scale == 0.5


def test_unknown_names_list_the_known_ones():
    with pytest.raises(KeyError, match="vllm:int4_per_token_head"):
        get_format("vllm:int3")


@pytest.mark.parametrize(
    ("name", "head_dim", "rule"),
    [
        ("vllm:int4_per_token_head", 96, "power of two"),
        ("llamacpp:q8_0", 80, "multiple of 32"),
        ("vllm:nvfp4", 72, "multiple of 16"),
        ("modelopt:fp8_k_nvfp4_v", 72, "multiple of 16"),
        ("lmdeploy:int4", 63, "even"),
    ],
)
def test_check_head_dim_gives_one_line(name, head_dim, rule):
    msg = check_head_dim(name, head_dim)
    assert rule in msg and "\n" not in msg
    assert check_head_dim(name, 128) is None
