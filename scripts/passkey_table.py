"""The pass-key table: retrieval accuracy per context of dense, uniform and shipped configs.

Same prompts for every cache (`kvtuner.tasks.passkey.make_prompts`: a five-digit key at depths
0/25/50/75/100 % of held-out filler, asked for at the end); dense runs once. Besides the raw
accuracy, each config's accuracy on the trials dense gets right: the issue asks to judge a
quantized cache only where the model itself retrieves. And where accuracy saturates (every cache
finds every key), a second table: the key's log-probability each config loses against dense on
the same prompts, mean and standard error (`kvtuner.tasks.passkey.paired_loss`).

    python scripts/passkey_table.py --model smollm2-135m --contexts 4096,8000 --samples 2

Every cache answers each prompt after one shared prompt forward (kvtuner's prefill is exact), so a
prompt costs one prefill whatever the number of configs. Writes docs/passkey/<model>.json after
every prompt (every trial measured so far, keyed by context, depth and sample, with its answer and
the key's log-probability: a stopped run continues, new contexts or configs add to it, and trials
saved without a log-probability are answered again) and docs/passkey.md (every model's JSON found).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm.auto import tqdm

from kvtuner.tasks.passkey import PROMPT_VERSION

OUT = Path("docs/passkey")
CONFIGS = (
    ("KV8", "KV8", "per-token"),
    ("KV4", "KV4", "per-token"),
    ("K4V2", "K4V2", "per-token"),
    ("C4.0 per-token", "searched_configs/{model}/per-token/kvtuner_c4.0.yaml", None),
    ("C5.0 per-token", "searched_configs/{model}/per-token/kvtuner_c5.0.yaml", None),
    ("KV4 KIVI", "KV4", "kivi"),
    ("C4.0 KIVI", "searched_configs/{model}/kivi/kvtuner_c4.0.yaml", None),
    ("C5.0 KIVI", "searched_configs/{model}/kivi/kvtuner_c5.0.yaml", None),
)
LABELS = tuple(label for label, _, _ in CONFIGS)  # the table's columns, in order


def version(result: dict) -> int:
    """The prompt version a saved result answered (files without one: version 1)."""
    return int(result.get("prompt_version", 1))


def current(path: Path, otherwise: str) -> dict | None:
    """The saved result at `path` if it answered this prompt version; else None, after a line
    naming the file, its version and `otherwise` (what the caller does instead)."""
    result = json.loads(path.read_text())
    if version(result) != PROMPT_VERSION:
        tqdm.write(f"{path}: prompt version {version(result)}, not {PROMPT_VERSION}; {otherwise}")
        return None
    return result


def trial_keys(result: dict) -> list[tuple[int, float, int]]:
    """(context, depth, sample) of each trial of a saved result (older files: samples in order)."""
    if "sample" in result:
        return list(zip(result["contexts"], result["depths"], result["sample"]))
    seen: dict[tuple[int, float], int] = {}
    keys = []
    for context, depth in zip(result["contexts"], result["depths"]):
        keys.append((context, depth, seen.get((context, depth), 0)))
        seen[(context, depth)] = keys[-1][2] + 1
    return keys


FIELDS = ("correct", "answer", "key_logprob")  # saved per cache and trial


def key_logprobs(result: dict, label: str) -> list:
    """A saved result's key log-probabilities of cache `label`, per trial (None where missing)."""
    return result.get("key_logprob", {}).get(label) or [None] * len(result["contexts"])


def saved_trials(result: dict) -> dict[str, dict[tuple, dict]]:
    """Per cache, per (context, depth, sample): the saved trial's FIELDS (None where missing)."""
    keys = trial_keys(result)
    known: dict[str, dict[tuple, dict]] = {}
    for label, values in result["correct"].items():
        columns = {f: result.get(f, {}).get(label, [None] * len(keys)) for f in FIELDS}
        known[label] = {
            k: {f: columns[f][i] for f in FIELDS}
            for i, k in enumerate(keys)
            if values[i] is not None
        }
    return known


