"""E4M3 saturation and E2M1 rounding (nearest, ties to the even code), nibble packing."""

import pytest
import torch

from kvtuner.formats.floats import (
    E2M1_VALUES,
    e2m1_decode,
    e2m1_encode,
    pack_nibbles,
    to_e4m3,
    unpack_nibbles,
)


def e2m1_reference(v: float) -> float:
    """Nearest E2M1 magnitude by distance; on a tie the even code (index) wins; saturate at 6."""
    a = min(abs(v), 6.0)
    best = min(range(8), key=lambda i: (abs(E2M1_VALUES[i] - a), i % 2))
    return -E2M1_VALUES[best] if v < 0 else E2M1_VALUES[best]


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (0.25, 0.0),
        (0.75, 1.0),
        (1.25, 1.0),
        (1.75, 2.0),
        (2.5, 2.0),
        (3.5, 4.0),
        (5.0, 4.0),
        (5.01, 6.0),
        (7.0, 6.0),
        (1e9, 6.0),
        (-0.75, -1.0),
        (-3.5, -4.0),
        (0.26, 0.5),
    ],
)
def test_e2m1_ties_go_to_the_even_code(x, expected):
    assert e2m1_decode(e2m1_encode(torch.tensor([x]))).item() == expected == e2m1_reference(x)


def test_e2m1_matches_reference_on_a_grid():
    xs = torch.linspace(-7, 7, 2801)
    ref = torch.tensor([e2m1_reference(v) for v in xs.tolist()])
    assert torch.equal(e2m1_decode(e2m1_encode(xs)), ref)


def test_e2m1_sign_bit_and_codes():
    codes = e2m1_encode(torch.tensor([0.5, -0.5, 6.0, -6.0, -0.1]))
    assert codes.tolist() == [0x1, 0x9, 0x7, 0xF, 0x8]  # -0.1 rounds to -0, sign kept


def test_e4m3_saturates_instead_of_nan():
    x = torch.tensor([500.0, -1e6, 448.0, 449.0, 0.1])
    y = to_e4m3(x).float()
    assert y.tolist()[:4] == [448.0, -448.0, 448.0, 448.0]
    assert not torch.isnan(y).any()


def test_nibbles_round_trip_even_index_low():
    codes = torch.randint(
        0, 16, (3, 5, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    packed = pack_nibbles(codes)
    assert packed.shape == (3, 5, 4)
    assert torch.equal(packed & 0xF, codes[..., 0::2])
    assert torch.equal(unpack_nibbles(packed), codes)
