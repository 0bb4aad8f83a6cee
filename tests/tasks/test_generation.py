"""Greedy decoding of several prompts as one left-padded batch (`kvtuner.tasks.generation`)."""

import pytest
from conftest import build_tiny_model, word_tokenizer

import kvtuner
from kvtuner.config import PrecisionConfig
from kvtuner.tasks.generation import greedy_text, greedy_text_per_cache, greedy_texts

PROMPTS = ["w5 w9 w11", "w40 w41 w42 w43 w44 w45 w46", "w7 " * 12, "w100"]


def ids(tokenizer, text):
    return tokenizer(text.strip())["input_ids"]


def five_factories(model, built=None):
    """dense (None), then factories of KV4, KV2, K2V4 KIVI and KV2 quantizing its prefill (small
    blocks and residual for the tiny models); each appends its spec to `built` when it builds."""

    def make(spec, scheme, **kwargs):
        precision = PrecisionConfig.uniform(
            spec, model.config.num_hidden_layers, scheme=scheme, block_size=4, residual_length=4
        )

        def factory():
            if built is not None:
                built.append(spec)
            return kvtuner.quantized_cache(model, precision, **kwargs)

        return factory

    return [
        None,
        make("KV4", "per-token"),
        make("KV2", "per-token"),
        make("K2V4", "kivi"),
        make("KV2", "per-token", quantize_prefill=True),
    ]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_padded_batch_continues_each_prompt_as_it_would_alone(arch):
    """Dense cache: padding is masked out, so each row's greedy continuation is its own."""
    model, tokenizer = build_tiny_model(arch), word_tokenizer()
    prompts = [ids(tokenizer, p) for p in PROMPTS]
    alone = [greedy_text(model, tokenizer, p, max_new_tokens=30) for p in prompts]
    assert greedy_texts(model, tokenizer, prompts, max_new_tokens=30) == alone
    assert len(set(alone)) > 1  # the rows really differ


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("scheme", ["per-token", "kivi"])
def test_quantized_rows_of_one_length_decode_as_they_would_alone(arch, scheme):
    """kvtuner's cache quantizes each row on its own: without padding, a batch gives each row
    what it gives alone (with padding, KIVI blocks and the smoothing warm-up count padded
    positions, so rows may part from their lone runs late; tests/test_cache.py checks that
    every row keeps its own first tokens as sinks)."""
    model, tokenizer = build_tiny_model(arch), word_tokenizer()
    precision = PrecisionConfig.uniform(
        "KV4", model.config.num_hidden_layers, scheme=scheme, block_size=4, residual_length=4
    )

    def factory():
        return kvtuner.quantized_cache(model, precision)

    prompts = [ids(tokenizer, f"w{i} w{i + 7} w{i + 3} w{2 * i} w9 w{i + 1}") for i in (5, 20, 41)]
    alone = [greedy_text(model, tokenizer, p, factory, max_new_tokens=30) for p in prompts]
    assert greedy_texts(model, tokenizer, prompts, factory, max_new_tokens=30) == alone
    padded = greedy_texts(
        model, tokenizer, [prompts[0][:2], *prompts[1:]], factory, max_new_tokens=30
    )
    assert len(padded) == 3 and all(padded)  # a padded batch decodes too


def test_each_row_stops_at_its_own_stop_text():
    model, tokenizer = build_tiny_model("llama"), word_tokenizer()
    prompts = [ids(tokenizer, p) for p in PROMPTS]
    free = greedy_texts(model, tokenizer, prompts, max_new_tokens=20)
    stop = free[0].split()[2]  # a word the first row writes third
    cut = greedy_texts(model, tokenizer, prompts, max_new_tokens=20, stop=(stop,))
    for full, short in zip(free, cut):
        assert short == full[: full.find(stop)] if stop in full else short == full
    assert len(cut[0].split()) == 2


