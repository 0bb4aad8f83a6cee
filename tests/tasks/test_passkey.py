"""Pass-key prompts (exact length, key at its depth, seeded), scoring, and a run on a tiny model."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import build_tiny_model, word_tokenizer

from kvtuner.data import calibration_text, heldout_text, special_prefix
from kvtuner.errors import ConfigError
from kvtuner.tasks import passkey
from kvtuner.tasks.generation import Answer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Chars:
    """One id per character (its code point), no special tokens: ids spell their text back."""

    def __call__(self, text, add_special_tokens: bool = False) -> dict:
        if isinstance(text, str):
            return {"input_ids": [ord(c) for c in text]}
        return {"input_ids": [[ord(c) for c in t] for t in text]}


def spelled(ids) -> str:
    return "".join(map(chr, ids))


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


def fixed_parts(tokenizer, key: str) -> tuple[list[int], list[int], list[int]]:
    head = special_prefix(tokenizer) + passkey.plain_ids(tokenizer, passkey.HEADER)
    needle = passkey.plain_ids(tokenizer, passkey.NEEDLE.format(key=key))
    return head, needle, passkey.plain_ids(tokenizer, passkey.QUESTION)


@pytest.mark.parametrize("context", [64, 300, 511])
def test_prompts_have_exactly_the_asked_length(tokenizer, context):
    prompts = passkey.make_prompts(tokenizer, [context], [0, 33, 100], samples=2)
    assert len(prompts) == 6
    assert all(len(p.input_ids) == p.context == context for p in prompts)


def test_the_key_sits_at_its_depth(tokenizer):
    filler = passkey.Filler.from_text(tokenizer, heldout_text())
    longest = max(len(s) for s in filler.sentences)
    for depth in (0, 25, 50, 75, 100):
        (prompt,) = passkey.make_prompts(tokenizer, [400], [depth], samples=1, seed=5)
        head, needle, question = fixed_parts(tokenizer, prompt.key)
        room = 400 - len(head) - len(needle) - len(question)
        ids = list(prompt.input_ids)
        assert ids[: len(head)] == head and ids[-len(question) :] == question
        assert ids[prompt.needle_start : prompt.needle_end] == needle
        # the needle goes in at a sentence boundary, so within one sentence of the asked depth
        assert abs((prompt.needle_start - len(head)) - depth / 100 * room) <= longest
        assert prompt.actual_depth == pytest.approx(100 * (prompt.needle_start - len(head)) / room)
        if depth == 0:
            assert prompt.needle_start == len(head)
        if depth == 100:
            assert prompt.needle_end == 400 - len(question)


def test_prompts_are_seeded_and_keys_are_five_digits(tokenizer):
    first = passkey.make_prompts(tokenizer, [128, 256], [0, 50], samples=3, seed=1)
    again = passkey.make_prompts(tokenizer, [128, 256], [0, 50], samples=3, seed=1)
    other = passkey.make_prompts(tokenizer, [128, 256], [0, 50], samples=3, seed=2)
    assert first == again
    assert [p.key for p in first] != [p.key for p in other]
    # the filler start is seeded too (the word tokenizer maps held-out words to <unk>: spell it)
    texts = [spelled(p.input_ids) for p in passkey.make_prompts(Chars(), [400], [50], 3, seed=1)]
    again = [spelled(p.input_ids) for p in passkey.make_prompts(Chars(), [400], [50], 3, seed=1)]
    assert texts == again and len(set(texts)) == 3
    assert all(len(p.key) == 5 and p.key.isdigit() for p in first)
    assert len({p.key for p in first}) > 1
    # a cell's prompts do not depend on which other contexts are asked for
    alone = passkey.make_prompts(tokenizer, [256], [0, 50], samples=3, seed=1)
    assert alone == first[6:]


def test_the_filler_is_held_out_text_never_calibration_text():
    prompts = passkey.make_prompts(Chars(), [2000], [50], samples=1, seed=0)
    text = spelled(prompts[0].input_ids)
    assert text.startswith(passkey.HEADER) and text.endswith(passkey.QUESTION)
    assert f"The pass key is {prompts[0].key}. Remember it." in text
    needle = passkey.NEEDLE.format(key=prompts[0].key)
    before = text[len(passkey.HEADER) :].split(needle)[0]
    snippet = " ".join(before.split()[-8:])  # words of the filler, whitespace collapsed
    heldout = " ".join(heldout_text().split())
    assert snippet in heldout and snippet not in " ".join(calibration_text().split())


@pytest.mark.parametrize(
    ("contexts", "depths", "samples", "message"),
    [
        ([], [0], 1, "--contexts: give at least one"),
        ([100], [101], 1, "--depths must be percentages"),
        ([100], [], 1, "--depths: give at least one"),
        ([100], [0], 0, "--samples must be at least 1"),
        ([20], [0], 1, "--contexts: 20 tokens is too short"),
    ],
)
def test_bad_grids_are_config_errors(tokenizer, contexts, depths, samples, message):
    with pytest.raises(ConfigError, match=message):
        passkey.make_prompts(tokenizer, contexts, depths, samples)


def test_answers_score_on_the_first_run_of_digits(monkeypatch):
    assert passkey.answer_digits(" 48213. Remember it.") == "48213"
    assert passkey.answer_digits(" the key: 4821") == "4821"
    assert passkey.answer_digits(" unknown") is None
    prompts = passkey.make_prompts(Chars(), [400, 600], [0, 100], samples=2)
    # an oracle that knows every key but the ones of depth 100 at 600 tokens; it is less sure of
    # the keys the later a prompt's sample (log-probability -sample), whatever the cache
    answers = {
        p.input_ids: (f" {p.key}. Remember" if (p.context, p.depth) != (600, 100) else " 12345")
        for p in prompts
    }
    samples = {p.input_ids: p.sample for p in prompts}
    asked = []

    def answer(model, tokenizer, ids, factories, *, max_new_tokens, forced):
        asked.append(spelled(forced))
        return [Answer(answers[tuple(ids)], -float(samples[tuple(ids)]))] * len(factories)

    monkeypatch.setattr("kvtuner.tasks.generation.answers_per_cache", answer)
    trials = passkey.answer_prompts(None, Chars(), {"dense": None}, prompts)
    assert list(trials["correct"]) == [True] * 6 + [False] * 2
    assert asked == [" " + p.key for p in prompts]  # the key is the forced answer, after a space
    assert list(trials["key_logprob"]) == [0.0, -1.0] * 4
    # the quantized cache gets every answer wrong and is 0.5 nats less sure of each key at 400
    # tokens, 0.5 more sure at 600: paired, it loses 0.5 +- 0 and -0.5 +- 0
    quantized = trials.assign(
        cache="quantized",
        correct=False,
        key_logprob=trials["key_logprob"]
        - 0.5 * (trials["context"] == 400)
        + 0.5 * (trials["context"] == 600),
    )
    result = passkey.PasskeyResult(
        pd.concat([trials.assign(cache="dense"), quantized], ignore_index=True)
    )
    grid = result.grid()
    assert list(grid["dense_accuracy"]) == [1.0, 1.0, 1.0, 0.0]
    assert list(grid["accuracy"]) == [0.0] * 4 and list(grid["samples"]) == [2] * 4
    by_context = result.by_context()
    assert list(by_context["dense_accuracy"]) == [1.0, 0.5]
    assert list(by_context["key_logprob_lost"]) == pytest.approx([0.5, -0.5])
    assert list(by_context["key_logprob_lost_se"]) == pytest.approx([0.0, 0.0])
    assert result.accuracy("dense") == 0.75 and result.accuracy() == 0.0
    # over all 8 pairs: +0.5 four times, -0.5 four times
    assert result.logprob_lost() == pytest.approx((0.0, (2 / 7) ** 0.5 / 8**0.5))


def test_paired_loss_is_mean_and_standard_error_of_the_differences():
    mean, se = passkey.paired_loss([-1.0, -2.0, -3.0], [-2.0, -2.0, -6.0])
    assert mean == pytest.approx(4 / 3)
    # differences 1, 0, 3: squared deviations from 4/3 sum to 42/9; n - 1 = 2
    assert se == pytest.approx((42 / 9 / 2) ** 0.5 / 3**0.5)
    assert passkey.paired_loss([-1.0], [-1.5])[0] == 0.5
    with pytest.raises(ValueError):
        passkey.paired_loss([-1.0, -2.0], [-1.0])


def test_run_passkey_runs_dense_first_then_the_cache(tokenizer):
    from kvtuner.cache import quantized_cache

    model = build_tiny_model("llama")
    built = []

    def factory():
        built.append(1)
        return quantized_cache(model, "KV4")

    result = passkey.run_passkey(model, tokenizer, factory, [96, 128], [0, 100], samples=2)
    trials = result.trials
    assert list(trials["cache"]) == ["dense"] * 8 + ["quantized"] * 8
    assert len(built) == 16  # two fresh caches per quantized prompt: one answers, one scores
    assert list(trials["key"][:8]) == list(trials["key"][8:])  # the same prompts
    grid = result.grid()
    assert len(grid) == 4 and grid["accuracy"].between(0, 1).all()
    assert (trials["key_logprob"] < 0).all()
    # the word tokenizer spells a key as one unknown token, whose log-probability comes from the
    # prompt's exact prefill: no cache can lose any of it
    assert passkey.answer_ids(tokenizer, "12345") == [tokenizer.unk_token_id]
    assert list(result.by_context()["key_logprob_lost"]) == [0.0, 0.0]


def test_heatmap_is_written(tmp_path):
    from kvtuner.tasks.passkey_plot import plot_passkey

    grid = pd.DataFrame(
        {
            "context": [1024, 1024, 4096, 4096],
            "depth": [0.0, 100.0, 0.0, 100.0],
            "samples": [2] * 4,
            "accuracy": [1.0, 0.5, 0.5, 0.0],
            "dense_accuracy": [1.0, 1.0, 1.0, 0.5],
        }
    )
    path = plot_passkey(grid, tmp_path / "plots" / "passkey.png", label="KV4", title="t")
    assert path.read_bytes()[:8] == PNG_MAGIC
