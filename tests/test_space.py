"""SearchSpace: assignment of group choices to layers, sizes, YAML round trip and bad files."""

import math

import pytest

from kvtuner.errors import ConfigError
from kvtuner.precision import PrecisionPair
from kvtuner.space import LayerGroup, SearchSpace

KV8, K8V4, KV4, KV2 = (
    PrecisionPair(8, 8),
    PrecisionPair(8, 4),
    PrecisionPair(4, 4),
    PrecisionPair(2, 2),
)


def make_space(**kwargs) -> SearchSpace:
    groups = (LayerGroup((0, 2), (KV8, KV4)), LayerGroup((1,), (KV8, K8V4, KV2)))
    return SearchSpace(model="tiny", scheme="per-token", num_layers=3, groups=groups, **kwargs)


def test_size_and_logs():
    space = make_space()
    assert space.size == 2 * 3
    assert space.log10_size == pytest.approx(math.log10(6))
    assert space.log10_unpruned_size == pytest.approx(3 * math.log10(9))


def test_assign_maps_group_choices_to_layers():
    space = make_space()
    assert space.assign([KV4, K8V4]) == [KV4, K8V4, KV4]
    with pytest.raises(ValueError, match="expected 2 choices"):
        space.assign([KV4])


def test_groups_must_cover_every_layer_once():
    with pytest.raises(ConfigError, match="cover layers 0..2"):
        SearchSpace("tiny", "per-token", 3, (LayerGroup((0, 1), (KV8,)),))
    with pytest.raises(ConfigError, match="cover layers"):
        SearchSpace("tiny", "per-token", 2, (LayerGroup((0, 1), (KV8,)), LayerGroup((1,), (KV8,))))
    with pytest.raises(ConfigError, match="group 1 has no candidate"):
        SearchSpace("tiny", "per-token", 2, (LayerGroup((0,), (KV8,)), LayerGroup((1,), ())))


def test_save_load_round_trip(tmp_path):
    space = make_space(group_size=32, residual_length=32, metadata={"eps": 0.3})
    path = space.save(tmp_path / "space.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]  # no temp file left
    loaded = SearchSpace.load(path)
    assert loaded == space
    assert loaded.metadata == {"eps": 0.3}
    text = path.read_text()
    assert "KV8" in text and "K8V4" in text  # pairs written by name, readable


@pytest.mark.parametrize(
    "text, message",
    [
        ("groups: [\n", "not valid YAML"),
        ("model: tiny\n", "no 'groups' field"),
        ("num_layers: 1\ngroups: [{layers: [0], candidates: [KV9]}]\n", "got 9"),
        (
            "num_layers: 1\ngroups: [{layers: [0], candidates: [banana]}]\n",
            "'banana' is not a precision pair",
        ),
        ("groups: [{layers: [0], candidates: [KV8]}]\n", "malformed search space"),
    ],
)
def test_load_bad_file(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        SearchSpace.load(path)
    assert str(path) in str(info.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="search space file not found"):
        SearchSpace.load(tmp_path / "nope.yaml")
