"""EngineKVCache: a transformers Cache that stores each layer's KV the way a serving engine does.

Each layer holds its keys and values in the engine format its `kvtuner.targets.Choice` names
(`kvtuner.formats`: vLLM, llama.cpp, ModelOpt, LMDeploy), as the encoded parts the engine's pages
hold (codes, per-token or per-block scales), so `nbytes()` is the engine's storage; every read
decodes them back as the engine's attention would. A per-tensor scale (FP8, NVFP4) comes from
the plan's calibrated amax (FP8 scale amax / 448, NVFP4 amax / 2688); vLLM's fp8 without one uses
1.0, its default for a checkpoint without k_scale / v_scale.

As in `kvtuner.cache`, a prompt's own forward attends to its exact keys and values; every later
forward reads the stored history, the new tokens included. This cache checks quality before
deploying: it decodes the whole history on every read (no fused kernel).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers.cache_utils import Cache

from kvtuner.cache import WindowedLayer
from kvtuner.compat import head_dim as model_head_dim
from kvtuner.compat import sliding_windows, text_config
from kvtuner.errors import ConfigError
from kvtuner.formats.base import Encoded, KVFormat
from kvtuner.formats.floats import E4M3_MAX
from kvtuner.formats.nvfp4 import E2M1_MAX, NVFP4
from kvtuner.formats.vllm import Fp8PerTensor
from kvtuner.targets import Choice

SEQ_AXIS = 2  # states are [batch, kv_heads, seq, head_dim]; every encoded part keeps that prefix


def with_scale(fmt: KVFormat, amax: float | None) -> KVFormat:
    """`fmt` with its per-tensor scale set from a calibrated `amax` (formats without one as is)."""
    if isinstance(fmt, Fp8PerTensor):
        scale = amax / E4M3_MAX if amax else 1.0
        if amax is None and fmt.name.startswith("modelopt:"):
            raise ConfigError(f"{fmt.name} needs a calibrated amax (the plan has no kv_amax)")
        return dataclasses.replace(fmt, scale=scale)
    if isinstance(fmt, NVFP4):
        if amax is None:
            raise ConfigError(f"{fmt.name} needs a calibrated amax (the plan has no kv_amax)")
        return dataclasses.replace(fmt, tensor_scale=amax / (E4M3_MAX * E2M1_MAX) if amax else 1.0)
    return fmt


class EncodedTokens:
    """One side (keys or values) of a layer: the encoded parts of its tokens, or raw states."""

    def __init__(self, fmt: KVFormat | None) -> None:
        self.fmt = fmt
        self.enc: Encoded | None = None
        self.raw: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        held = self.raw if self.fmt is None else self.enc
        return 0 if held is None else held.shape[SEQ_AXIS]

    def append(self, states: torch.Tensor) -> None:
        if self.fmt is None:
            self.raw = states if self.raw is None else torch.cat((self.raw, states), SEQ_AXIS)
            return
        new = self.fmt.quantize(states)
        if self.enc is None:
            self.enc = new
            return
        if new.meta != self.enc.meta:
            raise RuntimeError(f"{self.fmt.name}: per-tensor scale changed between appends")
        data = {k: torch.cat((v, new.data[k]), SEQ_AXIS) for k, v in self.enc.data.items()}
        shape = list(self.enc.shape)
        shape[SEQ_AXIS] += states.shape[SEQ_AXIS]
        self.enc = dataclasses.replace(self.enc, data=data, shape=tuple(shape))

    def keep_last(self, count: int) -> None:
        """Drop all but the newest `count` tokens."""
        drop = self.tokens - count
        if drop <= 0:
            return
        if self.fmt is None:
            self.raw = self.raw[:, :, drop:].clone()
            return
        data = {k: v[:, :, drop:].clone() for k, v in self.enc.data.items()}
        shape = list(self.enc.shape)
        shape[SEQ_AXIS] = count
        self.enc = dataclasses.replace(self.enc, data=data, shape=tuple(shape))

    def read(self) -> torch.Tensor:
        return self.raw if self.fmt is None else self.fmt.dequantize(self.enc)

    def nbytes(self) -> int:
        if self.fmt is None:
            return 0 if self.raw is None else self.raw.numel() * self.raw.element_size()
        return 0 if self.enc is None else self.enc.nbytes()


class EngineKVLayer(WindowedLayer):
    """One layer's history in an engine's formats; a sliding layer keeps `window - 1` tokens."""

    quantize_prefill = False  # the prompt attends to its exact states (kvtuner.evaluate.replay)

    def __init__(
        self,
        choice: Choice,
        amax: tuple[float, float] | None = None,
        *,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.choice = choice
        self.amax = amax
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.cumulative_length = 0
        key, value = choice.formats()
        self.key_format = None if key is None else with_scale(key, amax and amax[0])
        self.value_format = None if value is None else with_scale(value, amax and amax[1])
        self._keys = EncodedTokens(self.key_format)
        self._values = EncodedTokens(self.value_format)

    def __repr__(self) -> str:
        return f"EngineKVLayer({self.choice.label})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self._dense_row = key_states.shape[0] * key_states.shape[1] * key_states.shape[-1]
        self._element_size = key_states.element_size()
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        first = self.cumulative_length == 0
        self.cumulative_length += key_states.shape[-2]
        self._keys.append(key_states)
        self._values.append(value_states)
        if first:
            keys, values = key_states, value_states
        else:
            keys, values = self._keys.read(), self._values.read()
        if self.is_sliding:
            self._keys.keep_last(self.sliding_window - 1)
            self._values.keep_last(self.sliding_window - 1)
        return keys, values

    def reset(self) -> None:
        self.__init__(self.choice, self.amax, sliding_window=self.sliding_window)  # type: ignore[misc]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("EngineKVCache does not support beam search")

    def nbytes(self) -> int:
        """Bytes the engine's pages hold for this layer's tokens (scales included)."""
        return self._keys.nbytes() + self._values.nbytes()

    def dense_nbytes(self) -> int:
        """Bytes a dense DynamicCache layer of the same dtype would hold now."""
        if not self.is_initialized:
            return 0
        return 2 * self._dense_row * self.visible_tokens() * self._element_size


class EngineKVCache(Cache):
    """A transformers Cache applying an engine plan (`kvtuner.plan.EnginePlan`) to `model_config`."""

    def __init__(self, plan: Any, model_config: Any) -> None:
        windows = sliding_windows(model_config)
        num_layers = text_config(model_config).num_hidden_layers
        if plan.num_layers != num_layers:
            raise ConfigError(
                f"engine plan: num_layers: plan has {plan.num_layers} layers, model has {num_layers}"
            )
        head_dim = model_head_dim(model_config)
        for choice in set(plan.layers):
            problem = choice.check_head_dim(head_dim)
            if problem:
                raise ConfigError(problem)
        amax = plan.kv_amax or (None,) * num_layers
        self.plan = plan
        layers = [
            EngineKVLayer(choice, a, sliding_window=w)
            for choice, a, w in zip(plan.layers, amax, windows)
        ]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes the engine's pages hold, every layer."""
        return sum(layer.nbytes() for layer in self.layers)

    def dense_nbytes(self) -> int:
        return sum(layer.dense_nbytes() for layer in self.layers)


def engine_cache(model: Any, plan: Any) -> EngineKVCache:
    """A fresh EngineKVCache for `model` (pass it to `model.generate` or `Evaluator.evaluate_cache`)."""
    return EngineKVCache(plan, model.config)