def test_an_empty_prompt_is_refused():
    model, tokenizer = build_tiny_model("llama"), word_tokenizer()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        greedy_texts(model, tokenizer, [[5, 6], []], max_new_tokens=3)
    assert greedy_texts(model, tokenizer, [], max_new_tokens=3) == []


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_one_shared_prefill_gives_each_cache_its_own_continuation(arch):
    """greedy_text_per_cache runs the prompt once for every cache: each continuation is the one
    the cache gives alone (greedy_text), for dense, both schemes and a cache quantizing its prefill."""
    model, tokenizer = build_tiny_model(arch), word_tokenizer()
    factories = five_factories(model)
    for text in ("w3 w8 w1 w30 w2 w9 w17 w5 w4 w11 w12 w40 w41 w3 w8 w1", "w6 " * 20):
        prompt = ids(tokenizer, text)
        alone = [greedy_text(model, tokenizer, prompt, f, max_new_tokens=12) for f in factories]
        shared = greedy_text_per_cache(model, tokenizer, prompt, factories, max_new_tokens=12)
        assert shared == alone
    assert len(set(alone)) > 1  # the caches really differ


def _alone_logprob(model, prompt, forced, cache):
    """log p(forced | prompt) with `cache` alone: the prompt's own forward, then a step a token."""
    import torch

    from kvtuner.compat import cache_kwarg

    if cache is None:  # dense: the whole continuation in the same forward, no cache at all
        logits = model(input_ids=torch.tensor([prompt + forced[:-1]])).logits[0, len(prompt) - 1 :]
        rows = torch.log_softmax(logits.float(), -1)
        return float(rows[torch.arange(len(forced)), torch.tensor(forced)].sum())
    kwargs = {cache_kwarg(model): cache}
    logits = model(input_ids=torch.tensor([prompt]), use_cache=True, **kwargs).logits[0, -1]
    total = 0.0
    for index, token in enumerate(forced):
        total += float(torch.log_softmax(logits.float(), -1)[token])
        if index + 1 < len(forced):
            step = torch.tensor([[token]])
            logits = model(input_ids=step, use_cache=True, **kwargs).logits[0, -1]
    return total


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_forced_logprobs_are_each_caches_own(arch):
    """answers_per_cache's log-probability of a given continuation, after one shared prefill, is
    the one each cache gives alone (dense: one forward over prompt and continuation, past Gemma 3's
    sliding window), whether it is read off the greedy answer (which begins with the continuation)
    or scored by a second cache (the answer went elsewhere); the greedy texts are greedy_text's; the
    caches' log-probabilities differ."""
    import torch

    from kvtuner.tasks.generation import answers_per_cache

    model, tokenizer = build_tiny_model(arch), word_tokenizer()
    built = []
    factories = five_factories(model, built)
    prompt = ids(tokenizer, " ".join(f"w{(7 * i) % 97 + 4}" for i in range(30)))
    texts = [greedy_text(model, tokenizer, prompt, f, max_new_tokens=8) for f in factories]
    greedy = ids(tokenizer, texts[1])[:6]  # what KV4 answers
    other = ids(tokenizer, "w12 w50 w3 w77 w8 w9")  # what no cache answers
    assert all(ids(tokenizer, text)[:6] != other for text in texts)
    calls = {}
    for forced in (other, greedy):
        built.clear()
        with torch.inference_mode():
            answers = answers_per_cache(
                model, tokenizer, prompt, factories, max_new_tokens=8, forced=forced
            )
            calls[tuple(forced)] = list(built)
            alone = [
                _alone_logprob(model, prompt, forced, None if f is None else f()) for f in factories
            ]
        assert [a.text for a in answers] == texts
        got = [a.forced_logprob for a in answers]
        assert got == pytest.approx(alone, rel=1e-4, abs=1e-4)
        assert all(value < 0 for value in got)
        assert abs(got[2] - got[0]) > 1e-3  # KV2 really differs from dense
    # a second cache scores a continuation the greedy answer leaves; KV4 reads its own answer's
    # log-probability off its greedy steps, no second KV4 cache
    assert calls[tuple(other)].count("KV4") == 2 and calls[tuple(greedy)].count("KV4") == 1
    assert all(
        a.forced_logprob is None
        for a in answers_per_cache(model, tokenizer, prompt, factories[:2], max_new_tokens=2)
    )
