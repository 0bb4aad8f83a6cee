"""`kvtuner show`: table and --json of a config; every bad input exits 2 with one line naming file and field."""

import json

import pytest
from conftest import tiny_config

from kvtuner.cli import main
from kvtuner.config import PrecisionConfig
from kvtuner.precision import PrecisionPair


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A model folder holding only a config.json (4 layers, head_dim 16): show never loads weights."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_config("llama", num_layers=4).save_pretrained(folder)
    return folder


def run(capsys, *args):
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_show_spec_with_model_json(capsys, tiny_folder):
    rc, out, err = run(capsys, "show", "KV4", "--model", str(tiny_folder), "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["num_layers"] == 4
    assert data["equivalent_bits"] == 4.0
    assert data["scheme"] == "per-token"
    assert data["layers"][3] == {"layer": 3, "key_bits": 4, "value_bits": 4}
    # per-token KV4, head_dim 16: scale + zero at 16 bits per 16 values = 2 bits, and at 4096
    # tokens the 4 sinks at 16 bits and one 16-bit channel scale per channel (smoothing)
    assert data["effective_bits"] == pytest.approx((4092 * 6 + 4 * 16 + 16) / 4096)


def test_show_file_table(capsys, tmp_path):
    cfg = PrecisionConfig(layers=(PrecisionPair(8, 4), PrecisionPair(2, 2)), model="tiny")
    path = cfg.save(tmp_path / "mixed.yaml")
    rc, out, _ = run(capsys, "show", str(path))
    assert rc == 0
    assert "equivalent bits: 4.000" in out
    assert "scheme:          per-token" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert rows[0][:4] == ["0", "K8V4", "8", "4"]
    assert rows[1][:4] == ["1", "KV2", "2", "2"]


def test_show_kivi_json(capsys, tmp_path):
    path = PrecisionConfig.uniform("K8V4", 3, scheme="kivi").save(tmp_path / "k.yaml")
    rc, out, _ = run(capsys, "show", str(path), "--json")
    assert rc == 0
    data = json.loads(out)
    assert (data["scheme"], data["group_size"], data["residual_length"]) == ("kivi", 32, 32)
    assert data["equivalent_bits"] == 6.0


def test_show_checks_layer_count_against_model(capsys, tmp_path, tiny_folder):
    path = PrecisionConfig.uniform("KV4", 3).save(tmp_path / "three.yaml")
    rc, out, err = run(capsys, "show", str(path), "--model", str(tiny_folder))
    assert rc == 2 and out == ""
    assert err.strip() == f"kvtuner: error: {path}: num_layers: config has 3 layers, model has 4"


GOOD = "{nbits_key: 4, nbits_value: 4}"
BAD_FILES = {
    "malformed-yaml": ("0: {nbits_key: 4\n", "not valid YAML"),
    "layer-missing": (
        f"0: {GOOD}\n2: {GOOD}\n",
        "layers.1: layer 1 is missing (layers must run 0..2 without gaps)",
    ),
    "layer-duplicated": (f"0: {GOOD}\n0: {GOOD}\n", "line 2: key 0 is given twice"),
    "layer-duplicated-int-and-str": (
        f'0: {GOOD}\n1: {GOOD}\n"1": {GOOD}\n',
        "layers.1: layer 1 is given twice",
    ),
    "bits-5": (
        "kvtuner: 1\nlayers:\n"
        + "".join(f"  {i}: {GOOD}\n" for i in range(7))
        + "  7: {nbits_key: 5, nbits_value: 4}\n",
        "layers.7.nbits_key must be one of 2, 4, 8, 16; got 5",
    ),
    "bits-wrong-type": (
        "0: {nbits_key: eight, nbits_value: 4}\n",
        "layers.0.nbits_key must be one of 2, 4, 8, 16; got 'eight'",
    ),
    "bits-bool": (
        "0: {nbits_key: true, nbits_value: 4}\n",
        "layers.0.nbits_key must be one of 2, 4, 8, 16; got True",
    ),
    "field-missing": ("0: {nbits_key: 4}\n", "layers.0.nbits_value: field is missing"),
    "field-unknown": (
        "0: {nbits_key: 4, nbits_value: 4, nbits_query: 4}\n",
        "layers.0.nbits_query: unknown field",
    ),
    "unknown-scheme": (
        f"kvtuner: 1\nscheme: fancy\nlayers:\n  0: {GOOD}\n",
        "scheme must be one of per-token, kivi; got 'fancy'",
    ),
    "negative-group-size": (
        f"kvtuner: 1\ngroup_size: -32\nlayers:\n  0: {GOOD}\n",
        "group_size must be a positive integer or null; got -32",
    ),
    "group-size-wrong-type": (
        f"kvtuner: 1\ngroup_size: big\nlayers:\n  0: {GOOD}\n",
        "group_size must be a positive integer or null; got 'big'",
    ),
    "layers-wrong-type": (
        "kvtuner: 1\nlayers: 5\n",
        "layers: expected a mapping of layer index to bits; got 5",
    ),
    "layer-index-wrong": (
        f"first: {GOOD}\n",
        "layers: 'first' is not a layer index (0, 1, 2, ...)",
    ),
    "layer-index-negative": (
        f"kvtuner: 1\nlayers:\n  -1: {GOOD}\n",
        "layers: -1 is not a layer index",
    ),
    "num-layers-disagrees": (
        f"kvtuner: 1\nnum_layers: 32\nlayers:\n  0: {GOOD}\n",
        "num_layers: says 32, layers has 1",
    ),
    "unknown-top-field": (
        f"kvtuner: 1\nschema: kivi\nlayers:\n  0: {GOOD}\n",
        "schema: unknown field",
    ),
    "newer-format": (f"kvtuner: 3\nlayers:\n  0: {GOOD}\n", "kvtuner: format version 3"),
    "metadata-wrong-type": (
        f"kvtuner: 1\nmetadata: [1, 2]\nlayers:\n  0: {GOOD}\n",
        "metadata must be a mapping; got list",
    ),
    "empty-file": ("", "not a precision config"),
    "mixed-layer-and-head": (
        f"0: {GOOD}\n1: {{0: {GOOD}}}\n",
        "layers.1: mixes per-layer and per-head entries",
    ),
    "head-missing": (
        f"0: {{0: {GOOD}, 2: {GOOD}}}\n",
        "layers.0.1: head 1 is missing (heads must run 0..2 without gaps)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_exits_2_with_one_line(capsys, tmp_path, case):
    text, message = BAD_FILES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    rc, out, err = run(capsys, "show", str(path))
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"kvtuner: error: {path}: ")
    assert message in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["show", "missing.yaml"], "missing.yaml: config file not found"),
        (["show", "configs/missing"], "configs/missing: config file not found"),
        (["show", "KV3"], "KV3: key_bits must be one of 2, 4, 8, 16; got 3"),
        (["show", "KV4"], "KV4: a uniform spec needs the layer count: pass --model"),
    ],
)
def test_bad_argument_exits_2_with_one_line(capsys, args, message):
    rc, out, err = run(capsys, *args)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvtuner: error: ")
    assert message in lines[0]


def test_folder_is_not_a_config(capsys, tmp_path):
    rc, _, err = run(capsys, "show", str(tmp_path))
    assert rc == 2
    assert f"{tmp_path}: is a folder, not a config file" in err


def test_a_config_naming_its_model_shows_effective_bits_without_model(
    capsys, tiny_folder, tmp_path
):
    pairs = [PrecisionPair(8, 4), PrecisionPair(4, 4), PrecisionPair(4, 2), PrecisionPair(8, 8)]
    path = PrecisionConfig(layers=tuple(pairs), model=str(tiny_folder)).save(tmp_path / "c.yaml")
    rc, out, _ = run(capsys, "show", str(path), "--json")
    assert rc == 0
    data = json.loads(out)
    rc, out, _ = run(capsys, "show", str(path), "--model", str(tiny_folder), "--json")
    assert data["effective_bits"] == json.loads(out)["effective_bits"] > 0
    unnamed = PrecisionConfig(layers=tuple(pairs)).save(tmp_path / "u.yaml")
    rc, out, _ = run(capsys, "show", str(unnamed), "--json")
    assert rc == 0 and "effective_bits" not in json.loads(out)
