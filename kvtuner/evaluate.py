"""Quality of a precision config measured with the real quantized cache: KL, perplexity, accuracy.

Protocol for `kl` and `ppl`. A sample is `context + continuation` tokens. The first `context - 1`
tokens go into a fresh cache in one forward (the prefill); then the tokens from `context - 1` on
are fed in chunks of `chunk`, so every scored position attends to the quantized history (one
forward over the whole text would leave the prompt unquantized and measure nothing). The
`continuation` scored distributions predict tokens `context .. context + continuation - 1`.
The full-precision reference runs the same chunks through a dense `DynamicCache`, once per sample
(kept in memory, optionally on disk). Results keep one value per sample, so configs can be compared
paired on the same samples.

Replay. A prefill that attends to its own exact keys and values (the default of KVTunerCache, and
what DynamicCache and transformers' QuantizedCache do) computes the same keys and values whatever
the cache will store. So the reference's prefill records them once per batch, and every evaluated
cache is filled from the recording through its own `update`, exactly as its prefill forward would
have done, before the chunks run: an evaluation costs the chunks only. Caches built with
`quantize_prefill=True` run the whole protocol.

`accuracy`: exact match of the final number of a greedy answer on GSM8K-style {question, answer}.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvtuner import defaults
from kvtuner.compat import text_config, with_cache
from kvtuner.config import PrecisionConfig
from kvtuner.errors import ConfigError
from kvtuner.io import atomic_path


@dataclass(frozen=True)
class EvalProtocol:
    """Token counts of one sample: `context` tokens of history, `continuation` scored, fed `chunk` at a time."""

    context: int = defaults.EVAL_CONTEXT
    continuation: int = defaults.EVAL_CONTINUATION
    chunk: int = defaults.EVAL_CHUNK

    def __post_init__(self) -> None:
        for name in ("context", "continuation", "chunk"):
            if getattr(self, name) < (2 if name == "context" else 1):
                raise ConfigError(
                    f"--{name} must be at least {2 if name == 'context' else 1}; got {getattr(self, name)}"
                )

    @property
    def seq_len(self) -> int:
        return self.context + self.continuation


@dataclass(frozen=True)
class EvalResult:
    """Mean KL(full precision || quantized) in nats per token, perplexity, and per-sample values."""

    kl: float
    ppl: float
    reference_ppl: float
    tokens: int
    per_sample_kl: tuple[float, ...]
    per_sample_nll: tuple[float, ...]

    @property
    def kl_stderr(self) -> float:
        """Standard error of the mean KL over samples (0 for a single sample)."""
        return stderr(self.per_sample_kl)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kl": self.kl,
            "kl_stderr": self.kl_stderr,
            "ppl": self.ppl,
            "reference_ppl": self.reference_ppl,
            "tokens": self.tokens,
            "per_sample_kl": list(self.per_sample_kl),
        }


def stderr(values: Sequence[float]) -> float:
    """Standard error of the mean of `values` (0 for fewer than two)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1) / n)


PREFILL_CHUNK = 4096  # tokens a prefill forward takes at once: long contexts in bounded memory


def prefill(model: Any, input_ids: torch.Tensor, cache: Any, chunk: int = PREFILL_CHUNK) -> Any:
    """`input_ids` into `cache`, `chunk` tokens a forward, so the activations and the attention
    mask of a 16k-token context stay bounded; returns the last forward's output (logits of the
    last position only). The protocol's prefill is all but the last context token."""
    out = None
    for start in range(0, input_ids.shape[1], chunk):
        # only the last position's logits can be used: skip the vocabulary projection elsewhere
        ids = input_ids[:, start : start + chunk]
        out = model(**with_cache(model, cache, input_ids=ids, use_cache=True, logits_to_keep=1))
    return out


