"""Quality of a precision config measured with the real quantized cache: KL, perplexity, accuracy.

Protocol for `kl` and `ppl`. A sample is `context + continuation` tokens. The first `context - 1`
tokens go into a fresh `KVTunerCache` in one forward (quantized at prefill); then the tokens from
`context - 1` on are fed in chunks of `chunk`, so every scored position attends to quantized history
(one forward over the whole text would leave the prompt unquantized and measure nothing). The
`continuation` scored distributions predict tokens `context .. context + continuation - 1`.
The full-precision reference runs the same chunks through a dense `DynamicCache`, once per sample
(kept in memory, optionally on disk). Results keep one value per sample, so configs can be compared
paired on the same samples.

`accuracy`: exact match of the final number of a greedy answer on GSM8K-style {question, answer}.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvtuner.compat import with_cache
from kvtuner.config import PrecisionConfig
from kvtuner.errors import ConfigError
from kvtuner.io import atomic_path


@dataclass(frozen=True)
class EvalProtocol:
    """Token counts of one sample: `context` tokens of history, `continuation` scored, fed `chunk` at a time."""

    context: int = 512
    continuation: int = 64
    chunk: int = 32

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
        n = len(self.per_sample_kl)
        if n < 2:
            return 0.0
        mean = sum(self.per_sample_kl) / n
        var = sum((x - mean) ** 2 for x in self.per_sample_kl) / (n - 1)
        return math.sqrt(var / n)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kl": self.kl,
            "kl_stderr": self.kl_stderr,
            "ppl": self.ppl,
            "reference_ppl": self.reference_ppl,
            "tokens": self.tokens,
            "per_sample_kl": list(self.per_sample_kl),
        }


def continuation_logits(
    model: Any, input_ids: torch.Tensor, cache: Any, protocol: EvalProtocol
) -> torch.Tensor:
    """Logits of the scored positions, each chunk attending to what `cache` holds.

    `input_ids` is `[batch, context + continuation]`; returns float32 `[batch, continuation, vocab]`
    (position i predicts token `context + i`).
    """
    context, end = protocol.context, protocol.seq_len
    # prefill logits are never scored: keep one position to skip the large vocabulary projection
    model(
        **with_cache(
            model, cache, input_ids=input_ids[:, : context - 1], use_cache=True, logits_to_keep=1
        )
    )
    chunks = []
    for start in range(context - 1, end - 1, protocol.chunk):
        ids = input_ids[:, start : min(start + protocol.chunk, end - 1)]
        out = model(**with_cache(model, cache, input_ids=ids, use_cache=True))
        chunks.append(out.logits.float())
    return torch.cat(chunks, dim=1)


def _token_stats(
    ref_logprobs: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor
) -> tuple[float, float]:
    """Mean KL(ref || quant) and mean NLL over positions; `[T, V]`, `[T, V]`, `[T]` -> (kl, nll)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    kl = (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)
    nll = -logprobs.gather(-1, targets[:, None]).squeeze(-1)
    return kl.clamp_min(0).mean().item(), nll.mean().item()


class Evaluator:
    """KL and perplexity of configs on fixed samples, against full-precision logits computed once.

    `samples` is a LongTensor `[n, context + continuation]` (see `eval_samples`), run
    `batch_size` at a time (one cache per batch). `reference_dir` keeps the reference
    log-probabilities on disk (`<hash>.pt`) for later processes to reuse.
    """

    def __init__(
        self,
        model: Any,
        samples: torch.Tensor,
        protocol: EvalProtocol = EvalProtocol(),
        *,
        reference_dir: str | Path | None = None,
        batch_size: int = 4,
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

    @property
    def targets(self) -> torch.Tensor:
        """Scored tokens `[n, continuation]`."""
        return self.samples[:, self.protocol.context :]

    @torch.inference_mode()
    def reference(self) -> torch.Tensor:
        """Full-precision next-token log-probabilities `[n, continuation, vocab]` (float32), computed once."""
        if self._reference is not None:
            return self._reference
        path = self._reference_path()
        if path is not None and path.is_file():
            self._reference = torch.load(path, map_location=self.device)
            return self._reference
        batches = self.samples.split(self.batch_size)
        rows = []
        for batch in tqdm(batches, desc="reference", disable=not self.progress, leave=False):
            cache = DynamicCache(config=self.model.config)
            logits = continuation_logits(self.model, batch, cache, self.protocol)
            rows.append(torch.log_softmax(logits, dim=-1))
        self._reference = torch.cat(rows)
        if path is not None:
            with atomic_path(path) as tmp:
                torch.save(self._reference.cpu(), tmp)
        return self._reference

    @torch.inference_mode()
    def evaluate(self, config: PrecisionConfig | str) -> EvalResult:
        """Mean KL, perplexity and per-sample values of `config` (a PrecisionConfig, path or spec)."""
        from kvtuner.cache import quantized_cache

        reference = self.reference()
        kls, nlls = [], []
        for start in range(0, len(self.samples), self.batch_size):
            batch = self.samples[start : start + self.batch_size]
            logits = continuation_logits(
                self.model, batch, quantized_cache(self.model, config), self.protocol
            )
            for j in range(len(batch)):
                kl, nll = _token_stats(reference[start + j], logits[j], self.targets[start + j])
                kls.append(kl)
                nlls.append(nll)
        ref_nll = [
            -reference[i].gather(-1, self.targets[i][:, None]).mean().item()
            for i in range(len(kls))
        ]
        return EvalResult(
            kl=sum(kls) / len(kls),
            ppl=math.exp(sum(nlls) / len(nlls)),
            reference_ppl=math.exp(sum(ref_nll) / len(ref_nll)),
            tokens=len(kls) * self.protocol.continuation,
            per_sample_kl=tuple(kls),
            per_sample_nll=tuple(nlls),
        )

    def _reference_path(self) -> Path | None:
        if self.reference_dir is None:
            return None
        digest = hashlib.sha256()
        digest.update(self.model.config.to_json_string(use_diff=False).encode())
        first = next(self.model.parameters())
        digest.update(f"{first.dtype}|{first.float().sum().item():.6e}|{self.protocol}".encode())
        digest.update(self.samples.cpu().numpy().tobytes())
        return self.reference_dir / f"reference-{digest.hexdigest()[:16]}.pt"


def eval_samples(
    tokenizer: Any,
    text: str | None = None,
    num_samples: int = 6,
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
