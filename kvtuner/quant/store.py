"""Token stores: the KV history of one tensor (keys or values) of one layer, as it is really held.

Every store takes full-precision tokens `[batch, kv_heads, n, head_dim]` with `append`, holds them
in its own form, and gives them back dequantized with `read`. Appending never re-quantizes what is
already stored: packed rows are concatenated.

- `RawStore`: 16 bits, kept as is.
- `TokenStore`: per-token groups along head_dim (one scale/zero per token per group).
- `ChannelStore`: per-channel groups of `block` tokens (KIVI keys); appends whole blocks only.

A layer holds its keys and values as `SeparateKV` (two stores, each its own bits and grouping) or,
when both have the same bits and grouping, as `StackedKV`: one store of `[2, batch, ...]` tensors,
so each decode step runs every quantize/dequantize kernel once for both (the number of small
kernels, not their size, is what a one-token step costs on CPU). Both take and give keys and
values stacked `[2, batch, kv_heads, n, head_dim]`, and `read` can write into a slice of the
caller's output buffer.
"""

from __future__ import annotations

import torch

from kvtuner.quant.quantizer import dequantize_parts, quantize_per_channel, quantize_per_token

SMOOTH_WARMUP = 32  # tokens whose per-channel magnitudes fix a smoothed store's channel scale


