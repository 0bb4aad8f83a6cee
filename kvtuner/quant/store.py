"""Token stores: the KV history of one tensor (keys or values) of one layer, as it is really held.

Every store takes full-precision tokens `[batch, kv_heads, n, head_dim]` with `append`, holds them
in its own form, and gives them back dequantized with `read`, or as they are held with `view`
(what the fused decode attention reads). Appending never re-quantizes what is already stored:
packed rows go into a `TokenBuffer`, which grows with spare room instead of copying the history at
every token.

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

from dataclasses import dataclass

import torch

from kvtuner import compiling
from kvtuner.attention import native
from kvtuner.quant.buffer import MIN_SPARE, TokenBuffer
from kvtuner.quant.packing import packed_size
from kvtuner.quant.quantizer import dequantize_parts, quantize_per_channel, quantize_per_token

SMOOTH_WARMUP = 32  # tokens whose per-channel magnitudes fix a smoothed store's channel scale
APPEND_CHUNK = 2048  # a long prompt is quantized this many tokens at a time (bounded transients)


@dataclass(frozen=True)
class RawView:
    """Live full-precision rows `[..., n, head_dim]` of a 16-bit store."""

    data: torch.Tensor


@dataclass(frozen=True)
class PackedView:
    """Live rows of a packed store, as held (views, no copy).

    packed: uint8 `[..., n, ceil(head_dim * bits / 8)]`; per token: scale/zero `[..., n, head_dim /
    group]`; per channel (KIVI keys): scale/zero `[..., n / group, head_dim]` (n whole blocks).
    channel_scale `[..., 1, head_dim]` multiplies tokens `smooth_from:` back (smoothing), or None.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    head_dim: int
    group: int
    per_channel: bool
    channel_scale: torch.Tensor | None = None
    smooth_from: int = 0

    @property
    def seq_len(self) -> int:
        return self.packed.shape[-2]

    def select(self, index: int) -> PackedView:
        """Entry `index` of the leading axis (keys 0 / values 1 of a stacked store)."""
        cs = None if self.channel_scale is None else self.channel_scale[index]
        return PackedView(
            self.packed[index],
            self.scale[index],
            self.zero[index],
            self.bits,
            self.head_dim,
            self.group,
            self.per_channel,
            cs,
            self.smooth_from,
        )


StoreView = RawView | PackedView