def measure(
    model: str, contexts: list[int], samples: int, depths: list[float], labels: list[str]
) -> None:
    """Dense and each of `labels` on the same prompts, one prompt forward for all caches
    (`kvtuner.tasks.passkey.answer_prompts`). docs/passkey/<model>.json holds every trial measured
    so far, keyed by (context, depth, sample) (prompts are seeded per cell): a run adds the cells
    and caches it lacks (or lacks the key's log-probability of) and rewrites the file after every
    prompt, so a long run can be stopped and continued, and a new context adds to the table
    instead of replacing it."""
    import torch

    from kvtuner.cache import quantized_cache
    from kvtuner.io import atomic_write_text
    from kvtuner.models import load_model
    from kvtuner.tasks.passkey import answer_prompts, make_prompts

    torch.set_grad_enabled(False)
    loaded = load_model(model)
    path = OUT / f"{model}.json"
    before = current(path, "measuring afresh") if path.exists() else None
    known = saved_trials(before) if before is not None else {}
    wanted = ["dense", *[label for label in LABELS if label in labels]]
    sources = {label: (config, scheme) for label, config, scheme in CONFIGS}
    prompts = make_prompts(loaded.tokenizer, contexts, depths, samples, seed=0)

    def factory(label):
        if label == "dense":
            return None
        config, scheme = sources[label]
        source = config.format(model=model)
        return lambda: quantized_cache(loaded.model, source, scheme=scheme)

    def save() -> None:
        keys = sorted({k for trials in known.values() for k in trials})
        caches = [label for label in ["dense", *LABELS] if label in known]
        result = {
            "model": model,
            "prompt_version": PROMPT_VERSION,
            "contexts": [k[0] for k in keys],
            "depths": [k[1] for k in keys],
            "sample": [k[2] for k in keys],
            **{
                field: {
                    label: [known[label].get(k, {}).get(field) for k in keys] for label in caches
                }
                for field in FIELDS
            },
        }
        atomic_write_text(path, json.dumps(result, indent=1) + "\n")

    def done(label: str, key: tuple) -> bool:
        trial = known.get(label, {}).get(key)
        return trial is not None and trial["key_logprob"] is not None

    for prompt in tqdm(prompts, desc=f"{model} pass-key"):
        key = (prompt.context, prompt.depth, prompt.sample)
        missing = [label for label in wanted if not done(label, key)]
        if not missing:
            continue
        trials = answer_prompts(
            loaded.model, loaded.tokenizer, {label: factory(label) for label in missing}, [prompt]
        )
        for row in trials.to_dict(orient="records"):
            known.setdefault(row["cache"], {})[key] = {
                "correct": bool(row["correct"]),
                "answer": row["answer"],
                "key_logprob": float(row["key_logprob"]),
            }
        tqdm.write(
            f"{model} {key}: "
            + ", ".join(
                f"{c}={int(v)} ({lp:.2f})"
                for c, v, lp in zip(trials["cache"], trials["correct"], trials["key_logprob"])
            )
        )
        save()


def load_results(folder: Path = OUT) -> list[dict]:
    """Every model's saved result in `folder` that answered this prompt version (others are named
    on stdout and left out: their prompts were not these)."""
    results = [current(path, "left out") for path in sorted(folder.glob("*.json"))]
    return [result for result in results if result is not None]


