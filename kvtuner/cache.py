"""KVTunerCache: a transformers Cache whose layers each store keys and values at their own bits.

One `QuantizedKVLayer` per decoder layer (the `layers=[...]` API of transformers 5). Schemes:
- `per-token`: K and V quantized per token (groups of `group_size` channels), no residual.
- `kivi`: K per channel over blocks of `block_size` tokens, V per token; the newest
  `residual_length` (up to `residual_length + block_size - 1`) tokens stay in full precision.
The first `sink_tokens` tokens stay in full precision under both. Quantized blocks are appended and
never re-quantized. Sliding-window layers keep only their window.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvtuner import defaults
from kvtuner.compat import sliding_windows, text_config
from kvtuner.errors import ConfigError
from kvtuner.precision import Layout, PrecisionPair
from kvtuner.quant.store import SeparateKV, StackedKV, cat_tokens, make_kv_stores


class WindowedLayer(DynamicLayer):
    """What every kvtuner cache layer shares: `cumulative_length` tokens seen, an optional
    `sliding_window` (`window - 1` past tokens kept, as transformers' dynamic sliding layer), the
    mask sizes that follow from them, and no cropping."""

    is_croppable = False
    cumulative_length: int
    sliding_window: int | None
    is_sliding: bool

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: Any) -> tuple[int, int]:
        q = query_length if isinstance(query_length, int) else query_length.shape[0]
        if not self.is_sliding:
            return self.cumulative_length + q, 0
        window = self.sliding_window
        offset = max(self.cumulative_length - window + 1, 0)
        if self.cumulative_length >= window:
            return window - 1 + q, offset
        return self.cumulative_length + q, offset

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    get_max_cache_shape = get_max_length  # the name before transformers 5.24

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError(
                f"a {type(self).__name__} cannot be cropped (is_croppable is False)"
            )

    def visible_tokens(self) -> int:
        """Tokens a dense layer would hold now: all seen, or `window - 1` on a sliding layer."""
        if not self.is_sliding:
            return self.cumulative_length
        return min(self.cumulative_length, self.sliding_window - 1)


class QuantizedKVLayer(WindowedLayer):
    """One attention layer's KV history at (key_bits, value_bits), held as `layout` says.

    States are `[batch, kv_heads, seq, head_dim]`. The layer holds three parts, oldest first:
    full-precision sinks (the first `layout.sink_tokens` tokens), packed stores, and (KIVI) a
    full-precision residual of the newest tokens; sinks and residual are stacked `[2, ...]`
    (keys, values). `update` returns the visible history, dequantized, ending with the new tokens:
    exact on the first call unless `quantize_prefill` (the prompt's own forward), read back from
    what is stored on every later call.
    """

    is_croppable = False

    def __init__(
        self,
        pair: PrecisionPair,
        layout: Layout | None = None,
        *,
        sliding_window: int | None = None,
        quantize_prefill: bool = defaults.QUANTIZE_PREFILL,
    ) -> None:
        super().__init__()
        self.pair = pair
        self.layout = layout if layout is not None else Layout()
        self.block = self.layout.block(pair)
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.quantize_prefill = quantize_prefill
        self.cumulative_length = 0
        self.stores: SeparateKV | StackedKV | None = None
        self._sink: torch.Tensor | None = None  # [2, batch, heads, sinks, head_dim]
        self._sink_end = self.layout.sink_tokens  # positions held as sinks (see _first_tokens_end)
        self._res: torch.Tensor | None = None  # [2, batch, heads, residual, head_dim]
        # bool [batch, positions]: False where the attention mask says padding (see KVTunerCache)
        self.valid: torch.Tensor | None = None
        # set by KVTunerCache for a forward whose attention is kvtuner's (kvtuner.attention): a
        # decode step then returns no history; the attention reads the stores as they are held
        self.fused = False
        self.pending: int | None = None  # tokens the fused attention must read, until it has

    def __repr__(self) -> str:
        window = f", window={self.sliding_window}" if self.is_sliding else ""
        return f"QuantizedKVLayer({self.pair.name}, {self.layout.scheme}{window})"

    # -- transformers layer contract -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        batch, heads, _, head_dim = key_states.shape
        self._rows, self._heads, self._head_dim = batch, heads, head_dim
        self._element_size = key_states.element_size()
        layout = self.layout
        self.stores = make_kv_stores(
            self.pair.key_bits,
            self.pair.value_bits,
            kivi=layout.kivi,
            group_size=layout.channel_group(head_dim),
            block_size=layout.block_size,
            smooth=layout.smooth,
        )
        if getattr(self, "_reserved", 0):
            self.stores.reserve(self._reserved)
        empty = key_states.new_empty((2, batch, heads, 0, head_dim))
        self._sink, self._res = empty, empty.clone()
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending is not None:  # the last step's attention was not kvtuner's
            self.finish_attention()
        new = key_states.shape[-2]
        past = self.cumulative_length
        self.cumulative_length += new
        states = torch.stack((key_states, value_states))
        if past == 0:
            self._sink_end = self._first_tokens_end(new)
        sinks = min(max(self._sink_end - past, 0), new)
        if sinks:
            # a copy: a view would keep the whole prompt's keys and values alive
            self._sink = cat_tokens(self._sink, states[..., :sinks, :].clone())
            states = states[..., sinks:, :]
        if self.block == 1 and self.layout.residual_length == 0:
            # no residual: new tokens go straight into the stores
            if states.shape[-2]:
                self.stores.append(states, self._valid(past + sinks, states.shape[-2]))
        else:
            self._res = cat_tokens(self._res, states)
            self._flush()
        visible = new + (min(past, self.sliding_window - 1) if self.is_sliding else past)
        if self.fused and new == 1 and past > 0:
            # kvtuner.attention reads the stores in place, then calls finish_attention
            self.pending = visible
            return key_states, value_states
        if past == 0 and not self.quantize_prefill:
            keys, values = key_states, value_states
        else:
            keys, values = self._read(visible)
        self._trim(compact=past == 0)
        return keys, values

    def reserve(self, tokens: int) -> None:
        """This layer will see `tokens` tokens in all: its stores allocate what they will hold
        then (`kvtuner.memory.held_tokens`) instead of growing with spare rows. A sliding layer
        that will slide keeps its spare rows (they let it reuse its space)."""
        if self.is_sliding and tokens > self.sliding_window - 1:
            return
        from kvtuner.memory import held_tokens

        self._reserved = held_tokens(self.layout, self.pair, tokens).quantized
        if self.is_initialized:
            self.stores.reserve(self._reserved)

    def finish_attention(self) -> None:
        """After the fused attention of a decode step: drop what the next step cannot see."""
        self.pending = None
        self._trim()

    def reset(self) -> None:
        self.__init__(  # type: ignore[misc]
            self.pair,
            self.layout,
            sliding_window=self.sliding_window,
            quantize_prefill=self.quantize_prefill,
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self.stores.index_batch(indices)
        self._sink = self._sink.index_select(1, indices.to(self._sink.device))
        self._res = self._res.index_select(1, indices.to(self._res.device))
        if self.valid is not None:
            self.valid = self.valid.index_select(0, indices.to(self.valid.device))
        self._rows = int(indices.shape[0])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            rows = torch.arange(self._rows, device=self._res.device)
            self.batch_select_indices(rows.repeat_interleave(repeats))

    # -- storage ---------------------------------------------------------------------------
    @property
    def stored_tokens(self) -> int:
        """Tokens held (sinks, packed, residual); sliding layers hold about their window."""
        if not self.is_initialized:
            return 0
        return self._sink.shape[-2] + self.stores.seq_len + self._res.shape[-2]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer holds."""
        if not self.is_initialized:
            return []
        return self.stores.tensors() + [self._sink, self._res]

    def nbytes(self) -> int:
        """Bytes allocated, spare capacity of the growing stores included."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def live_nbytes(self) -> int:
        """Bytes of the tokens held, spare capacity left out (what `kvtuner.memory` models)."""
        if not self.is_initialized:
            return 0
        live = self.stores.live_tensors() + [self._sink, self._res]
        return sum(t.numel() * t.element_size() for t in live)

    def dense_nbytes(self) -> int:
        """Bytes a dense DynamicCache layer of the same dtype would hold now."""
        if not self.is_initialized:
            return 0
        tokens = self.visible_tokens()
        return 2 * self._rows * self._heads * tokens * self._head_dim * self._element_size

    def _flush(self) -> None:
        """Move whole blocks from the residual into the stores, keeping `residual_length` tokens.

        Padded positions (`valid`) stay out of the min and max of KIVI's per-channel key blocks.
        """
        waiting = self._res.shape[-2]
        count = (waiting - self.layout.residual_length) // self.block * self.block
        if count <= 0:
            return
        first = self.cumulative_length - waiting  # position of the oldest residual token
        self.stores.append(self._res[..., :count, :], self._valid(first, count))
        self._res = self._res[..., count:, :].clone()

    def _first_tokens_end(self, new: int) -> int:
        """Where the sinks end: after `sink_tokens` positions, and in a left-padded batch after
        the padding of the most padded row as well, so that every row's own first tokens stay in
        full precision (as they would alone); other rows keep a few more tokens there."""
        sinks = self.layout.sink_tokens
        if not sinks or self.valid is None or self.valid.shape[-1] < new:
            return sinks
        padding = (~self.valid[:, :new]).cumprod(-1).sum(-1)  # leading padding, per row
        return sinks + int(padding.max())

    def _valid(self, first: int, count: int) -> torch.Tensor | None:
        """Bool `[batch, 1, count, 1]`: which of positions first..first+count-1 are tokens, not
        padding (None when the attention mask is unknown)."""
        if self.valid is None or self.valid.shape[-1] < first + count:
            return None
        return self.valid[:, None, first : first + count, None]

    def _read(
        self, visible: int, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The last `visible` keys and values of sinks + stores + residual, dequantized (in
        `dtype`, default the cache's).

        Stored tokens are dequantized straight into their rows of one output buffer; sinks and
        residual are copied around them (no concatenation of the whole history).
        """
        sinks, stored, waiting = self._sink.shape[-2], self.stores.seq_len, self._res.shape[-2]
        start = sinks + stored + waiting - visible
        if stored == 0 or start >= sinks + stored:  # only full-precision parts are visible
            both = cat_tokens(
                self._sink[..., start:, :], self._res[..., max(start - sinks, 0) :, :]
            )
            both = both if dtype is None else both.to(dtype)
            return both[0], both[1]
        shape = (2, self._rows, self._heads, visible, self._head_dim)
        out = self._res.new_empty(shape, dtype=dtype or self._res.dtype)
        front = max(sinks - start, 0)
        if front:
            out[..., :front, :].copy_(self._sink[..., sinks - front :, :])
        first = max(start - sinks, 0)
        self.stores.read(first, out[..., front : front + stored - first, :])
        if waiting:
            out[..., front + stored - first :, :].copy_(self._res)
        return out[0], out[1]

    def _trim(self, compact: bool = False) -> None:
        """Sliding layers: drop what the next step cannot see (sinks, then whole blocks, then the
        residual's oldest tokens when no block is left): `kvtuner.memory.held_tokens` counts the same.
        `compact` (after a prompt) frees the dropped rows; later steps reuse them instead."""
        if not self.is_sliding:
            return
        excess = self.stored_tokens - (self.sliding_window - 1)
        if excess <= 0:
            return
        drop = min(self._sink.shape[-2], excess)
        if drop:
            self._sink = self._sink[..., drop:, :].clone()
            excess -= drop
        drop = min(excess // self.block * self.block, self.stores.seq_len)
        if drop > 0:
            self.stores.drop_front(drop, compact)
            excess -= drop
        if excess > 0 and self.stores.seq_len == 0:
            # a residual longer than the window: it holds the window itself
            self._res = self._res[..., excess:, :].clone()


class KVTunerCache(Cache):
    """A transformers Cache applying a layer-wise precision config.

    `config` is a PrecisionConfig (per-layer pairs and the layout: scheme, groups, residual,
    sinks); `model_config` the model's config (layer count, layer types, sliding windows). Layer
    types other than full, sliding and chunked attention are refused. Through
    `quantized_cache(model, ...)` the cache also sees the attention mask of each forward, so
    left-padding stays out of KIVI's per-channel key blocks, and decode steps attend straight on
    the packed stores (`kvtuner.attention`) unless `fused_attention=False`.
    """

    def __init__(
        self,
        config: Any,
        model_config: Any,
        *,
        quantize_prefill: bool = defaults.QUANTIZE_PREFILL,
        fused_attention: bool = True,
    ) -> None:
        windows = sliding_windows(model_config)
        num_layers = text_config(model_config).num_hidden_layers
        if len(config.layers) != num_layers:
            source = getattr(config, "source", None) or "config"
            raise ConfigError(
                f"{source}: num_layers: config has {len(config.layers)} layers, model has {num_layers}"
            )
        self.precision = config
        layers = [
            QuantizedKVLayer(
                pair, config.layout, sliding_window=window, quantize_prefill=quantize_prefill
            )
            for pair, window in zip(config.layers, windows)
        ]
        super().__init__(layers=layers)
        self.fused_attention = fused_attention

    def reserve(self, tokens: int) -> None:
        """The cache will hold `tokens` tokens (prompt + new tokens - 1 for a generation): the
        stores allocate exactly what they will hold, no spare rows. Call before the prompt."""
        for layer in self.layers:
            layer.reserve(tokens)

    def set_fused(self, fused: bool) -> None:
        """Whether the coming forward's attention is kvtuner's (set by the forward hooks)."""
        for layer in self.layers:
            layer.fused = fused

    def observe_attention_mask(self, attention_mask: torch.Tensor | None) -> None:
        """The 2-D attention mask `[batch, positions]` of the coming forward (1 = token, 0 = padding)."""
        valid = None
        if attention_mask is not None and attention_mask.dim() == 2:
            valid = attention_mask.bool()
        for layer in self.layers:
            layer.valid = valid

    def nbytes(self) -> int:
        """Bytes really held: packed codes + scales + zero points + full-precision sinks and
        residual, and the spare rows the stores grow into (at most 1/16 + 16 tokens a layer; none
        right after a prompt)."""
        return sum(layer.nbytes() for layer in self.layers)

    def live_nbytes(self) -> int:
        """Bytes of the tokens held, spare rows left out: what `kvtuner.memory` computes."""
        return sum(layer.live_nbytes() for layer in self.layers)

    def dense_nbytes(self) -> int:
        """Bytes a dense cache of the same dtype would hold for the same tokens."""
        return sum(layer.dense_nbytes() for layer in self.layers)

    def tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in layer.tensors()]


def quantized_cache(
    model: Any,
    config: Any,
    *,
    scheme: str | None = None,
    quantize_prefill: bool = defaults.QUANTIZE_PREFILL,
    fused_attention: bool = True,
) -> KVTunerCache:
    """A fresh KVTunerCache for `model` from a PrecisionConfig, a YAML path or a spec like "KV4".

    Pass it to `model.generate(..., cache=cache)` (`past_key_values=` before transformers 5.24).
    The first call sets up `model` once (`kvtuner.attention.interface`): forward hooks that show
    the cache each forward's attention mask (left-padded batches), and, with `fused_attention`,
    kvtuner's attention function in place of the model's sdpa/eager one, so decode steps attend
    straight on the packed codes (other caches and forwards run the model's own function).
    """
    from kvtuner.attention import interface
    from kvtuner.config import load_config

    num_layers = text_config(model.config).num_hidden_layers
    precision = load_config(config, num_layers=num_layers, scheme=scheme)
    interface.attach(model)
    if fused_attention:
        fused_attention = interface.enable(model)
    return KVTunerCache(
        precision, model.config, quantize_prefill=quantize_prefill, fused_attention=fused_attention
    )
