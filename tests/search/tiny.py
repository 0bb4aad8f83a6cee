"""Helpers for search tests: a tiny model saved as a folder (with a character tokenizer) and a
synthetic calibration (sensitivity.csv, metadata.yaml, space.yaml) for it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from kvtuner.precision import PrecisionPair, candidate_pairs
from kvtuner.space import LayerGroup, SearchSpace

TINY_NAME = "tiny-llama"
TINY_LAYERS = 4
PRUNED = tuple(PrecisionPair(k, v) for k, v in ((8, 8), (8, 4), (4, 4), (4, 2), (2, 2)))


def char_tokenizer():
    """A character-level fast tokenizer over printable ASCII (ids < 128), no download."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def write_tiny_checkpoint(folder: Path, arch: str = "llama", num_layers: int = TINY_LAYERS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _root_conftest().build_tiny_model(arch, num_layers=num_layers).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def _root_conftest():
    """tests/conftest.py as a module (both conftest files are named `conftest`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "kvtuner_tests_root_conftest", Path(__file__).parents[1] / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_sensitivity(num_layers: int) -> pd.DataFrame:
    """e_o per layer and pair: falls with bits, keys weigh 3x values, odd layers 2x as sensitive."""
    rows = []
    for layer in range(num_layers):
        scale = 2.0 if layer % 2 else 1.0
        for pair in candidate_pairs():
            e_k, e_v = 2.0**-pair.key_bits, 2.0**-pair.value_bits
            e_o = scale * (3 * e_k + e_v)
            rows.append(
                (layer, pair.key_bits, pair.value_bits, pair.equivalent_bits, e_o, e_k, e_v)
            )
    return pd.DataFrame(
        rows, columns=["layer", "key_bits", "value_bits", "equivalent_bits", "e_o", "e_k", "e_v"]
    )


def write_calibration(
    root: Path, model: str = TINY_NAME, num_layers: int = TINY_LAYERS, scheme: str = "per-token"
) -> Path:
    """calibration/<model>/<scheme>/{sensitivity.csv, metadata.yaml, space.yaml}; returns the space path.

    Groups: even layers together, odd layers together; candidates KV8, K8V4, KV4, K4V2, KV2.
    """
    folder = root / model / scheme
    folder.mkdir(parents=True, exist_ok=True)
    sensitivity = synthetic_sensitivity(num_layers)
    sensitivity.to_csv(folder / "sensitivity.csv", index=False)
    # single-layer KL of the Pareto pairs: the square of e_o (additive across layers, as a knapsack assumes)
    pruned = {(p.key_bits, p.value_bits) for p in PRUNED}
    kl = sensitivity[
        [(k, v) in pruned for k, v in zip(sensitivity.key_bits, sensitivity.value_bits)]
    ]
    kl = kl.assign(kl=kl.e_o**2, kl_stderr=0.0)[
        ["layer", "key_bits", "value_bits", "equivalent_bits", "kl", "kl_stderr"]
    ]
    kl.to_csv(folder / "layer_kl.csv", index=False)
    meta = {
        "model": model,
        "num_layers": num_layers,
        "scheme": scheme,
        "group_size": None,
        "residual_length": 0,
    }
    (folder / "metadata.yaml").write_text(yaml.safe_dump(meta))
    groups = (
        LayerGroup(tuple(range(0, num_layers, 2)), PRUNED),
        LayerGroup(tuple(range(1, num_layers, 2)), PRUNED),
    )
    space = SearchSpace(model=model, scheme=scheme, num_layers=num_layers, groups=groups)
    return space.save(folder / "space.yaml")
