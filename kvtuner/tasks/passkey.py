"""Pass-key retrieval: a five-digit key planted at a depth of a long filler text, asked for at the end.

A prompt of exactly `context` tokens is, in token ids:

    [special prefix] HEADER  filler[:i]  NEEDLE  filler[i:]  QUESTION

The filler is the held-out text (`kvtuner.data.heldout_text`, never the calibration text) cut
into sentences; it starts at a seeded sentence, wraps around if it must and is cut to the token.
The needle goes in at the sentence boundary nearest to `depth`% of the filler (0: right after the
header, 100: right before the question). The answer is the model's greedy continuation; a trial
is correct when its first run of digits is the key exactly. Prompts depend on the tokenizer,
`seed` and the cell only, so the dense cache and a quantized one answer the same prompts.

Accuracy saturates where the model retrieves every key whatever the cache; each trial also keeps
the key's log-probability (`answer_ids`, teacher-forced after the prompt), so a cache can be
judged by how much confidence in the key it loses against dense on the same prompt, paired.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from kvtuner.errors import ConfigError

HEADER = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
# The question follows the filler on the same line: after a line break Gemma 3 270M drifts into
# prose ("the key to your ...") and retrieved only the depth-0 key (1 of 5 at 4096 tokens, against
# 5 of 5 this way; SmolLM2-135M 10 of 15 at 8000 this way, 9 of 15 with the line break).
QUESTION = " What is the pass key? The pass key is"
# Bumped whenever HEADER, NEEDLE, QUESTION or the filler's cutting change: saved results of
# another version answered other prompts.
PROMPT_VERSION = 2
DEPTHS: tuple[float, ...] = (0.0, 25.0, 50.0, 75.0, 100.0)
CONTEXTS: tuple[int, ...] = (1024, 4096)
SAMPLES = 2
ANSWER_TOKENS = 10  # a five-digit key, one token a digit on some tokenizers, and a space
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
_DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class PasskeyPrompt:
    """One trial: `input_ids` (exactly `context` tokens), the `key`, where the needle sits
    (`needle_start`..`needle_end` token indices) and its depth in the filler, asked and actual (%)."""

    input_ids: tuple[int, ...]
    key: str
    context: int
    depth: float
    actual_depth: float
    needle_start: int
    needle_end: int
    sample: int


@dataclass(frozen=True)
class Filler:
    """The filler text as token ids, one tuple per sentence (each tokenized with a leading space)."""

    sentences: tuple[tuple[int, ...], ...]

    @classmethod
    def from_text(cls, tokenizer: Any, text: str) -> Filler:
        """Split `text` into sentences (whitespace collapsed) and tokenize each."""
        pieces = [s for s in _SENTENCE_END.split(" ".join(text.split())) if s]
        if not pieces:
            raise ConfigError("the filler text is empty: nothing to build pass-key prompts from")
        encoded = tokenizer([" " + s for s in pieces], add_special_tokens=False)["input_ids"]
        return cls(tuple(tuple(ids) for ids in encoded if ids))

    def take(self, count: int, first: int) -> tuple[list[int], list[int]]:
        """`count` filler tokens from sentence `first` on (wrapping), and the sentence starts."""
        ids: list[int] = []
        starts: list[int] = []
        index = first
        while len(ids) < count:
            starts.append(len(ids))
            ids.extend(self.sentences[index % len(self.sentences)])
            index += 1
        return ids[:count], starts + [count]


def plain_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_ids(tokenizer: Any, key: str) -> list[int]:
    """The tokens of the right answer after the question: the key, after a space as in the needle
    (what the embedded models' greedy answers begin with when they are right)."""
    return plain_ids(tokenizer, " " + key)


def minimum_context(tokenizer: Any) -> int:
    """Tokens of a prompt with no filler at all (the shortest `context` that fits)."""
    from kvtuner.data import special_prefix

    fixed = special_prefix(tokenizer) + plain_ids(tokenizer, HEADER + QUESTION)
    return len(fixed) + len(plain_ids(tokenizer, NEEDLE.format(key="00000")))


def build_prompt(
    tokenizer: Any,
    filler: Filler,
    context: int,
    depth: float,
    key: str,
    *,
    first_sentence: int = 0,
    sample: int = 0,
) -> PasskeyPrompt:
    """The prompt of exactly `context` tokens with `key` planted at `depth`% of the filler."""
    from kvtuner.data import special_prefix

    if not 0 <= depth <= 100:
        raise ConfigError(f"--depths must be percentages from 0 to 100; got {depth:g}")
    head = special_prefix(tokenizer) + plain_ids(tokenizer, HEADER)
    needle = plain_ids(tokenizer, NEEDLE.format(key=key))
    question = plain_ids(tokenizer, QUESTION)
    room = context - len(head) - len(needle) - len(question)
    if room < 0:
        raise ConfigError(
            f"--contexts: {context} tokens is too short for a pass-key prompt "
            f"(at least {context - room} tokens)"
        )
    ids, starts = filler.take(room, first_sentence)
    at = min(starts, key=lambda s: (abs(s - depth / 100 * room), s))
    tokens = head + ids[:at] + needle + ids[at:] + question
    return PasskeyPrompt(
        input_ids=tuple(tokens),
        key=key,
        context=context,
        depth=float(depth),
        actual_depth=100.0 * at / room if room else 0.0,
        needle_start=len(head) + at,
        needle_end=len(head) + at + len(needle),
        sample=sample,
    )


def make_prompts(
    tokenizer: Any,
    contexts: Sequence[int],
    depths: Sequence[float] = DEPTHS,
    samples: int = SAMPLES,
    *,
    seed: int = 0,
    text: str | None = None,
) -> list[PasskeyPrompt]:
    """`samples` prompts per (context, depth), each with its own key and filler start.

    `text` is the filler (default: the shipped held-out text). The same arguments give the same
    prompts; each cell draws from its own seeded generator, so adding a context changes no other.
    """
    from kvtuner.data import heldout_text

    check_grid(contexts, depths, samples)
    filler = Filler.from_text(tokenizer, heldout_text() if text is None else text)
    prompts = []
    for context in contexts:
        for depth in depths:
            rng = random.Random(f"{seed}/{context}/{depth:g}")
            for sample in range(samples):
                prompts.append(
                    build_prompt(
                        tokenizer,
                        filler,
                        context,
                        depth,
                        str(rng.randint(10000, 99999)),
                        first_sentence=rng.randrange(len(filler.sentences)),
                        sample=sample,
                    )
                )
    return prompts


def check_grid(contexts: Sequence[int], depths: Sequence[float], samples: int) -> None:
    """ConfigError for an empty or invalid grid."""
    if not contexts:
        raise ConfigError("--contexts: give at least one context length")
    if any(c < 1 for c in contexts):
        raise ConfigError(f"--contexts must be positive token counts; got {list(contexts)}")
    if not depths:
        raise ConfigError("--depths: give at least one depth")
    if any(not 0 <= d <= 100 for d in depths):
        raise ConfigError(f"--depths must be percentages from 0 to 100; got {list(depths)}")
    if samples < 1:
        raise ConfigError(f"--samples must be at least 1; got {samples}")


def answer_digits(text: str) -> str | None:
    """The first run of digits in `text` (None if there is none)."""
    found = _DIGITS.search(text)
    return found.group() if found else None


def answer_prompts(
    model: Any,
    tokenizer: Any,
    caches: Mapping[str, Callable[[], Any] | None],
    prompts: Sequence[PasskeyPrompt],
    *,
    max_new_tokens: int = ANSWER_TOKENS,
    progress: bool = False,
    label: str = "passkey",
) -> pd.DataFrame:
    """Answer every prompt greedily with each of `caches` (name -> a factory of fresh caches; None:
    dense), the prompt's forward run once for all of them (`generation.answers_per_cache`; the
    prefill is exact, so every cache stores what its own prefill would). One row a trial, grouped
    by cache in the order given: columns cache, context, depth, actual_depth, sample, key, answer,
    correct, and key_logprob (nats: log p(key | prompt) under the cache, `answer_ids`)."""
    from kvtuner.tasks import generation

    names, factories = list(caches), list(caches.values())
    rows: dict[str, list[dict]] = {name: [] for name in names}
    for prompt in tqdm(prompts, desc=label, disable=not progress, leave=False):
        answers = generation.answers_per_cache(
            model,
            tokenizer,
            prompt.input_ids,
            factories,
            max_new_tokens=max_new_tokens,
            forced=answer_ids(tokenizer, prompt.key),
        )
        for name, answer in zip(names, answers):
            rows[name].append(
                {
                    "cache": name,
                    "context": prompt.context,
                    "depth": prompt.depth,
                    "actual_depth": prompt.actual_depth,
                    "sample": prompt.sample,
                    "key": prompt.key,
                    "answer": answer.text,
                    "correct": answer_digits(answer.text) == prompt.key,
                    "key_logprob": answer.forced_logprob,
                }
            )
    return pd.DataFrame([row for name in names for row in rows[name]])


def paired_loss(dense: Sequence[float], cache: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error over trials of dense's key log-probability minus the cache's (nats
    of confidence in the key the cache loses; trials in the same order). One trial: s.e. NaN."""
    lost = pd.Series([d - c for d, c in zip(dense, cache, strict=True)], dtype=float)
    return float(lost.mean()), float(lost.sem()) if len(lost) > 1 else float("nan")


def loss_text(mean: float, se: float | None) -> str:
    """`0.123 ± 0.045` (nats), or the mean alone without a standard error (None or NaN: one trial)."""
    return f"{mean:.3f}" if se is None or math.isnan(se) else f"{mean:.3f} ± {se:.3f}"


@dataclass(frozen=True)
class PasskeyResult:
    """Every trial of the dense cache and of the evaluated one (column `cache`: dense, quantized)."""

    trials: pd.DataFrame

    def grid(self) -> pd.DataFrame:
        """Per (context, depth): samples, accuracy (the evaluated cache) and dense_accuracy."""
        table = self.trials.pivot_table(
            index=["context", "depth"], columns="cache", values="correct", aggfunc="mean"
        )
        counts = self.trials[self.trials["cache"] == "dense"].groupby(["context", "depth"]).size()
        return pd.DataFrame(
            {
                "samples": counts,
                "accuracy": table["quantized"].astype(float),
                "dense_accuracy": table["dense"].astype(float),
            }
        ).reset_index()

    def by_context(self) -> pd.DataFrame:
        """Per context, over all depths and samples: accuracy, dense_accuracy, and the key's
        log-probability the cache loses against dense, paired by prompt: key_logprob_lost and its
        standard error key_logprob_lost_se (nats)."""
        table = self.trials.pivot_table(
            index="context", columns="cache", values="correct", aggfunc="mean"
        )
        pairs = self.paired()
        lost = {c: paired_loss(g["dense"], g["quantized"]) for c, g in pairs.groupby("context")}
        return (
            pd.DataFrame(
                {
                    "accuracy": table["quantized"].astype(float),
                    "dense_accuracy": table["dense"].astype(float),
                    "key_logprob_lost": pd.Series(
                        {c: m for c, (m, _) in lost.items()}, dtype=float
                    ),
                    "key_logprob_lost_se": pd.Series(
                        {c: e for c, (_, e) in lost.items()}, dtype=float
                    ),
                }
            )
            .rename_axis("context")
            .reset_index()
        )

    def paired(self) -> pd.DataFrame:
        """One row a prompt (context, depth, sample): the key_logprob of dense and quantized."""
        return self.trials.pivot_table(
            index=["context", "depth", "sample"], columns="cache", values="key_logprob"
        ).reset_index()

    def logprob_lost(self) -> tuple[float, float]:
        """Over every trial: the key's log-probability lost against dense, mean and s.e. (nats)."""
        pairs = self.paired()
        return paired_loss(pairs["dense"], pairs["quantized"])

    def accuracy(self, cache: str = "quantized") -> float:
        """Accuracy over every trial of `cache` (quantized or dense)."""
        return float(self.trials.loc[self.trials["cache"] == cache, "correct"].mean())


def run_passkey(
    model: Any,
    tokenizer: Any,
    make_cache: Callable[[], Any],
    contexts: Sequence[int] = CONTEXTS,
    depths: Sequence[float] = DEPTHS,
    samples: int = SAMPLES,
    *,
    seed: int = 0,
    text: str | None = None,
    max_new_tokens: int = ANSWER_TOKENS,
    progress: bool = False,
) -> PasskeyResult:
    """Pass-key accuracy per (context, depth) of the caches `make_cache()` builds, beside the
    dense cache's on the same prompts (dense's rows first; one prompt forward serves both)."""
    prompts = make_prompts(tokenizer, contexts, depths, samples, seed=seed, text=text)
    trials = answer_prompts(
        model,
        tokenizer,
        {"dense": None, "quantized": make_cache},
        prompts,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )
    return PasskeyResult(trials)