def table(results: list[dict], configs: list[str] | None = None) -> str:
    """One row per model and context: dense's accuracy, and each config's with (of dense's hits,
    how many it keeps; "-" where it was not run at that context, and its trial count where it ran
    on only some of them); `configs` picks the columns (default: every config measured)."""
    if configs is None:
        configs = [label for label in LABELS if any(label in r["correct"] for r in results)]
    labels = ["dense", *configs]
    lines = [
        "| model | context | trials | " + " | ".join(labels) + " |",
        "|---|---:|---:|" + "---:|" * len(labels),
    ]
    for result in results:
        contexts = result["contexts"]
        for context in sorted(set(contexts)):
            index = [i for i, c in enumerate(contexts) if c == context]
            dense = [result["correct"]["dense"][i] for i in index]
            cells = [f"{sum(dense) / len(dense):.2f}"]
            for label in labels[1:]:
                values = result["correct"].get(label, [None] * len(contexts))
                pairs = [(values[i], d) for i, d in zip(index, dense) if values[i] is not None]
                if not pairs:  # not measured at this context
                    cells.append("-")
                    continue
                where = [g for g, d in pairs if d]
                kept = f"{sum(where)}/{len(where)}" if where else "-"
                share = sum(g for g, _ in pairs) / len(pairs)
                partial = "" if len(pairs) == len(index) else f", {len(pairs)} trials"
                cells.append(f"{share:.2f} ({kept}{partial})")
            lines.append(
                f"| {result['model']} | {context} | {len(index)} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def logprob_table(results: list[dict], configs: list[str] | None = None) -> str:
    """One row per model and context: dense's mean log-probability of the key (nats), and each
    config's loss against it, mean ± s.e. over the trials both measured (paired by prompt; "-"
    where the config has none at that context); `configs` picks the columns (default: every config
    with a log-probability)."""
    from kvtuner.tasks.passkey import loss_text, paired_loss

    if configs is None:
        configs = [label for label in LABELS if any(any(key_logprobs(r, label)) for r in results)]
    lines = [
        "| model | context | trials | dense log p(key) | " + " | ".join(configs) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(configs),
    ]
    for result in results:
        dense = key_logprobs(result, "dense")
        for context in sorted(set(result["contexts"])):
            index = [
                i for i, c in enumerate(result["contexts"]) if c == context and dense[i] is not None
            ]
            if not index:
                continue
            cells = [f"{sum(dense[i] for i in index) / len(index):.3f}"]
            for label in configs:
                values = key_logprobs(result, label)
                pairs = [(dense[i], values[i]) for i in index if values[i] is not None]
                if not pairs:
                    cells.append("-")
                    continue
                partial = "" if len(pairs) == len(index) else f" ({len(pairs)} trials)"
                cells.append(loss_text(*paired_loss(*zip(*pairs))) + partial)
            lines.append(
                f"| {result['model']} | {context} | {len(index)} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def sign_test(lost: int, gained: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven between keys lost and
    keys gained if either were equally likely (1.0 with no changed trial)."""
    from math import comb

    changed, fewer = lost + gained, min(lost, gained)
    if not changed:
        return 1.0
    tail = sum(comb(changed, k) for k in range(fewer + 1)) / 2**changed
    return min(1.0, 2 * tail)


def pooled_table(results: list[dict], configs: list[str] | None = None) -> str:
    """One row per model and config, over all its contexts: trials, keys lost and gained against
    dense on the same prompts (with the sign test's p), and the key's log-probability lost, mean ±
    s.e. over the trials with one (paired by prompt)."""
    from kvtuner.tasks.passkey import loss_text, paired_loss

    if configs is None:
        configs = [label for label in LABELS if any(label in r["correct"] for r in results)]
    lines = [
        "| model | config | trials | keys lost / gained (sign test p) | key nats lost |",
        "|---|---|---:|---:|---:|",
    ]
    for result in results:
        dense = result["correct"]["dense"]
        dense_lp = key_logprobs(result, "dense")
        for label in configs:
            if label not in result["correct"]:
                continue
            values = result["correct"][label]
            logprobs = key_logprobs(result, label)
            both = [i for i, v in enumerate(values) if v is not None and dense[i] is not None]
            lost = sum(1 for i in both if dense[i] and not values[i])
            gained = sum(1 for i in both if values[i] and not dense[i])
            pairs = [
                (dense_lp[i], logprobs[i]) for i in both if None not in (dense_lp[i], logprobs[i])
            ]
            nats = "-"
            if len(pairs) > 1:
                partial = "" if len(pairs) == len(both) else f" ({len(pairs)} trials)"
                nats = loss_text(*paired_loss(*zip(*pairs))) + partial
            lines.append(
                f"| {result['model']} | {label} | {len(both)} | {lost} / {gained} "
                f"(p = {sign_test(lost, gained):.3f}) | {nats} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--contexts", default="4096,8000")
    parser.add_argument("--depths", default="0,25,50,75,100")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--configs", default=",".join(LABELS))
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.table:
        contexts = [int(c) for c in args.contexts.split(",")]
        depths = [float(d) for d in args.depths.split(",")]
        labels = args.configs.split(",")
        unknown = [label for label in labels if label not in LABELS]
        if unknown:
            parser.error(f"--configs: {', '.join(unknown)} not among {', '.join(LABELS)}")
        measure(args.model, contexts, args.samples, depths, labels)
    results = load_results()
    text = "\n".join(
        [
            "# Pass-key retrieval: dense, uniform and shipped configs on the same prompts",
            "",
            "Accuracy over depths 0/25/50/75/100 % (five-digit key in held-out filler, greedy "
            "answer, exact match). In brackets: of the trials the dense cache gets right, how many "
            "the config keeps (a config is judged only where the model itself retrieves). "
            f"Prompt version {PROMPT_VERSION} (`kvtuner.tasks.passkey`: the question on the "
            "filler's line).",
            "",
            "Regenerate: `python scripts/passkey_table.py --model M --contexts C1,C2 --samples N`.",
            "",
            table(results),
            "",
            "The key's log-probability (nats, the five digits teacher-forced after the question; "
            "`kvtuner.tasks.passkey.answer_ids`): dense's mean, and how much of it each config "
            "loses against dense on the same prompts, mean ± s.e. (positive: the config is less "
            "sure of the key; a loss inside one s.e. is a tie). Where every cache finds every key, "
            "this still ranks them.",
            "",
            logprob_table(results),
            "",
            "Over all of a model's contexts: keys lost (dense right, the config wrong) and gained "
            "on the same prompts, with the two-sided sign test's p, and the key's log-probability "
            "lost, mean ± s.e.:",
            "",
            pooled_table(results),
            "",
        ]
    )
    Path("docs/passkey.md").write_text(text)


if __name__ == "__main__":
    main()