def chunk_logits(
    model: Any, input_ids: torch.Tensor, cache: Any, protocol: EvalProtocol
) -> torch.Tensor:
    """float32 logits `[batch, continuation, vocab]` of the scored chunks, after the prefill."""
    context, end = protocol.context, protocol.seq_len
    chunks = []
    for start in range(context - 1, end - 1, protocol.chunk):
        ids = input_ids[:, start : min(start + protocol.chunk, end - 1)]
        out = model(**with_cache(model, cache, input_ids=ids, use_cache=True))
        chunks.append(out.logits.float())
    return torch.cat(chunks, dim=1)


def continuation_logits(
    model: Any, input_ids: torch.Tensor, cache: Any, protocol: EvalProtocol
) -> torch.Tensor:
    """Logits of the scored positions, each chunk attending to what `cache` holds.

    `input_ids` is `[batch, context + continuation]`; returns float32 `[batch, continuation, vocab]`
    (position i predicts token `context + i`).
    """
    prefill(model, input_ids[:, : protocol.context - 1], cache)
    return chunk_logits(model, input_ids, cache, protocol)


class RecordingCache(DynamicCache):
    """A DynamicCache that also keeps the keys and values each layer is given while `recording`
    (the prefill's, every chunk, before any sliding window drops them): `recorded` per layer."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.recording = True
        self._chunks: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.recording:
            self._chunks.setdefault(layer_idx, []).append((key_states, value_states))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def recorded(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the recorded keys and values, chunks joined (the first call stops recording)."""
        self.recording = False
        for layer, chunks in self._chunks.items():
            if len(chunks) > 1:
                keys = torch.cat([k for k, _ in chunks], dim=-2)
                self._chunks[layer] = [(keys, torch.cat([v for _, v in chunks], dim=-2))]
        return {layer: chunks[0] for layer, chunks in self._chunks.items()}

    def forget(self) -> None:
        """Stop recording and drop the recording (the cache itself stays)."""
        self.recording = False
        self._chunks = {}


