"""lm-evaluation-harness model `kvtuner`: Hugging Face models whose KV cache is a KVTunerCache.

Importing this module registers the model with lm-eval (`pip install "kvtuner[lm-eval]"`):

    import kvtuner.lm_eval, lm_eval
    lm_eval.simple_evaluate(model="kvtuner", model_args="pretrained=gemma-3-270m,kv_config=KV4", ...)

lm-eval's own `lm_eval` command does not import kvtuner; this module's command line does, then
hands every argument to lm-eval unchanged:

    python -m kvtuner.lm_eval --model kvtuner \
        --model_args pretrained=gemma-3-270m,kv_config=searched_configs/gemma-3-270m/per-token/kvtuner_c3.5.yaml \
        --tasks arc_easy --device cpu

Model arguments beyond lm-eval's `hf` ones: `kv_config` (a YAML path or a spec: KV8, K8V4, KV4,
fp16, ...; unset: the dense cache, exactly lm-eval's `hf` model), `scheme` (per-token or kivi, for
specs), `quantize_prefill` (the prompt's own forward attends to its quantized keys and values)
and `chunk` (scored tokens fed per forward, see below). `pretrained` also takes kvtuner's embedded
names and .gguf files, loaded by `kvtuner.models.load_model`; hub ids and folders are loaded by
lm-eval itself, with all its options.

Where the cache is used:
- `generate_until`: every `generate` call gets a fresh KVTunerCache (left-padded batches are fine:
  the cache sees each forward's attention mask).
- loglikelihood (multiple choice, and rolling perplexity windows): lm-eval scores
  `context + continuation` in one forward, which never reads a cache (the prompt's own forward
  attends to its exact keys), so a quantized cache would change nothing. Instead each request is
  scored as decoding would see it: `context[:-1]` is prefilled into a fresh KVTunerCache (stored
  quantized), then the scored positions (the last context token and `continuation[:-1]`) are fed
  `chunk` tokens per forward, each forward attending to the quantized history. `chunk=1` is
  exactly token-by-token decoding; the default (32, as in `kvtuner eval`) lets tokens inside a
  chunk see each other exactly, which matters only for continuations longer than a few tokens.
  Requests that share a context (the choices of one question) prefill it once and score each
  continuation on a copy of the cache. Requests run one at a time (`batch_size` applies to
  generation only). With `kv_config=fp16` the protocol reproduces lm-eval's own scores to float
  rounding (tests/test_lm_eval.py).
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from kvtuner import defaults
from kvtuner.errors import ConfigError, KVTunerError

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'kvtuner.lm_eval needs lm-evaluation-harness: pip install "kvtuner[lm-eval]"'
    ) from exc

MODEL_NAME = "kvtuner"
DENSE_NAMES = ("", "none", "dense")

Request = tuple[Any, list[int], list[int]]


class KVTunerLM(HFLM):
    """lm-eval's HFLM with every cache-reading forward going through `kvtuner.quantized_cache`."""

    def __init__(
        self,
        pretrained: Any,
        kv_config: str | None = None,
        scheme: str | None = None,
        quantize_prefill: bool = defaults.QUANTIZE_PREFILL,
        chunk: int = defaults.EVAL_CHUNK,
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        chunk = _chunk(chunk)
        early = _early_precision(kv_config, scheme)  # a bad config fails before the model load
        device = _device(device)
        if isinstance(pretrained, str) and _kvtuner_source(pretrained):
            from kvtuner.models import load_model

            dtype = kwargs.pop("dtype", None)
            loaded = load_model(pretrained, device=device, dtype=None if dtype == "auto" else dtype)
            kwargs.setdefault("tokenizer", loaded.tokenizer)
            pretrained = loaded.model
        super().__init__(pretrained=pretrained, device=device, **kwargs)
        self.scheme = scheme
        self.quantize_prefill = bool(quantize_prefill)
        self.chunk = chunk
        self.kv_config = _precision(self.model, early or kv_config, scheme)

    # -- the cache -----------------------------------------------------------------------------
    def new_cache(self) -> Any:
        """A fresh KVTunerCache of the configured precision."""
        from kvtuner.cache import quantized_cache

        return quantized_cache(self.model, self.kv_config, quantize_prefill=self.quantize_prefill)

    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any
    ) -> torch.Tensor:
        if self.kv_config is not None:
            from kvtuner.compat import cache_kwarg

            generation_kwargs[cache_kwarg(self.model)] = self.new_cache()
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    # -- loglikelihood ---------------------------------------------------------------------------
    def _loglikelihood_tokens(
        self,
        requests: Sequence[Request],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        if self.kv_config is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        results: list[tuple[float, bool]] = []
        shared: tuple[tuple[int, ...], Any] | None = None  # the last prefilled prefix and cache
        for request_str, context, continuation in tqdm(
            requests,
            disable=disable_tqdm or self.rank != 0,
            desc="Running loglikelihood requests (kvtuner cache)",
        ):
            if not context or not 0 < len(continuation) <= self.max_length:
                raise ValueError(
                    f"loglikelihood needs a context and 1..{self.max_length} continuation tokens"
                )
            tokens = (list(context) + list(continuation))[-(self.max_length + 1) :]
            split = len(tokens) - len(continuation) - 1
            prefix = tuple(tokens[:split])
            if shared is None or shared[0] != prefix:
                shared = (prefix, self._prefilled(prefix))
            answer = self._score(tokens[split:], copy.deepcopy(shared[1]))
            results.append(answer)
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return results

    @torch.inference_mode()
    def _prefilled(self, prefix: Sequence[int]) -> Any:
        """A fresh cache holding `prefix` (empty prefix: an empty cache)."""
        from kvtuner.evaluate import prefill

        cache = self.new_cache()
        if prefix:
            prefill(self.model, torch.tensor([list(prefix)], device=self.device), cache)
        return cache

    @torch.inference_mode()
    def _score(self, window: Sequence[int], cache: Any) -> tuple[float, bool]:
        """(sum of log-probabilities of `window[1:]`, whether each is the argmax), feeding
        `window[:-1]` after what `cache` holds, `chunk` tokens per forward."""
        from kvtuner.compat import with_cache

        ids = torch.tensor([list(window)], device=self.device)
        pieces = []
        for start in range(0, ids.shape[1] - 1, self.chunk):
            part = ids[:, start : min(start + self.chunk, ids.shape[1] - 1)]
            out = self.model(**with_cache(self.model, cache, input_ids=part, use_cache=True))
            pieces.append(out.logits[0].float())
        logprobs = torch.log_softmax(torch.cat(pieces), dim=-1)
        targets = ids[0, 1:]
        total = logprobs.gather(-1, targets[:, None]).sum().item()
        return float(total), bool((logprobs.argmax(-1) == targets).all())


def _device(device: str | None) -> str:
    """`device`, or the best one here when unset or a GPU this machine lacks (lm-eval's CLI
    passes cuda:0 by default; its `hf` model falls back the same way)."""
    if device and not (device.startswith("cuda") and not torch.cuda.is_available()):
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _kvtuner_source(name: str) -> bool:
    """Whether kvtuner's loader is needed: an embedded name or a GGUF file (hub ids and model
    folders go to lm-eval's own loader)."""
    from kvtuner.models import EMBEDDED_MODELS, resolve_model

    if name in EMBEDDED_MODELS:
        return True
    try:
        return resolve_model(name).gguf_file is not None
    except KVTunerError:  # not found here: lm-eval's loader reports it in its own words
        return False


def _dense(kv_config: Any) -> bool:
    return kv_config is None or str(kv_config).strip().lower() in DENSE_NAMES


def _early_precision(kv_config: Any, scheme: str | None) -> Any:
    """A YAML config read before the model loads (None for specs and dense); ConfigError if bad."""
    if _dense(kv_config):
        return None
    from kvtuner.config import load_config_without_model

    return load_config_without_model(str(kv_config), scheme=scheme)


def _precision(model: Any, kv_config: Any, scheme: str | None) -> Any:
    """The PrecisionConfig of `kv_config` for `model`, or None for the dense cache."""
    if _dense(kv_config):
        return None
    from kvtuner.compat import text_config
    from kvtuner.config import load_config

    num_layers = text_config(model.config).num_hidden_layers
    source = kv_config if not isinstance(kv_config, str | int | float) else str(kv_config)
    return load_config(source, num_layers=num_layers, scheme=scheme)


def _chunk(value: Any) -> int:
    """The scoring chunk `value` (an int or its text) as an int; ConfigError below 1."""
    if not str(value).lstrip("-").isdigit() or int(value) < 1:
        raise ConfigError(f"chunk must be at least 1; got {value}")
    return int(value)


def _check_model_args(argv: Sequence[str]) -> None:
    """With `--model kvtuner`: ConfigError for a bad `kv_config`, `scheme` or `chunk` in
    `--model_args` (`k=v,k=v`, `k=v k=v` or JSON), as the model would raise once built."""
    args, model, i = {}, None, 0
    while i < len(argv):
        flag, _, inline = argv[i].partition("=")
        if flag == "--model":
            model = inline or (argv[i + 1] if i + 1 < len(argv) else None)
        elif flag in ("--model_args", "-a"):
            values = [inline] if inline else []
            while not inline and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                i += 1
                values.append(argv[i])
            for value in values:
                try:
                    parsed = json.loads(value)
                except ValueError:
                    parsed = dict(item.split("=", 1) for item in value.split(",") if "=" in item)
                args.update(parsed if isinstance(parsed, dict) else {})
        i += 1
    if model != MODEL_NAME:
        return
    _chunk(args.get("chunk", defaults.EVAL_CHUNK))
    _early_precision(args.get("kv_config"), args.get("scheme"))


def register() -> None:
    """Register `KVTunerLM` with lm-eval as `kvtuner` (idempotent)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        register_model(MODEL_NAME)(KVTunerLM)


def main(argv: Sequence[str] | None = None) -> int:
    """lm-eval's command line with the `kvtuner` model registered; user errors exit 2."""
    from lm_eval.__main__ import cli_evaluate

    register()
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        _check_model_args(sys.argv[1:])  # before lm-eval indexes its tasks (10 s or more)
        cli_evaluate()
    except KVTunerError as exc:
        print(f"kvtuner: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    # `python -m kvtuner.lm_eval`: run the imported module's copy, so the class is registered once
    from kvtuner.lm_eval import main as _main

    sys.exit(_main())
else:
    register()
