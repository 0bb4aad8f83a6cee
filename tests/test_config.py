"""PrecisionConfig: uniform specs, own-format round trip, published presets, validation."""

import warnings
from pathlib import Path

import pytest
import yaml

from kvtuner.config import PrecisionConfig, check_num_layers, load_config
from kvtuner.errors import ConfigError
from kvtuner.memory import ModelShape, effective_bits
from kvtuner.precision import PrecisionPair

PRESETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "presets"
KV8, K8V4, KV4, K4V2, KV2 = (PrecisionPair(*b) for b in [(8, 8), (8, 4), (4, 4), (4, 2), (2, 2)])


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "spec, pair",
    [
        ("fp16", (16, 16)),
        ("KV8", (8, 8)),
        ("K8V4", (8, 4)),
        ("KV4", (4, 4)),
        ("K4V2", (4, 2)),
        ("KV2", (2, 2)),
        ("K2V8", (2, 8)),
    ],
)
def test_uniform_specs(spec, pair):
    cfg = load_config(spec, num_layers=18)
    assert cfg.layers == (PrecisionPair(*pair),) * 18
    assert cfg.num_layers == 18
    assert cfg.equivalent_bits == sum(pair) / 2
    assert cfg.source == spec
    assert cfg.is_uniform and cfg.name == PrecisionPair(*pair).name


def test_uniform_spec_needs_layer_count():
    with pytest.raises(
        ConfigError, match="KV4: a uniform spec needs the layer count: pass --model"
    ):
        load_config("KV4")


@pytest.mark.parametrize("spec, bits", [("KV3", "got 3"), ("K8V5", "got 5"), ("K6V4", "got 6")])
def test_spec_with_bad_bits_names_the_bits(spec, bits):
    with pytest.raises(ConfigError, match=f"{spec}: .*must be one of 2, 4, 8, 16; {bits}"):
        load_config(spec, num_layers=4)


def test_scheme_defaults():
    per_token = PrecisionConfig.uniform("KV4", 2)
    assert (per_token.scheme, per_token.group_size, per_token.residual_length) == (
        "per-token",
        64,
        0,
    )
    assert per_token.sink_tokens == 4 and per_token.smooth
    kivi = PrecisionConfig.uniform(KV4, 2, scheme="kivi")
    assert (kivi.group_size, kivi.block_size, kivi.residual_length) == (32, 32, 32)
    assert not kivi.smooth
    custom = PrecisionConfig.uniform(
        KV4, 2, scheme="kivi", group_size=40, block_size=64, residual_length=0, sink_tokens=0
    )
    assert (custom.group_size, custom.block_size, custom.residual_length) == (40, 64, 0)
    assert custom.layout.channel_group(80) == 40 and custom.layout.channel_group(64) == 32


def test_version_1_files_keep_their_meaning(tmp_path):
    """Version 1 had one KIVI group_size for key blocks and value groups, and null meant per head."""
    path = tmp_path / "v1.yaml"
    layers = "layers:\n  0: {nbits_key: 4, nbits_value: 2}\n"
    path.write_text(f"kvtuner: 1\nscheme: kivi\ngroup_size: 16\n{layers}")
    cfg = load_config(path)
    assert (cfg.group_size, cfg.block_size) == (16, 16)
    path.write_text(f"kvtuner: 1\nscheme: per-token\ngroup_size: null\n{layers}")
    assert load_config(path).group_size is None


