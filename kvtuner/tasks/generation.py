"""Greedy decoding with a given cache, stopping at text sequences: shared by the tasks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from kvtuner.compat import cache_kwarg, text_config, with_cache

# a fresh cache per prompt; None: the model's own dense cache
CacheFactory = Callable[[], Any] | None


class StopOnText(StoppingCriteria):
    """Stop each row once the text generated after `prompt_length` tokens contains any of `stop`."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_length :], skip_special_tokens=True
        )
        done = [any(s in text for s in self.stop) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the first occurrence of any of `stop`."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def greedy_text(
    model: Any,
    tokenizer: Any,
    input_ids: Sequence[int],
    make_cache: CacheFactory = None,
    *,
    max_new_tokens: int,
    stop: Sequence[str] = (),
) -> str:
    """The greedy continuation of `input_ids` (one prompt), cut at the first of `stop`.

    `make_cache()` gives the cache the whole generation reads and writes (None: dense).
    """
    return greedy_texts(
        model, tokenizer, [input_ids], make_cache, max_new_tokens=max_new_tokens, stop=stop
    )[0]


@torch.inference_mode()
def greedy_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    make_cache: CacheFactory = None,
    *,
    max_new_tokens: int,
    stop: Sequence[str] = (),
) -> list[str]:
    """Greedy continuations of `prompts`, decoded as one left-padded batch, each cut at the first
    of `stop`; a row that has stopped waits (padding) until all have, or `max_new_tokens`.

    One batch reads the weights once per step for every row, but lasts as long as its longest
    continuation: on 2 CPU cores, 16 HumanEval prompts took 94 s in batches of 8 against 169 s one
    by one (Qwen2.5-Coder-0.5B). A row's greedy choices can differ from the same prompt alone where
    two logits tie within float rounding (padding changes the shapes of the matrix products), so
    compare configs at the same batch size.
    """
    if not prompts:
        return []
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if not len(prompt):
            raise ValueError(f"prompt {row} is empty")
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    kwargs: dict[str, Any] = {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "pad_token_id": pad,
    }
    if stop:
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopOnText(tokenizer, stop, width)])
    if make_cache is not None:
        kwargs = with_cache(model, make_cache(), **kwargs)
    out = model.generate(**kwargs)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [cut_at_stop(text, stop) for text in texts]


@dataclass(frozen=True)
class Answer:
    """One cache's answer to a prompt: its greedy `text`, and `forced_logprob`, the log-probability
    (nats) its model gives the `forced` continuation token by token (teacher-forced, each token
    after the ones before it; None when no continuation was given)."""

    text: str
    forced_logprob: float | None = None


def greedy_text_per_cache(
    model: Any,
    tokenizer: Any,
    input_ids: Sequence[int],
    factories: Sequence[CacheFactory],
    *,
    max_new_tokens: int,
) -> list[str]:
    """The greedy continuation of one prompt with each of `factories`' caches (None: dense), the
    prompt's forward run once for all of them (`answers_per_cache`'s texts)."""
    answers = answers_per_cache(
        model, tokenizer, input_ids, factories, max_new_tokens=max_new_tokens
    )
    return [answer.text for answer in answers]