def cat_tokens(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    """Concatenate along tokens, skipping the copy when either side is empty."""
    if a is None or a.shape[-2] == 0:
        return b
    return a if b.shape[-2] == 0 else torch.cat([a, b], dim=-2)


class RawStore:
    """Unquantized history (16 bits)."""

    block = 1

    def __init__(self) -> None:
        self.rows = TokenBuffer()

    @property
    def seq_len(self) -> int:
        return len(self.rows)

    @property
    def data(self) -> torch.Tensor | None:
        return self.rows.view()

    def append(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        self.rows.append(x)

    def read(self, start: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens `[start:]` as `[batch, kv_heads, n, head_dim]` (a view, or copied into `out`)."""
        assert self.data is not None
        return self.data[..., start:, :] if out is None else out.copy_(self.data[..., start:, :])

    def view(self) -> RawView:
        return RawView(self.rows.view())

    def reserve(self, tokens: int) -> None:
        self.rows.reserve(tokens)

    def drop_front(self, n: int, compact: bool = False) -> None:
        self.rows.drop_front(n, compact)

    def tensors(self) -> list[torch.Tensor]:
        return self.rows.tensors()

    def live_tensors(self) -> list[torch.Tensor]:
        return [] if self.seq_len == 0 else [self.rows.view()]

    def index_batch(self, index: torch.Tensor, dim: int = 0) -> None:
        self.rows.index_select(dim, index)


class _PackedStore:
    """Packed codes `[b, h, n, head_dim*bits/8]` plus scale/zero; subclasses say how groups run."""

    block = 1

    def __init__(self, bits: int) -> None:
        self.bits = bits
        # codes grow by whole blocks; scale/zero rows are one per token or one per block
        self._packed = TokenBuffer(self.block)
        rows = max(MIN_SPARE // self.block, 1)  # scale/zero rows a growth adds at least
        self._scale = TokenBuffer(min_spare=rows)
        self._zero = TokenBuffer(min_spare=rows)
        self.head_dim = 0

    @property
    def seq_len(self) -> int:
        return len(self._packed)

    @property
    def packed(self) -> torch.Tensor | None:
        return self._packed.view()

    @property
    def scale(self) -> torch.Tensor | None:
        return self._scale.view()

    @property
    def zero(self) -> torch.Tensor | None:
        return self._zero.view()

    def _extend(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self._packed.append(packed)
        self._scale.append(scale)
        self._zero.append(zero)

    def drop_front(self, n: int, compact: bool = False) -> None:
        """Drop the first `n` tokens (whole blocks); `compact` frees their bytes now, else the
        rows are reused by later appends."""
        if not n or self.seq_len == 0:
            return
        assert n % self.block == 0, "a store drops whole blocks only"
        rows = n // self.block  # scale/zero rows: one per token, or one per block
        self._packed.drop_front(n, compact)
        self._scale.drop_front(rows, compact)
        self._zero.drop_front(rows, compact)

    def reserve(self, tokens: int) -> None:
        """The store will hold `tokens` tokens at most (whole blocks): allocate no more."""
        self._packed.reserve(tokens)
        self._scale.reserve(tokens // self.block)
        self._zero.reserve(tokens // self.block)

    def tensors(self) -> list[torch.Tensor]:
        return self._packed.tensors() + self._scale.tensors() + self._zero.tensors()

    def live_tensors(self) -> list[torch.Tensor]:
        """The live rows only (spare capacity left out)."""
        return [] if self.seq_len == 0 else [self.packed, self.scale, self.zero]

    def index_batch(self, index: torch.Tensor, dim: int = 0) -> None:
        for buffer in (self._packed, self._scale, self._zero):
            buffer.index_select(dim, index)


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
        self.appended = 0  # tokens ever appended (a sliding window drops some): when to compile

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
        self.appended += x.shape[-2]
        if x.shape[-2] == 1 and self._native_step(x):
            return
        if x.shape[-2] == 1 and compiling.compiled(_quantize_token, self.appended) is not None:
            # a decode step: one fused kernel instead of a dozen tiny ones
            packed, scale, zero = compiling.run(
                _quantize_token, self.appended, x, self.channel_scale, self.bits, self.group_size
            )
            self.head_dim = x.shape[-1]
            self._extend(packed, scale, zero)
            return
        for first in range(0, x.shape[-2], APPEND_CHUNK):
            part = x[..., first : first + APPEND_CHUNK, :]
            if self.channel_scale is not None:
                part = part / self.channel_scale
            q = quantize_per_token(part, self.bits, self.group_size)
            self.head_dim = q.head_dim
            self._extend(q.packed, q.scale, q.zero)

    def _native_step(self, x: torch.Tensor) -> bool:
        """A decode step on the CPU: kvtuner's kernel quantizes the token straight into the
        buffers' next rows (bit for bit what `quantize_per_token` gives). False where it cannot."""
        if x.device.type != "cpu" or self.packed is None or not x.dtype.is_floating_point:
            return False
        if not (native.enabled() and native.available()):
            return False
        if self.channel_scale is not None and self.channel_scale.dtype != x.dtype:
            return False
        rows = x.shape
        width = packed_size(rows[-1], self.bits)
        group = self.group_size or rows[-1]
        groups = rows[-1] // group
        packed = self._packed.claim((*rows[:-1], width), torch.uint8, x.device)
        scale = self._scale.claim((*rows[:-1], groups), x.dtype, x.device)
        zero = self._zero.claim((*rows[:-1], groups), x.dtype, x.device)
        native.quantize_rows(x, self.channel_scale, packed, scale, zero, self.bits, group)
        self.head_dim = rows[-1]
        return True

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

    def view(self) -> PackedView:
        return PackedView(
            self.packed,
            self.scale,
            self.zero,
            self.bits,
            self.head_dim,
            self.group_size,
            False,
            self.channel_scale,
            self.smooth_from,
        )

    def drop_front(self, n: int, compact: bool = False) -> None:
        super().drop_front(n, compact)
        self.smooth_from = max(self.smooth_from - n, 0)

    def tensors(self) -> list[torch.Tensor]:
        return super().tensors() + self._smoothing()

    def live_tensors(self) -> list[torch.Tensor]:
        return super().live_tensors() + self._smoothing()

    def _smoothing(self) -> list[torch.Tensor]:
        return [t for t in (self.peak, self.channel_scale) if t is not None]

    def index_batch(self, index: torch.Tensor, dim: int = 0) -> None:
        super().index_batch(index, dim)
        for name in ("peak", "channel_scale"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(dim, index.to(t.device)))


def _quantize_token(
    x: torch.Tensor, channel_scale: torch.Tensor | None, bits: int, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`TokenStore.append`'s quantization as one function (compiled for decode steps)."""
    if channel_scale is not None:
        x = x / channel_scale
    q = quantize_per_token(x, bits, group)
    return q.packed, q.scale, q.zero


class ChannelStore(_PackedStore):
    """Per-channel quantized history in blocks of `block` tokens (KIVI keys): scale/zero `[b, h, n / block, head_dim]`."""

    def __init__(self, bits: int, block: int) -> None:
        self.block = block
        super().__init__(bits)

    def append(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Append whole blocks: `x` is `[b, h, k * block, head_dim]`; `valid` (bool `[b, 1, k * block,
        1]`) leaves padded tokens out of each block's min and max."""
        chunk = max(APPEND_CHUNK // self.block, 1) * self.block
        for first in range(0, x.shape[-2], chunk):
            part = x[..., first : first + chunk, :]
            ok = None if valid is None else valid[..., first : first + chunk, :]
            q = quantize_per_channel(part, self.bits, self.block, valid=ok)
            self.head_dim = q.head_dim
            self._extend(q.packed, q.scale, q.zero)

    def view(self) -> PackedView:
        return PackedView(
            self.packed, self.scale, self.zero, self.bits, self.head_dim, self.block, True
        )

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

    def drop_front(self, n: int, compact: bool = False) -> None:
        self.keys.drop_front(n, compact)
        self.values.drop_front(n, compact)

    def views(self) -> tuple[StoreView, StoreView]:
        """What the keys and the values stores hold, as held."""
        return self.keys.view(), self.values.view()

    def reserve(self, tokens: int) -> None:
        self.keys.reserve(tokens)
        self.values.reserve(tokens)

    def tensors(self) -> list[torch.Tensor]:
        return self.keys.tensors() + self.values.tensors()

    def live_tensors(self) -> list[torch.Tensor]:
        return self.keys.live_tensors() + self.values.live_tensors()

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

    def drop_front(self, n: int, compact: bool = False) -> None:
        self.store.drop_front(n, compact)

    def reserve(self, tokens: int) -> None:
        self.store.reserve(tokens)

    def views(self) -> tuple[StoreView, StoreView]:
        """What the keys and the values stores hold, as held."""
        view = self.store.view()
        if isinstance(view, RawView):  # noqa: SIM108
            return RawView(view.data[0]), RawView(view.data[1])
        return view.select(0), view.select(1)

    def tensors(self) -> list[torch.Tensor]:
        return self.store.tensors()

    def live_tensors(self) -> list[torch.Tensor]:
        return self.store.live_tensors()

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
