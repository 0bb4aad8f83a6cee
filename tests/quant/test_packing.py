import pytest
import torch

from kvtuner.quant.packing import pack, packed_size, unpack


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 9, 13), (4, 64), (1, 2, 1, 255)])
def test_pack_unpack_round_trip_is_exact(bits, shape):
    gen = torch.Generator().manual_seed(sum(shape) + bits)
    codes = torch.randint(0, 1 << bits, shape, generator=gen, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], packed_size(shape[-1], bits))
    assert torch.equal(unpack(packed, bits, shape[-1]), codes)


def test_packed_layout_matches_the_documented_diagram():
    codes = torch.tensor([1, 2, 3, 0, 2, 1, 3, 3], dtype=torch.uint8)
    # 2 bits, planes of m = 2: byte i = c[i] | c[2 + i] << 2 | c[4 + i] << 4 | c[6 + i] << 6
    assert pack(codes, 2).tolist() == [1 | 3 << 2 | 2 << 4 | 3 << 6, 2 | 0 << 2 | 1 << 4 | 3 << 6]
    # 4 bits, planes of m = 4: byte i = c[i] | c[4 + i] << 4
    assert pack(codes, 4).tolist() == [1 | 2 << 4, 2 | 1 << 4, 3 | 3 << 4, 0 | 3 << 4]
    # an odd row is padded with zero codes: 5 codes -> planes of 3
    assert pack(codes[:5], 4).tolist() == [1 | 0 << 4, 2 | 2 << 4, 3 | 0 << 4]


def test_packing_is_dense():
    assert packed_size(64, 2) == 16
    assert packed_size(64, 4) == 32
    assert packed_size(64, 8) == 64
    assert packed_size(65, 4) == 33


def test_appending_rows_is_concatenation_of_packed_rows():
    a = torch.randint(0, 16, (3, 10), dtype=torch.uint8)
    b = torch.randint(0, 16, (2, 10), dtype=torch.uint8)
    assert torch.equal(torch.cat([pack(a, 4), pack(b, 4)]), pack(torch.cat([a, b]), 4))


def test_unsupported_bits_raise():
    with pytest.raises(ValueError, match="bits"):
        pack(torch.zeros(4, dtype=torch.uint8), 3)