@torch.inference_mode()
def answers_per_cache(
    model: Any,
    tokenizer: Any,
    input_ids: Sequence[int],
    factories: Sequence[CacheFactory],
    *,
    max_new_tokens: int,
    forced: Sequence[int] = (),
) -> list[Answer]:
    """Each of `factories`' caches (None: dense) answers one prompt, the prompt's forward run once
    for all of them: its greedy continuation, and with `forced` (token ids) the log-probability of
    that continuation under the cache, summed over its tokens.

    kvtuner's prefill is exact (the prompt attends to its own keys and values in full precision;
    only what is stored is quantized), so the prompt's forward, its last logits and the keys and
    values each layer stores are the same whatever the cache. The prompt runs once into a dense
    cache that records each layer's keys and values, in chunks of `kvtuner.evaluate.PREFILL_CHUNK`
    tokens (bounded memory at 16k); every other cache is filled from the recording through its
    own `update` (`kvtuner.evaluate.replay`, as the KL evaluation does) and decodes on its own.
    With `forced`, the log-probability is read off the greedy steps where the greedy answer begins
    with `forced` (a right pass-key answer); otherwise a second cache of the kind is filled the
    same way and steps through the continuation one token at a time, as decoding would. The first
    token's log-probability comes from the shared prompt logits, so only later ones differ between
    caches.
    Up to one chunk of prompt, the continuations are `greedy_text`'s for each cache and the
    log-probabilities those of the cache alone (tests/tasks/test_generation.py); longer prompts
    differ from one whole-prompt forward by float rounding only. A prompt costs one prefill
    instead of one a cache: pass-key prompts (long prompt, short answer) about 1/len(factories) of
    the time. A cache that quantizes its prefill runs alone (`greedy_text`, and its own prefill
    for the forced continuation).
    """
    from kvtuner.evaluate import RecordingCache, prefill, replay, replayable

    if not len(input_ids):
        raise ValueError("prompt 0 is empty")
    device = next(model.parameters()).device
    config = text_config(model.config)
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    built = [None if make is None else make() for make in factories]
    dense = RecordingCache(config=config)
    last = prefill(model, ids, dense).logits[0, -1].float()
    recorded = dense.recorded  # stops recording: dense decodes on as a plain DynamicCache
    for cache in built:
        if cache is not None and replayable(cache):
            replay(cache, recorded)
    recorded = recorded if forced else None  # kept for the caches that score `forced` anew
    dense.forget()

    def fresh(make: CacheFactory) -> tuple[Any, torch.Tensor]:
        """A second cache of `make`'s kind holding the prompt, and the prompt's last logits."""
        if make is None:
            return replay(DynamicCache(config=config), recorded), last
        cache = make()
        if replayable(cache):
            return replay(cache, recorded), last
        return cache, prefill(model, ids, cache).logits[0, -1].float()

    answers = []
    for make, cache in zip(factories, built):
        logprob = None
        if cache is not None and not replayable(cache):
            text = greedy_text(
                model, tokenizer, input_ids, lambda c=cache: c, max_new_tokens=max_new_tokens
            )
        else:
            cache = dense if cache is None else cache
            tokens, logprob = _greedy(model, cache, last, max_new_tokens, forced)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
        if forced and logprob is None:  # the greedy answer left the continuation
            logprob = _forced_logprob(model, *fresh(make), forced)
        answers.append(Answer(text, logprob))
    return answers


def _step(model: Any, cache: Any, token: int) -> torch.Tensor:
    """One decode step of `token` through `cache`: float32 logits of the next token."""
    device = next(model.parameters()).device
    step = torch.tensor([[token]], dtype=torch.long, device=device)
    kwargs = {cache_kwarg(model): cache}
    return model(input_ids=step, use_cache=True, logits_to_keep=1, **kwargs).logits[0, -1].float()


def _greedy(
    model: Any, cache: Any, last: torch.Tensor, max_new_tokens: int, forced: Sequence[int] = ()
) -> tuple[list[int], float | None]:
    """Greedy decoding from the prompt's last logits `last`, the prompt already in `cache`: the
    tokens, and log p(forced | prompt) if the answer begins with `forced` (else None), read off
    the same steps."""
    stops = _eos_ids(model)
    tokens: list[int] = []
    logits, score = last, 0.0
    while True:
        token = int(logits.argmax())
        if len(tokens) < len(forced) and tokens == list(forced[: len(tokens)]):
            score += _logprob(logits, forced[len(tokens)])
        tokens.append(token)
        if len(tokens) == max_new_tokens or token in stops:
            followed = bool(forced) and tokens[: len(forced)] == list(forced)
            return tokens, score if followed else None
        logits = _step(model, cache, token)


def _forced_logprob(model: Any, cache: Any, last: torch.Tensor, forced: Sequence[int]) -> float:
    """log p(forced | prompt), nats: the prompt in `cache`, its last logits `last`."""
    logits = last
    total = 0.0
    for index, token in enumerate(forced):
        total += _logprob(logits, token)
        if index + 1 < len(forced):
            logits = _step(model, cache, token)
    return total


def _logprob(logits: torch.Tensor, token: int) -> float:
    """log p(token) under next-token `logits` (nats)."""
    return float(torch.log_softmax(logits, dim=-1)[token])


def _eos_ids(model: Any) -> set[int]:
    """The token ids that end a generation (the generation config's, else the model config's)."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
