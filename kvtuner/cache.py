"""KVTunerCache: a transformers Cache whose layers each store keys and values at their own bits.

One `QuantizedKVLayer` per decoder layer (the `layers=[...]` API of transformers 5). Schemes:
- `per-token`: K and V quantized per token (groups along head_dim), no residual.
- `kivi`: K per channel over blocks of `group_size` tokens, V per token; the newest
  `residual_length` (up to `residual_length + group_size - 1`) tokens stay in full precision.
Quantized blocks are appended and never re-quantized. Sliding-window layers keep only their window.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvtuner.compat import sliding_windows, text_config
from kvtuner.errors import ConfigError
from kvtuner.precision import PrecisionPair
from kvtuner.quant.store import cat_tokens, make_kv_stores


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's KV history at (key_bits, value_bits).

    States are `[batch, kv_heads, seq, head_dim]`. `update` returns the visible history, dequantized,
    with the new tokens at the end (quantized too when `quantize_prefill`, or after the first call).
    """

    is_croppable = False

    def __init__(
        self,
        pair: PrecisionPair,
        *,
        scheme: str = "per-token",
        group_size: int | None = None,
        residual_length: int = 0,
        sliding_window: int | None = None,
        quantize_prefill: bool = True,
    ) -> None:
        super().__init__()
        self.pair = pair
        self.scheme = scheme
        kivi = scheme == "kivi"
        self.residual_length = residual_length if kivi else 0
        self.group_size = group_size
        self.stores = make_kv_stores(
            pair.key_bits, pair.value_bits, kivi=kivi, group_size=group_size
        )
        self.block = self.stores.block
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.quantize_prefill = quantize_prefill
        self.cumulative_length = 0
        self._res_k: torch.Tensor | None = None
        self._res_v: torch.Tensor | None = None

    def __repr__(self) -> str:
        window = f", window={self.sliding_window}" if self.is_sliding else ""
        return f"QuantizedKVLayer({self.pair.name}, {self.scheme}{window})"

    # -- transformers layer contract -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self._shape = (key_states.shape[0], key_states.shape[1], key_states.shape[-1])
        self._element_size = key_states.element_size()
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        past = self.cumulative_length
        self.cumulative_length += new
        if self.block == 1 and self.residual_length == 0:
            # per-token without residual: new tokens go straight into the stores
            self.stores.append(key_states, value_states)
            if self._res_k is None:
                # empty residual of the right shape (new tensors: a view would keep the prompt alive)
                self._res_k = key_states.new_empty(
                    (*key_states.shape[:-2], 0, key_states.shape[-1])
                )
                self._res_v = value_states.new_empty(
                    (*value_states.shape[:-2], 0, value_states.shape[-1])
                )
        else:
            self._res_k = cat_tokens(self._res_k, key_states)
            self._res_v = cat_tokens(self._res_v, value_states)
            self._flush()
        visible = new + (min(past, self.sliding_window - 1) if self.is_sliding else past)
        if past == 0 and not self.quantize_prefill:
            keys, values = key_states, value_states
        else:
            keys, values = self._read(visible)
        self._trim()
        return keys, values

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

    def reset(self) -> None:
        pair, scheme = self.pair, self.scheme
        self.__init__(  # type: ignore[misc]
            pair,
            scheme=scheme,
            group_size=self.group_size,
            residual_length=self.residual_length,
            sliding_window=self.sliding_window,
            quantize_prefill=self.quantize_prefill,
        )

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError(
                "a quantized KV layer cannot be cropped (is_croppable is False)"
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.stores.index_batch(indices)
        if self._res_k is not None:
            self._res_k = self._res_k.index_select(0, indices.to(self._res_k.device))
            self._res_v = self._res_v.index_select(0, indices.to(self._res_v.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        n = self._res_k.shape[0] if self._res_k is not None else None
        if n is None:
            return
        self.batch_select_indices(
            torch.arange(n, device=self._res_k.device).repeat_interleave(repeats)
        )

    # -- storage ---------------------------------------------------------------------------
    @property
    def stored_tokens(self) -> int:
        """Tokens held (packed plus residual); sliding layers hold about their window."""
        residual = 0 if self._res_k is None else self._res_k.shape[-2]
        return self.stores.seq_len + residual

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer holds."""
        return self.stores.tensors() + [t for t in (self._res_k, self._res_v) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def dense_nbytes(self) -> int:
        """Bytes a dense DynamicCache layer of the same dtype would hold now."""
        if not self.is_initialized:
            return 0
        tokens = self.cumulative_length
        if self.is_sliding:
            tokens = min(tokens, self.sliding_window - 1)
        batch, heads, head_dim = self._shape
        return 2 * batch * heads * tokens * head_dim * self._element_size

    def _flush(self) -> None:
        """Move whole blocks from the residual into the stores, keeping `residual_length` tokens."""
        waiting = self._res_k.shape[-2]
        count = (waiting - self.residual_length) // self.block * self.block
        if count <= 0:
            return
        self.stores.append(self._res_k[..., :count, :], self._res_v[..., :count, :])
        self._res_k = self._res_k[..., count:, :].clone()
        self._res_v = self._res_v[..., count:, :].clone()

    def _read(self, visible: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last `visible` keys and values of stores + residual, dequantized."""
        stored = self.stores.seq_len
        start = stored + self._res_k.shape[-2] - visible
        if start >= stored:
            return self._res_k[..., start - stored :, :], self._res_v[..., start - stored :, :]
        keys, values = self.stores.read(start)
        return cat_tokens(keys, self._res_k), cat_tokens(values, self._res_v)

    def _trim(self) -> None:
        """Sliding layers: drop what the next step cannot see (whole blocks only)."""
        if not self.is_sliding:
            return
        excess = self.stored_tokens - (self.sliding_window - 1)
        drop = min(max(excess, 0) // self.block * self.block, self.stores.seq_len)
        if drop > 0:
            self.stores.drop_front(drop)
        excess = self.stored_tokens - (self.sliding_window - 1)
        if excess > 0 and self.stores.seq_len == 0:
            # a residual longer than the window: it holds the window itself
            self._res_k = self._res_k[..., excess:, :].clone()
            self._res_v = self._res_v[..., excess:, :].clone()


class KVTunerCache(Cache):
    """A transformers Cache applying a layer-wise precision config.

    `config` is a PrecisionConfig (layers, scheme, group_size, residual_length); `model_config`
    is the model's config (for the number of layers and their sliding windows).
    """

    def __init__(self, config: Any, model_config: Any, *, quantize_prefill: bool = True) -> None:
        windows = sliding_windows(model_config)
        num_layers = text_config(model_config).num_hidden_layers
        if len(config.layers) != num_layers:
            source = getattr(config, "source", None) or "config"
            raise ConfigError(
                f"{source}: num_layers: config has {len(config.layers)} layers, model has {num_layers}"
            )
        self.precision = config
        group_size = config.group_size
        if config.scheme == "kivi" and group_size is None:
            group_size = 32
        head_dim = _head_dim(model_config)
        if group_size is not None and head_dim % min(group_size, head_dim):
            raise ConfigError(f"group_size: {group_size} does not divide head_dim {head_dim}")
        layers = [
            QuantizedKVLayer(
                pair,
                scheme=config.scheme,
                group_size=group_size,
                residual_length=config.residual_length,
                sliding_window=window,
                quantize_prefill=quantize_prefill,
            )
            for pair, window in zip(config.layers, windows)
        ]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes really held: packed codes + scales + zero points + full-precision residual."""
        return sum(layer.nbytes() for layer in self.layers)

    def dense_nbytes(self) -> int:
        """Bytes a dense cache of the same dtype would hold for the same tokens."""
        return sum(layer.dense_nbytes() for layer in self.layers)

    def tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in layer.tensors()]


def _head_dim(model_config: Any) -> int:
    cfg = text_config(model_config)
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def quantized_cache(
    model: Any,
    config: Any,
    *,
    scheme: str | None = None,
    quantize_prefill: bool = True,
) -> KVTunerCache:
    """A fresh KVTunerCache for `model` from a PrecisionConfig, a YAML path or a spec like "KV4".

    Pass it to `model.generate(..., past_key_values=cache)` (or `cache=` on transformers >= 5.24).
    """
    from kvtuner.config import load_config

    num_layers = text_config(model.config).num_hidden_layers
    precision = load_config(config, num_layers=num_layers, scheme=scheme)
    return KVTunerCache(precision, model.config, quantize_prefill=quantize_prefill)
