"""scripts/passkey_table.py: saved results of another prompt version are measured afresh and
left out of the tables, never mixed with this version's."""

import importlib.util
import json
from pathlib import Path

import pytest

from kvtuner.tasks import passkey

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def table_script():
    spec = importlib.util.spec_from_file_location("passkey_table", SCRIPTS / "passkey_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def saved(model: str, dense: list[bool], kv4: list[bool], version: int | None) -> dict:
    result = {
        "model": model,
        "contexts": [4096] * len(dense),
        "depths": [0.0, 50.0, 100.0][: len(dense)],
        "sample": [0] * len(dense),
        "correct": {"dense": dense, "KV4": kv4},
    }
    if version is not None:
        result["prompt_version"] = version
    return result


def test_results_of_another_prompt_version_are_left_out(table_script, tmp_path, capsys):
    files = {
        "old-model": saved("old-model", [True, True, True], [True, True, True], None),
        "older-model": saved("older-model", [True, True, True], [True, True, True], 1),
        "new-model": saved("new-model", [True, False, True], [True, False, False], 2),
    }
    for name, result in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(result))
    results = table_script.load_results(tmp_path)
    assert [r["model"] for r in results] == ["new-model"]
    out = capsys.readouterr().out
    assert "old-model.json: prompt version 1, not 2; left out" in out
    assert "older-model.json: prompt version 1, not 2; left out" in out
    rendered = table_script.table(results)
    assert "old-model" not in rendered
    # dense 2 of 3; KV4 keeps 1 of dense's 2 hits
    assert "| new-model | 4096 | 3 | 0.67 | 0.33 (1/2) |" in rendered


def test_a_saved_result_names_its_prompt_version(table_script):
    assert table_script.PROMPT_VERSION == passkey.PROMPT_VERSION
    assert table_script.version({"prompt_version": 7}) == 7
    assert table_script.version({}) == 1  # files written before versions were kept


def test_the_log_probability_table_pairs_each_config_with_dense(table_script):
    result = saved("m", [True, True, True], [True, True, False], 2)
    result["key_logprob"] = {"dense": [-0.1, -0.2, -0.3], "KV4": [-0.6, -0.2, -1.3]}
    rendered = table_script.logprob_table([result])
    # losses 0.5, 0.0, 1.0: mean 0.5, standard deviation 0.5, s.e. 0.5 / sqrt(3)
    assert "| m | 4096 | 3 | -0.200 | 0.500 ± 0.289 |" in rendered
    result["key_logprob"]["KV4"][2] = None  # measured on two trials only: said so
    assert "| m | 4096 | 3 | -0.200 | 0.250 ± 0.250 (2 trials) |" in table_script.logprob_table(
        [result]
    )


def test_trials_saved_without_a_log_probability_are_kept_but_incomplete(table_script):
    old = saved("m", [True, False], [True, None], 2)  # KV4 never ran the second trial
    known = table_script.saved_trials(old)
    assert known["dense"][(4096, 50.0, 0)] == {
        "correct": False,
        "answer": None,
        "key_logprob": None,
    }
    assert list(known["KV4"]) == [(4096, 0.0, 0)]
    assert table_script.logprob_table([old]).count("\n") == 1  # a header, no rows


def test_the_sign_test_is_exact_and_two_sided(table_script):
    assert table_script.sign_test(0, 0) == 1.0
    assert table_script.sign_test(6, 0) == pytest.approx(2 / 64)
    assert table_script.sign_test(6, 1) == pytest.approx(2 * 8 / 128)  # 0.125
    assert table_script.sign_test(1, 6) == table_script.sign_test(6, 1)
    assert table_script.sign_test(2, 2) == 1.0


def test_the_pooled_table_counts_keys_lost_and_gained_over_all_contexts(table_script):
    result = saved("m", [True, True, False], [False, True, True], 2)
    result["contexts"] = [4096, 8192, 8192]
    result["key_logprob"] = {"dense": [-0.1, -0.2, -3.0], "KV4": [-2.1, -0.2, -0.1]}
    rendered = table_script.pooled_table([result])
    # lost at 4096, gained at 8192; log-probability lost 2.0, 0.0, -2.9 -> mean -0.3
    assert "| m | KV4 | 3 | 1 / 1 (p = 1.000) | -0.300 ± 1.422 |" in rendered