def replay(cache: Any, recorded: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """Fill a fresh `cache` with recorded prefill keys and values through its own `update`."""
    for layer in sorted(recorded):
        keys, values = recorded[layer]
        cache.update(keys, values, layer)
    return cache


def replayable(cache: Any) -> bool:
    """Whether `cache`'s prefill attends to exact keys and values (see the module doc)."""
    return not any(
        getattr(layer, "quantize_prefill", False) for layer in getattr(cache, "layers", ())
    )


def _token_stats(
    ref_logprobs: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor
) -> tuple[float, float]:
    """Mean KL(ref || quant) and mean NLL over positions; `[T, V]`, `[T, V]`, `[T]` -> (kl, nll)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    kl = (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)
    nll = -logprobs.gather(-1, targets[:, None]).squeeze(-1)
    return kl.clamp_min(0).mean().item(), nll.mean().item()


CacheFactory = Callable[[], Any]


class Evaluator:
    """KL and perplexity of caches on fixed samples, against full-precision logits computed once.

    `samples` is a LongTensor `[n, context + continuation]` (see `eval_samples`), run
    `batch_size` at a time (one cache per batch). `reference_dir` keeps the reference
    log-probabilities on disk (`<hash>.pt`) for later processes to reuse. `evaluate(config)` scores
    a precision config; `evaluate_cache(factory)` any transformers Cache (a peer's).
    """

    def __init__(
        self,
        model: Any,
        samples: torch.Tensor,
        protocol: EvalProtocol = EvalProtocol(),
        *,
        reference_dir: str | Path | None = None,
        batch_size: int = 8,
        progress: bool = False,
    ) -> None:
        if samples.ndim != 2 or samples.shape[1] != protocol.seq_len:
            raise ConfigError(
                f"evaluation samples must be [n, {protocol.seq_len}] (context {protocol.context} + "
                f"continuation {protocol.continuation}); got {list(samples.shape)}"
            )
        self.model = model
        self.device = next(model.parameters()).device
        self.samples = samples.to(self.device)
        self.protocol = protocol
        self.reference_dir = Path(reference_dir) if reference_dir is not None else None
        self.batch_size = max(1, batch_size)
        self.progress = progress
        self._reference: torch.Tensor | None = None
        self._recorded: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] | None = None

    @property
    def targets(self) -> torch.Tensor:
        """Scored tokens `[n, continuation]`."""
        return self.samples[:, self.protocol.context :]

    def batches(self) -> list[torch.Tensor]:
        return list(self.samples.split(self.batch_size))

    @torch.inference_mode()
    def reference(self) -> torch.Tensor:
        """Full-precision next-token log-probabilities `[n, continuation, vocab]` (float32), computed once."""
        if self._reference is not None:
            return self._reference
        path = self._reference_path()
        if path is not None and path.is_file():
            self._reference = torch.load(path, map_location=self.device)
            return self._reference
        rows = []
        self._recorded = []
        for batch in tqdm(self.batches(), desc="reference", disable=not self.progress, leave=False):
            cache = RecordingCache(config=self.model.config)
            prefill(self.model, batch[:, : self.protocol.context - 1], cache)
            self._recorded.append(cache.recorded)  # stops recording: the chunks are scored next
            rows.append(
                torch.log_softmax(chunk_logits(self.model, batch, cache, self.protocol), -1)
            )
        self._reference = torch.cat(rows)
        if path is not None:
            with atomic_path(path) as tmp:
                torch.save(self._reference.cpu(), tmp)
        return self._reference

    @torch.inference_mode()
    def recorded(self, batch_index: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Prefill keys and values of batch `batch_index`, per layer (recorded once)."""
        if self._recorded is None:  # the reference came from disk: record the prefills alone
            self._recorded = []
            for batch in self.batches():
                cache = RecordingCache(config=self.model.config)
                prefill(self.model, batch[:, : self.protocol.context - 1], cache)
                self._recorded.append(cache.recorded)
        return self._recorded[batch_index]

    def evaluate(
        self, config: PrecisionConfig | str, *, quantize_prefill: bool = defaults.QUANTIZE_PREFILL
    ) -> EvalResult:
        """Mean KL, perplexity and per-sample values of `config` (a PrecisionConfig, path or spec)."""
        from kvtuner.cache import quantized_cache

        return self.evaluate_cache(
            lambda: quantized_cache(self.model, config, quantize_prefill=quantize_prefill)
        )

    @torch.inference_mode()
    def evaluate_cache(self, make_cache: CacheFactory) -> EvalResult:
        """Mean KL, perplexity and per-sample values of the caches `make_cache()` builds."""
        reference = self.reference()
        kls, nlls = [], []
        start = 0
        for index, batch in enumerate(self.batches()):
            cache = make_cache()
            if replayable(cache):
                replay(cache, self.recorded(index))
                logits = chunk_logits(self.model, batch, cache, self.protocol)
            else:
                logits = continuation_logits(self.model, batch, cache, self.protocol)
            for j in range(len(batch)):
                kl, nll = _token_stats(reference[start + j], logits[j], self.targets[start + j])
                kls.append(kl)
                nlls.append(nll)
            start += len(batch)
        return EvalResult(
            kl=sum(kls) / len(kls),
            ppl=math.exp(sum(nlls) / len(nlls)),
            reference_ppl=self.reference_perplexity(),
            tokens=len(kls) * self.protocol.continuation,
            per_sample_kl=tuple(kls),
            per_sample_nll=tuple(nlls),
        )

    def reference_perplexity(self) -> float:
        """Perplexity of the full-precision model on the scored tokens."""
        reference, targets = self.reference(), self.targets
        nll = [
            -reference[i].gather(-1, targets[i][:, None]).mean().item() for i in range(len(targets))
        ]
        return math.exp(sum(nll) / len(nll))

    def _reference_path(self) -> Path | None:
        if self.reference_dir is None:
            return None
        digest = hashlib.sha256()
        digest.update(self.model.config.to_json_string(use_diff=False).encode())
        first = next(self.model.parameters())
        digest.update(f"{first.dtype}|{first.float().sum().item():.6e}|{self.protocol}".encode())
        digest.update(self.samples.cpu().numpy().tobytes())
        return self.reference_dir / f"reference-{digest.hexdigest()[:16]}.pt"


def protocol_for(model_config: Any, context: int | None = None) -> EvalProtocol:
    """The default protocol for a model: its context fills the sliding windows (see defaults)."""
    from kvtuner.compat import sliding_windows

    windows = sliding_windows(text_config(model_config))
    return EvalProtocol(context or defaults.eval_context(windows))


def eval_samples(
    tokenizer: Any,
    text: str | None = None,
    num_samples: int = defaults.EVAL_SAMPLES,
    protocol: EvalProtocol = EvalProtocol(),
    seed: int = 0,
) -> torch.Tensor:
    """`num_samples` windows of held-out text (default `kvtuner.data.heldout_text()`): `[n, seq_len]`."""
    from kvtuner.data import heldout_text, token_samples

    return token_samples(
        tokenizer, heldout_text() if text is None else text, num_samples, protocol.seq_len, seed
    )


# -- accuracy (GSM8K style) -------------------------------------------------------------------

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Task:
    """One question and its reference answer (GSM8K puts the final number after `####`)."""

    question: str
    answer: str


@dataclass(frozen=True)
class AccuracyResult:
    accuracy: float
    correct: int
    total: int
    per_task: tuple[bool, ...]


def load_tasks(path: str | Path, limit: int | None = None) -> list[Task]:
    """Read a JSONL file of {"question", "answer"} objects; ConfigError naming the line on bad input."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: tasks file not found")
    tasks = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: line {number} is not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not all(
            isinstance(record.get(k), str | int | float) for k in ("question", "answer")
        ):
            raise ConfigError(f"{path}: line {number} needs fields 'question' and 'answer'")
        if final_number(str(record["answer"])) is None:
            raise ConfigError(f"{path}: line {number}: answer has no number")
        tasks.append(Task(str(record["question"]), str(record["answer"])))
        if limit is not None and len(tasks) >= limit:
            break
    if not tasks:
        raise ConfigError(f"{path}: no tasks")
    return tasks


def final_number(text: str) -> Decimal | None:
    """The number after `####` if present, else the last number in `text` (commas dropped)."""
    if "####" in text:
        text = text.split("####", 1)[1]
        found = _NUMBER.search(text)
    else:
        found = ([*_NUMBER.finditer(text)] or [None])[-1]
    if found is None:
        return None
    try:
        return Decimal(found.group().replace(",", ""))
    except InvalidOperation:
        return None


@torch.inference_mode()
def accuracy(
    model: Any,
    tokenizer: Any,
    config: PrecisionConfig | str,
    tasks: Sequence[Task],
    *,
    max_new_tokens: int = 256,
    template: str = PROMPT_TEMPLATE,
    progress: bool = False,
) -> AccuracyResult:
    """Fraction of `tasks` whose greedy answer (generated with the quantized cache) ends in the right number."""
    from kvtuner.cache import quantized_cache

    device = next(model.parameters()).device
    outcomes = []
    for task in tqdm(tasks, desc="accuracy", disable=not progress, leave=False):
        inputs = tokenizer(template.format(question=task.question), return_tensors="pt").to(device)
        cache = quantized_cache(model, config)
        out = model.generate(
            **with_cache(model, cache, **inputs),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
        answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answer = answer.split("Question:", 1)[0]  # the model may go on to invent the next question
        predicted = final_number(answer)
        outcomes.append(predicted is not None and predicted == final_number(task.answer))
    correct = sum(outcomes)
    return AccuracyResult(correct / len(outcomes), correct, len(outcomes), tuple(outcomes))
