"""The lm-eval model `kvtuner` on local tiny tasks (a YAML task and a JSONL file, no hub).

Tolerances, on a tiny random Llama (4 layers, head_dim 16) with contexts of 40-70 tokens:
- kv_config=fp16 runs the quantized-cache protocol (prefill, then the scored tokens against the
  cache) with 16-bit layers: it must reproduce lm-eval's one-forward dense scores within 1e-4 nats.
- KV8 stays within 0.01 nats of dense on every choice; KV2 moves at least one by more than 0.02.
- Greedy generation: KV8 writes dense's text on at least 10 of 12 prompts, KV2 differs on 2 or more.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_folder

lm_eval = pytest.importorskip("lm_eval")
import kvtuner.lm_eval  # noqa: E402,F401  (registers the model `kvtuner`)

DOCS = 12


def _words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(4, 124)}" for _ in range(n))


def write_tasks(root: Path) -> Path:
    """Three local tasks under `root/tasks`: tiny_mc (multiple choice), tiny_ppl (rolling
    loglikelihood, a perplexity task) and tiny_gen (generation)."""
    rng = random.Random(0)
    tasks = root / "tasks"
    tasks.mkdir(parents=True)
    mc = [
        {
            "context": _words(rng, rng.randrange(40, 70)),
            "choices": [_words(rng, 3) for _ in range(4)],
            "label": i % 4,
        }
        for i in range(DOCS)
    ]
    gen = [
        {"context": _words(rng, rng.randrange(40, 70)), "answer": _words(rng, 2)}
        for _ in range(DOCS)
    ]
    common = "test_split: test\ndataset_path: json\n"
    for name, rows, body in (
        (
            "tiny_mc",
            mc,
            "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
            "doc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        ),
        (
            "tiny_ppl",
            gen,
            "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{context}}'\n"
            "metric_list:\n  - metric: word_perplexity\n",
        ),
        (
            "tiny_gen",
            gen,
            "output_type: generate_until\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{answer}}'\n"
            "generation_kwargs:\n  until: ['<eos>']\n  max_gen_toks: 12\n  do_sample: false\n"
            "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
            "    higher_is_better: true\n",
        ),
    ):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\n{common}dataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"  cache_dir: {root / 'hf-datasets'}\n{body}"
        )
    return tasks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("lm_eval")
    save_tiny_folder(root / "tiny-llama")
    tasks = write_tasks(root)
    # the local tasks only: indexing lm-eval's own 14k task files takes 10 s here
    return root, tasks, TaskManager(include_path=str(tasks), include_defaults=False)


def evaluate(setup, task: str, kv_config: str | None, limit: int | None = None) -> dict:
    root, _, manager = setup
    args = f"pretrained={root / 'tiny-llama'},device=cpu,batch_size=4"
    if kv_config is not None:
        args += f",kv_config={kv_config}"
    return lm_eval.simple_evaluate(
        model="kvtuner",
        model_args=args,
        tasks=[task],
        task_manager=manager,
        limit=limit,
        log_samples=True,
        verbosity="ERROR",
    )


def logprobs(results: dict, task: str) -> list[float]:
    """Every loglikelihood lm-eval got: one per choice (tiny_mc) or per document (tiny_ppl)."""
    values = []
    for sample in results["samples"][task]:
        for resp in sample["resps"]:
            value = resp[0]
            values.append(value[0] if isinstance(value, list | tuple) else value)
    return values


@pytest.mark.parametrize(("task", "count"), [("tiny_mc", DOCS * 4), ("tiny_ppl", DOCS)])
def test_loglikelihood_dense_fp16_kv8_agree_kv2_differs(setup, task, count):
    scores = {c: logprobs(evaluate(setup, task, c), task) for c in (None, "fp16", "KV8", "KV2")}
    dense = scores[None]
    assert len(dense) == count

    def gap(config: str) -> float:
        return max(abs(a - b) for a, b in zip(scores[config], dense))

    assert gap("fp16") < 1e-4  # the cache protocol itself changes nothing
    assert gap("KV8") < 0.01
    assert gap("KV2") > 0.02


def test_generation_reads_the_quantized_cache(setup):
    texts = {}
    for config in (None, "KV8", "KV2"):
        samples = evaluate(setup, "tiny_gen", config)["samples"]["tiny_gen"]
        texts[config] = [s["resps"][0][0] for s in samples]
    assert all(texts[None])  # something was generated

    def same(config: str) -> int:
        return sum(a == b for a, b in zip(texts[config], texts[None]))

    assert same("KV8") >= DOCS - 2
    assert same("KV2") <= DOCS - 2


def test_command_line_wrapper_runs_a_local_task(setup, tmp_path):
    root, tasks, _ = setup
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "kvtuner.lm_eval",
        "--model",
        "kvtuner",
        "--model_args",
        f"pretrained={root / 'tiny-llama'},kv_config=KV8",
        "--tasks",
        "tiny_mc",
        "--include_path",
        str(tasks),
        "--limit",
        "4",
        "--output_path",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tiny_mc" in done.stdout
    (saved,) = out.rglob("results_*.json")
    results = json.loads(saved.read_text())
    assert results["config"]["model"] == "kvtuner"
    model_args = results["config"]["model_args"]
    assert (model_args["kv_config"] if isinstance(model_args, dict) else model_args).count("KV8")
    in_process = evaluate(setup, "tiny_mc", "KV8", limit=4)["results"]["tiny_mc"]
    assert results["results"]["tiny_mc"]["acc,none"] == in_process["acc,none"]


@pytest.mark.parametrize(
    ("model_args", "named"),
    [
        ("pretrained={root},kv_config=KV3", "KV3"),  # k=v,k=v
        ("pretrained={root} kv_config=KV3", "KV3"),  # k=v k=v
        ('{{"pretrained":"{root}","kv_config":"K4V5"}}', "K4V5"),  # JSON
        ("pretrained={root},kv_config={missing}", "missing.yaml"),
        ("pretrained={root},kv_config=KV4,scheme=per-row", "per-row"),
        ("pretrained={root},chunk=0", "chunk"),
    ],
)
def test_bad_model_args_are_one_line_and_exit_2_before_lm_eval_starts(
    setup, capsys, monkeypatch, tmp_path, model_args, named
):
    """A bad kv_config, scheme or chunk fails at once, not after lm-eval has indexed its tasks."""
    root, tasks, _ = setup
    monkeypatch.setattr(
        "lm_eval.__main__.cli_evaluate", lambda: pytest.fail("lm-eval started with bad arguments")
    )
    args = model_args.format(root=root / "tiny-llama", missing=tmp_path / "missing.yaml")
    argv = ["--model", "kvtuner", "--model_args", *args.split(" ", 1)]
    rc = kvtuner.lm_eval.main([*argv, "--tasks", "tiny_mc", "--include_path", str(tasks)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("kvtuner: error:") and named in err[0]


def test_good_model_args_reach_lm_eval_and_the_model_checks_them_too(setup, monkeypatch):
    root, tasks, _ = setup
    started = []
    monkeypatch.setattr("lm_eval.__main__.cli_evaluate", lambda: started.append(1))
    args = f"pretrained={root / 'tiny-llama'},kv_config=KV4,scheme=kivi"
    assert kvtuner.lm_eval.main(["--model", "kvtuner", "--model_args", args]) == 0
    assert started == [1]
    # another model's arguments are lm-eval's business
    assert kvtuner.lm_eval.main(["--model", "hf", "--model_args", "kv_config=KV3"]) == 0
    assert started == [1, 1]
    with pytest.raises(kvtuner.errors.ConfigError, match="KV3"):
        kvtuner.lm_eval.KVTunerLM(pretrained=str(root / "tiny-llama"), kv_config="KV3")