def test_round_trip_own_format(tmp_path):
    cfg = PrecisionConfig(
        layers=(KV8, K8V4, KV4, K4V2, KV2),
        scheme="kivi",
        group_size=32,
        residual_length=32,
        model="gemma-3-270m",
        metadata={"objective": "kl", "value": 0.12, "trials": 200, "found_by": "kvtuner search"},
    )
    path = cfg.save(tmp_path / "out" / "kvtuner_c4.6.yaml")
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "kvtuner_c4.6.yaml"
    ]  # no temp file left
    loaded = load_config(path)
    assert loaded == cfg
    assert loaded.metadata == cfg.metadata
    assert loaded.source == str(path)
    assert loaded.to_yaml() == cfg.to_yaml()
    text = path.read_text()
    assert text.startswith("kvtuner: 2\nmodel: gemma-3-270m\nnum_layers: 5\nscheme: kivi\n")
    assert "  1: {nbits_key: 8, nbits_value: 4}\n" in text
    assert "equivalent_bits: 4.6\n" in text  # (8 + 6 + 4 + 3 + 2) / 5


def test_round_trip_keeps_heads(tmp_path):
    cfg = PrecisionConfig(layers=(KV8, K8V4), heads=((KV8, K8V4), (K8V4, K8V4)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_config(cfg.save(tmp_path / "heads.yaml"))
    assert loaded == cfg
    assert loaded.heads == ((KV8, K8V4), (K8V4, K8V4))


def test_plain_layer_wise_form_loads(tmp_path):
    path = write(
        tmp_path, "0:\n  nbits_key: 4\n  nbits_value: 8\n1:\n  nbits_key: 8\n  nbits_value: 2\n"
    )
    cfg = load_config(path)
    assert cfg.layers == (PrecisionPair(4, 8), PrecisionPair(8, 2))
    assert cfg.scheme == "per-token" and cfg.heads is None
    assert load_config(path, scheme="kivi").scheme == "kivi"


def test_string_layer_keys_load(tmp_path):
    path = write(
        tmp_path, '"0": {nbits_key: 4, nbits_value: 4}\n"1": {nbits_key: 2, nbits_value: 2}\n'
    )
    assert load_config(path).layers == (KV4, KV2)


def test_own_format_layers_may_come_in_any_order(tmp_path):
    path = write(
        tmp_path,
        "kvtuner: 1\nlayers:\n  1: {nbits_key: 2, nbits_value: 2}\n  0: {nbits_key: 8, nbits_value: 8}\n",
    )
    assert load_config(path).layers == (KV8, KV2)


def test_head_wise_takes_max_per_layer_and_warns(tmp_path):
    text = (
        "0: {0: {nbits_key: 2, nbits_value: 8}, 1: {nbits_key: 8, nbits_value: 2}}\n"
        "1: {0: {nbits_key: 4, nbits_value: 4}, 1: {nbits_key: 4, nbits_value: 4}}\n"
    )
    path = write(tmp_path, text)
    with pytest.warns(UserWarning, match=r"heads differ within layers 0;"):
        cfg = load_config(path)
    assert cfg.layers == (KV8, KV4)
    assert cfg.heads == ((PrecisionPair(2, 8), PrecisionPair(8, 2)), (KV4, KV4))


def test_head_wise_with_equal_heads_does_not_warn(tmp_path):
    path = write(
        tmp_path, "0: {0: {nbits_key: 8, nbits_value: 4}, 1: {nbits_key: 8, nbits_value: 4}}\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(path).layers == (K8V4,)


PRESET_FACTS = {
    # file: (layers, equivalent bits by hand from the file, head-wise)
    "Meta-Llama-3-8B-Instruct_k8_v4_per_head.yaml": (32, 6.0, True),
    "Meta-Llama-3.1-8B-Instruct_pertoken_KVTuner4_0.yaml": (32, 115 / 32, False),
    "Qwen2.5-7B-Instruct_kivi_KVTuner4_0.yaml": (28, 110 / 28, False),
}


@pytest.mark.parametrize("name", sorted(PRESET_FACTS))
def test_published_presets_load(name):
    path = PRESETS / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    num_layers, bits, head_wise = PRESET_FACTS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no preset has differing heads
        cfg = load_config(path, num_layers=num_layers)
    assert cfg.num_layers == num_layers
    assert cfg.equivalent_bits == pytest.approx(bits)
    assert (cfg.heads is not None) == head_wise
    raw = yaml.safe_load(path.read_text())
    if head_wise:
        assert len(cfg.heads[0]) == 8 and set(cfg.layers) == {K8V4}
    else:
        assert [(p.key_bits, p.value_bits) for p in cfg.layers] == [
            (raw[i]["nbits_key"], raw[i]["nbits_value"]) for i in range(num_layers)
        ]


def test_check_num_layers(tmp_path):
    path = PrecisionConfig.uniform(KV4, 32).save(tmp_path / "c.yaml")
    cfg = load_config(path)
    check_num_layers(cfg, 32)
    with pytest.raises(ConfigError) as info:
        check_num_layers(cfg, 18)
    assert str(info.value) == f"{path}: num_layers: config has 32 layers, model has 18"
    with pytest.raises(ConfigError, match="config has 32 layers, model has 18"):
        load_config(path, num_layers=18)


def test_scheme_conflict_with_file(tmp_path):
    path = PrecisionConfig.uniform(KV4, 2, scheme="kivi").save(tmp_path / "c.yaml")
    assert load_config(path, scheme="kivi").scheme == "kivi"
    with pytest.raises(ConfigError, match="scheme: config is for kivi, asked for per-token"):
        load_config(path, scheme="per-token")


def test_config_object_passes_through():
    cfg = PrecisionConfig.uniform(KV4, 3)
    assert load_config(cfg) is cfg
    with pytest.raises(ConfigError, match="config has 3 layers, model has 4"):
        load_config(cfg, num_layers=4)


def test_stale_equivalent_bits_warns(tmp_path):
    path = write(
        tmp_path, "kvtuner: 1\nequivalent_bits: 8\nlayers:\n  0: {nbits_key: 4, nbits_value: 4}\n"
    )
    with pytest.warns(UserWarning, match="equivalent_bits says 8, the layers give 4"):
        assert load_config(path).equivalent_bits == 4.0


def test_effective_bits_matches_memory_module():
    cfg = PrecisionConfig(layers=(KV8, K4V2), scheme="kivi")
    shape = ModelShape(num_layers=2, kv_heads=2, head_dim=64, windows=(None, 300))
    expected = effective_bits(cfg.layers, cfg.layout, shape, 1000, 16)
    assert cfg.effective_bits(shape, 1000) == expected
    assert 3.0 < expected < 9.0  # KV8 and K4V2 (6 equivalent bits) plus scales and residual


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layers": ()}, "layers: need one PrecisionPair per layer"),
        (
            {"layers": (KV4,), "scheme": "fancy"},
            "scheme must be one of per-token, kivi; got 'fancy'",
        ),
        (
            {"layers": (KV4,), "group_size": -4},
            "group_size must be a positive integer or null; got -4",
        ),
        (
            {"layers": (KV4,), "residual_length": -1},
            "residual_length must be a non-negative integer",
        ),
        ({"layers": (KV4,), "heads": ()}, "heads: 0 layers, layers: 1"),
    ],
)
def test_constructor_validates(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PrecisionConfig(**kwargs)


def test_config_is_frozen():
    cfg = PrecisionConfig.uniform(KV4, 2)
    with pytest.raises(AttributeError):
        cfg.scheme = "kivi"


def test_load_config_without_model(tmp_path):
    from kvtuner.config import load_config_without_model

    path = PrecisionConfig.uniform(KV4, 3).save(tmp_path / "c.yaml")
    assert load_config_without_model(path).layers == (KV4,) * 3
    assert load_config_without_model("K8V4") is None  # valid, but needs the layer count
    with pytest.raises(ConfigError, match="KV3: key_bits must be one of 2, 4, 8, 16; got 3"):
        load_config_without_model("KV3")
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config_without_model("nope.yaml")
    assert load_config_without_model("K8V4", scheme="kivi") is None
    with pytest.raises(ConfigError, match="K8V4: scheme must be one of per-token, kivi; got 'x'"):
        load_config_without_model("K8V4", scheme="x")
