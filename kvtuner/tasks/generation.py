"""Greedy decoding with a given cache, stopping at text sequences: shared by the tasks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from kvtuner.compat import with_cache

# a fresh cache per prompt; None: the model's own dense cache
CacheFactory = Callable[[], Any] | None


class StopOnText(StoppingCriteria):
    """Stop once the text generated after `prompt_length` tokens contains any of `stop`."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        text = self.tokenizer.decode(input_ids[0, self.prompt_length :], skip_special_tokens=True)
        done = any(s in text for s in self.stop)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the first occurrence of any of `stop`."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


@torch.inference_mode()
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
    device = next(model.parameters()).device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "pad_token_id": pad,
    }
    if stop:
        kwargs["stopping_criteria"] = StoppingCriteriaList(
            [StopOnText(tokenizer, stop, ids.shape[1])]
        )
    if make_cache is not None:
        kwargs = with_cache(model, make_cache(), **kwargs)
    out = model.generate(**kwargs)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return cut_at_stop(text, stop)