def cat_tokens(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    """Concatenate along tokens, skipping the copy when either side is empty."""
    if a is None or a.shape[-2] == 0:
        return b
    return a if b.shape[-2] == 0 else torch.cat([a, b], dim=-2)


class RawStore:
    """Unquantized history (16 bits)."""

    block = 1

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None

    @property
    def seq_len(self) -> int:
        return 0 if self.data is None else self.data.shape[-2]

    def append(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        self.data = cat_tokens(self.data, x)

    def read(self, start: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens `[start:]` as `[batch, kv_heads, n, head_dim]` (a view, or copied into `out`)."""
        assert self.data is not None
        return self.data[..., start:, :] if out is None else out.copy_(self.data[..., start:, :])

    def drop_front(self, n: int) -> None:
        if n and self.data is not None:
            self.data = self.data[..., n:, :].clone()

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.data is None else [self.data]

    def index_batch(self, index: torch.Tensor, dim: int = 0) -> None:
        if self.data is not None:
            self.data = self.data.index_select(dim, index.to(self.data.device))


class _PackedStore:
    """Packed codes `[b, h, n, head_dim*bits/8]` plus scale/zero; subclasses say how groups run."""

    block = 1

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.packed: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.zero: torch.Tensor | None = None
        self.head_dim = 0

    @property
    def seq_len(self) -> int:
        return 0 if self.packed is None else self.packed.shape[-2]

    def _extend(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        self.packed = cat_tokens(self.packed, packed)
        self.scale = cat_tokens(self.scale, scale)
        self.zero = None if zero is None else cat_tokens(self.zero, zero)

    def drop_front(self, n: int) -> None:
        """Drop the first `n` tokens (whole blocks); copies, so the dropped bytes are freed."""
        if not n or self.packed is None:
            return
        assert n % self.block == 0, "a store drops whole blocks only"
        rows = n // self.block  # scale/zero rows: one per token, or one per block
        self.packed = self.packed[..., n:, :].clone()
        self.scale = self.scale[..., rows:, :].clone()
        self.zero = None if self.zero is None else self.zero[..., rows:, :].clone()

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.packed, self.scale, self.zero) if t is not None]

    def index_batch(self, index: torch.Tensor, dim: int = 0) -> None:
        for name in ("packed", "scale", "zero"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(dim, index.to(t.device)))


class TokenStore(_PackedStore):
    """Per-token quantized history: scale/zero `[b, h, n, head_dim / group_size]`.

    With `smooth`, channels are divided by a per-channel scale before quantization and multiplied
    back after: the largest magnitude each channel reached over the first `warmup` stored tokens
    (the prompt, usually), frozen then. A channel whose keys run 16 times larger than its
    neighbours' no longer sets the step of their whole group. Tokens stored before the scale was
    frozen (a prompt shorter than `warmup`) keep the plain grouping.
    """

    def __init__(
        self, bits: int, group_size: int, smooth: bool = False, warmup: int = SMOOTH_WARMUP
    ) -> None:
        super().__init__(bits)
        self.group_size = group_size
        self.smooth = smooth
        self.warmup = warmup
        self.seen = 0  # tokens observed for the per-channel scale (a host-side count)
        self.peak: torch.Tensor | None = None  # running per-channel max |x|, `[..., 1, head_dim]`
        self.channel_scale: torch.Tensor | None = None  # the frozen divisor, same shape
        self.smooth_from = 0  # first stored token divided by it

    def _observe(self, x: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Fold `x` into the per-channel peak; freeze the scale once `warmup` tokens were seen."""
        magnitude = x.abs()
        if valid is not None:  # padded positions hold no information about the channels
            magnitude = magnitude.masked_fill(~valid, 0.0)
        peak = magnitude.amax(dim=-2, keepdim=True)
        self.peak = peak if self.peak is None else torch.maximum(self.peak, peak)
        self.seen += x.shape[-2]
        if self.seen >= self.warmup:
            # a floor keeps a channel that stayed near zero from blowing up later tokens
            floor = self.peak.float().mean(-1, keepdim=True) * 1e-2 + 1e-12
            self.channel_scale = torch.maximum(self.peak.float(), floor).to(x.dtype)
            self.peak = None
            self.smooth_from = self.seq_len

    def append(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Append tokens `[..., n, head_dim]`; each token is its own group (`valid` only keeps
        padding out of the per-channel scale)."""
        if self.smooth and self.channel_scale is None:
            self._observe(x, valid)
        if self.channel_scale is not None:
            x = x / self.channel_scale
        q = quantize_per_token(x, self.bits, self.group_size)
        self.head_dim = q.head_dim
        self._extend(q.packed, q.scale, q.zero)

    def read(self, start: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens `[start:]`, dequantized: `[b, h, n - start, head_dim]` (into `out` if given)."""
        assert self.packed is not None and self.scale is not None
        out = dequantize_parts(
            self.packed[..., start:, :],
            self.scale[..., start:, :],
            None if self.zero is None else self.zero[..., start:, :],
            self.bits,
            self.head_dim,
            self.group_size,
            per_channel=False,
            out=out,
        )
        if self.channel_scale is not None:
            out[..., max(self.smooth_from - start, 0) :, :].mul_(self.channel_scale)
        return out

    def drop_front(self, n: int) -> None:
        super().drop_front(n)
        self.smooth_from = max(self.smooth_from - n, 0)

    def tensors(self) -> list[torch.Tensor]:
        extra = [t for t in (self.peak, self.channel_scale) if t is not None]
        return super().tensors() + extra

    def index_batch(self, index: torch.Tensor, dim: int = 0) -> None:
        super().index_batch(index, dim)
        for name in ("peak", "channel_scale"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(dim, index.to(t.device)))


class ChannelStore(_PackedStore):
    """Per-channel quantized history in blocks of `block` tokens (KIVI keys): scale/zero `[b, h, n / block, head_dim]`."""

    def __init__(self, bits: int, block: int) -> None:
        super().__init__(bits)
        self.block = block

    def append(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Append whole blocks: `x` is `[b, h, k * block, head_dim]`; `valid` (bool `[b, 1, k * block,
        1]`) leaves padded tokens out of each block's min and max."""
        q = quantize_per_channel(x, self.bits, self.block, valid=valid)
        self.head_dim = q.head_dim
        self._extend(q.packed, q.scale, q.zero)

    def read(self, start: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens `[start:]`, dequantized from the block holding `start` (into `out` if given)."""
        assert self.packed is not None and self.scale is not None
        first_block = start // self.block
        token0 = first_block * self.block
        aligned = start == token0
        blocks = dequantize_parts(
            self.packed[..., token0:, :],
            self.scale[..., first_block:, :],
            None if self.zero is None else self.zero[..., first_block:, :],
            self.bits,
            self.head_dim,
            self.block,
            per_channel=True,
            dtype=None if out is None else out.dtype,
            out=out if aligned else None,
        )
        if aligned:
            return blocks
        tail = blocks[..., start - token0 :, :]
        return tail if out is None else out.copy_(tail)


Store = RawStore | TokenStore | ChannelStore


class SeparateKV:
    """Keys and values of one layer in two stores."""

    def __init__(self, keys: Store, values: Store) -> None:
        self.keys, self.values = keys, values

    @property
    def seq_len(self) -> int:
        return self.keys.seq_len

    def append(self, states: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Append stacked `[2, b, h, n, head_dim]` keys and values (`valid`: see ChannelStore)."""
        self.keys.append(states[0], valid)
        self.values.append(states[1], valid)

    def read(self, start: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens `[start:]` of keys and values, stacked `[2, b, h, n, head_dim]` (into `out`)."""
        if out is None:
            return torch.stack((self.keys.read(start), self.values.read(start)))
        self.keys.read(start, out[0])
        self.values.read(start, out[1])
        return out

    def drop_front(self, n: int) -> None:
        self.keys.drop_front(n)
        self.values.drop_front(n)

    def tensors(self) -> list[torch.Tensor]:
        return self.keys.tensors() + self.values.tensors()

    def index_batch(self, index: torch.Tensor) -> None:
        self.keys.index_batch(index)
        self.values.index_batch(index)


class StackedKV:
    """Keys and values with the same bits and grouping, held stacked in one store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @property
    def seq_len(self) -> int:
        return self.store.seq_len

    def append(self, states: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Append stacked `[2, b, h, n, head_dim]` keys and values (`valid`: see TokenStore)."""
        self.store.append(states, valid)

    def read(self, start: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens `[start:]` of keys and values, stacked `[2, b, h, n, head_dim]` (into `out`)."""
        return self.store.read(start, out)

    def drop_front(self, n: int) -> None:
        self.store.drop_front(n)

    def tensors(self) -> list[torch.Tensor]:
        return self.store.tensors()

    def index_batch(self, index: torch.Tensor) -> None:
        self.store.index_batch(index, dim=1)  # dim 0 tells keys from values


def make_kv_stores(
    key_bits: int,
    value_bits: int,
    *,
    kivi: bool,
    group_size: int,
    block_size: int,
    smooth: bool = False,
) -> SeparateKV | StackedKV:
    """A layer's stores: per-channel KIVI keys or different bits keep two stores, else one stacked.

    `group_size` is the channels per per-token group (a divisor of head_dim); `block_size` the
    tokens per KIVI key block; `smooth` gives per-token stores per-channel scales.
    """
    if not kivi and key_bits == value_bits:
        return StackedKV(make_store(key_bits, per_channel=False, group=group_size, smooth=smooth))
    key_group = block_size if kivi else group_size
    return SeparateKV(
        make_store(key_bits, per_channel=kivi, group=key_group, smooth=smooth),
        make_store(value_bits, per_channel=False, group=group_size, smooth=smooth),
    )


def make_store(bits: int, *, per_channel: bool, group: int, smooth: bool = False) -> Store:
    """The store for one tensor: raw at 16 bits, per-channel blocks of `group` tokens for KIVI keys,
    else per-token groups of `group` channels (per-channel scaled when `smooth`)."""
    if bits == 16:
        return RawStore()
    if per_channel:
        return ChannelStore(bits, group)
    return TokenStore(bits, group, smooth)
