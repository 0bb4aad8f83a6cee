"""PrecisionConfig: a (key bits, value bits) pair per decoder layer, with its YAML load and save.

Three YAML shapes load:
- kvtuner's own format (written by `save`): header fields, `metadata`, and a `layers:` block
  `{layer: {nbits_key: K, nbits_value: V}}`, optionally a `heads:` block;
- the published layer-wise presets: the `layers:` block alone at top level;
- the published head-wise presets `{layer: {head: {nbits_key, nbits_value}}}`: each layer gets the
  highest key bits and the highest value bits of its heads, so it is never less precise.
A uniform spec (`fp16`, `KV8`, `K8V4`, any `K<a>V<b>`) works wherever a path does.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvtuner import defaults
from kvtuner.errors import ConfigError
from kvtuner.io import atomic_write_text
from kvtuner.precision import (
    SCHEMES,
    SUPPORTED_BITS,
    Layout,
    PrecisionPair,
    equivalent_bits,
    parse_pair,
)

FORMAT_VERSION = 2  # 2 added block_size and sink_tokens; version 1 files read unchanged
TOP_FIELDS = (
    "kvtuner",
    "model",
    "num_layers",
    "scheme",
    "group_size",
    "block_size",
    "residual_length",
    "sink_tokens",
    "smooth",
    "equivalent_bits",
    "metadata",
    "layers",
    "heads",
)
PAIR_FIELDS = ("nbits_key", "nbits_value")


@dataclass(frozen=True)
class PrecisionConfig:
    """Per-layer precision pairs plus the layout they are stored in (see `kvtuner.precision.Layout`).

    `group_size`: channels per scale/zero of per-token groups (default 64 per-token, 32 KIVI;
    None = one group per head, the paper's setting). `block_size`: KIVI's tokens per key block (default 32).
    `residual_length=None` means 0 under `per-token` and 32 under `kivi`. `sink_tokens=None`
    means the default number of first tokens kept in full precision. `heads` keeps the per-head
    pairs of a head-wise preset (`layers[i]` is then the max over `heads[i]`).
    """

    layers: tuple[PrecisionPair, ...]
    scheme: str = defaults.SCHEME
    group_size: Any = defaults.SCHEME_DEFAULT  # int, or None for one group per head
    residual_length: int | None = None
    block_size: int | None = None
    sink_tokens: int | None = None
    smooth: bool | None = None
    model: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)
    source: str | None = field(default=None, compare=False)
    heads: tuple[tuple[PrecisionPair, ...], ...] | None = None

    def __post_init__(self) -> None:
        where = self.source or "config"
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers or not all(isinstance(p, PrecisionPair) for p in self.layers):
            raise ConfigError(
                f"{where}: layers: need one PrecisionPair per layer, got {self.layers!r}"
            )
        check_scheme(self.scheme, where)
        kivi = self.scheme == "kivi"
        if self.residual_length is None:
            residual = defaults.KIVI_RESIDUAL_LENGTH if kivi else 0
            object.__setattr__(self, "residual_length", residual)
        if self.block_size is None:
            object.__setattr__(self, "block_size", defaults.KIVI_BLOCK_SIZE)
        if self.sink_tokens is None:
            object.__setattr__(self, "sink_tokens", defaults.SINK_TOKENS)
        if self.group_size is defaults.SCHEME_DEFAULT:
            object.__setattr__(self, "group_size", defaults.group_size(self.scheme))
        if self.smooth is None or self.smooth is defaults.SCHEME_DEFAULT:
            object.__setattr__(self, "smooth", defaults.smooth(self.scheme))
        if not isinstance(self.smooth, bool):
            raise ConfigError(f"{where}: smooth must be true or false; got {self.smooth!r}")
        if self.group_size is not None and (not _is_int(self.group_size) or self.group_size <= 0):
            raise ConfigError(
                f"{where}: group_size must be a positive integer or null; got {self.group_size!r}"
            )
        for name, least in (("block_size", 1), ("residual_length", 0), ("sink_tokens", 0)):
            value = getattr(self, name)
            if not _is_int(value) or value < least:
                kind = "a positive" if least else "a non-negative"
                raise ConfigError(f"{where}: {name} must be {kind} integer; got {value!r}")
        if self.heads is not None:
            object.__setattr__(self, "heads", tuple(tuple(h) for h in self.heads))
            if len(self.heads) != len(self.layers):
                raise ConfigError(
                    f"{where}: heads: {len(self.heads)} layers, layers: {len(self.layers)}"
                )

    @classmethod
    def uniform(cls, pair: PrecisionPair | str, num_layers: int, **kwargs: Any) -> PrecisionConfig:
        """The same pair on every layer; `pair` may be a spec such as "KV4" or "K8V4"."""
        if isinstance(pair, str):
            pair = _parse_spec(pair)
        if num_layers <= 0:
            raise ConfigError(
                f"{kwargs.get('source') or pair.name}: num_layers must be positive; got {num_layers}"
            )
        return cls(layers=(pair,) * num_layers, **kwargs)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def equivalent_bits(self) -> float:
        """Mean over layers of (key bits + value bits) / 2."""
        return equivalent_bits(self.layers)

    @property
    def is_uniform(self) -> bool:
        return len(set(self.layers)) == 1

    @property
    def name(self) -> str:
        """`KV4` for a uniform config, else `mixed-<equivalent bits>` such as `mixed-3.5`."""
        if self.is_uniform:
            return self.layers[0].name
        return f"mixed-{self.equivalent_bits:g}"

    @property
    def layout(self) -> Layout:
        """How the cache holds the tokens: scheme, groups, blocks, residual, sinks."""
        return Layout(
            scheme=self.scheme,
            group_size=self.group_size,
            block_size=self.block_size,
            residual_length=self.residual_length,
            sink_tokens=self.sink_tokens,
            smooth=self.smooth,
        )

    def effective_bits(
        self, shape: Any, context: int = defaults.BUDGET_CONTEXT, dtype_bits: int = 16
    ) -> float:
        """Bits per cached element at `context` tokens on a model of `shape` (a ModelShape):
        scales, zero points, full-precision sinks and residual, sliding windows included."""
        from kvtuner.memory import effective_bits

        return effective_bits(self.layers, self.layout, shape, context, dtype_bits)

    def with_layers(self, layers: Any, **changes: Any) -> PrecisionConfig:
        """The same layout with other per-layer pairs (and other fields in `changes`)."""
        from dataclasses import replace

        return replace(self, layers=tuple(layers), heads=None, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The own YAML format as a dict (what `save` writes)."""
        data: dict[str, Any] = {
            "kvtuner": FORMAT_VERSION,
            "model": self.model,
            "num_layers": self.num_layers,
            "scheme": self.scheme,
            "group_size": self.group_size,
            "block_size": self.block_size,
            "residual_length": self.residual_length,
            "sink_tokens": self.sink_tokens,
            "smooth": self.smooth,
            "equivalent_bits": round(self.equivalent_bits, 6),
            "metadata": dict(self.metadata),
            "layers": {i: _pair_dict(p) for i, p in enumerate(self.layers)},
        }
        if self.heads is not None:
            data["heads"] = {
                i: {h: _pair_dict(p) for h, p in enumerate(hs)} for i, hs in enumerate(self.heads)
            }
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)

    def save(self, path: str | Path) -> Path:
        """Write the own YAML format atomically (temporary file, then rename); return the path."""
        return atomic_write_text(path, self.to_yaml())


def load_config(
    source: str | Path | PrecisionConfig,
    num_layers: int | None = None,
    scheme: str | None = None,
) -> PrecisionConfig:
    """A YAML path or a uniform spec (`KV4`, `K8V4`, `fp16`) -> PrecisionConfig.

    `num_layers` is required for a uniform spec and, when given, checked against a file's layers.
    `scheme` sets the scheme of specs and of presets that do not name one; a file that names a
    different scheme is an error. A PrecisionConfig passes through (checked the same way).
    """
    if isinstance(source, PrecisionConfig):
        config = source
    else:
        path = Path(source).expanduser()
        text = str(source)
        if path.is_file():
            config = _load_file(path, scheme)
        elif (pair := _spec_or_none(text)) is not None:
            if num_layers is None:
                raise ConfigError(
                    f"{text}: a uniform spec needs the layer count: pass --model (or num_layers=)"
                )
            return PrecisionConfig.uniform(
                pair, num_layers, scheme=scheme or "per-token", source=text
            )
        elif path.is_dir():
            raise ConfigError(f"{text}: is a folder, not a config file")
        else:
            raise ConfigError(
                f"{text}: config file not found (nor a uniform spec such as KV4, K8V4, fp16)"
            )
    if scheme is not None and config.scheme != scheme:
        raise ConfigError(
            f"{config.source or 'config'}: scheme: config is for {config.scheme}, asked for {scheme}"
        )
    if num_layers is not None:
        check_num_layers(config, num_layers)
    return config


def load_config_without_model(
    source: str | Path | PrecisionConfig, scheme: str | None = None
) -> PrecisionConfig | None:
    """Validate `source` before a model is loaded: a file -> its PrecisionConfig, a valid uniform
    spec -> None (it needs the layer count), anything else -> ConfigError.

    Commands call this first so that a bad config fails in a second, not after a model load, and
    then `load_config(result or source, num_layers=..., scheme=...)` once the model is known.
    """
    if isinstance(source, PrecisionConfig) or Path(source).expanduser().is_file():
        return load_config(source, scheme=scheme)
    if _spec_or_none(str(source)) is not None:
        if scheme is not None:
            check_scheme(scheme, str(source))
        return None
    return load_config(source, scheme=scheme)


def check_scheme(scheme: Any, where: str) -> None:
    """ConfigError unless `scheme` is one kvtuner stores."""
    if scheme not in SCHEMES:
        raise ConfigError(f"{where}: scheme must be one of {', '.join(SCHEMES)}; got {scheme!r}")


def check_num_layers(config: PrecisionConfig, num_layers: int) -> None:
    """ConfigError unless `config` has exactly `num_layers` layers."""
    if config.num_layers != num_layers:
        raise ConfigError(
            f"{config.source or 'config'}: num_layers: config has {config.num_layers} layers, "
            f"model has {num_layers}"
        )


def _spec_or_none(text: str) -> PrecisionPair | None:
    try:
        return parse_pair(text)
    except ValueError as exc:
        raise ConfigError(f"{text}: {exc}") from None


def _parse_spec(text: str) -> PrecisionPair:
    pair = _spec_or_none(text)
    if pair is None:
        raise ConfigError(f"{text}: not a uniform spec such as fp16, KV8, K8V4, KV4, K4V2, KV2")
    return pair


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise ConfigError(f"line {line}: key {key!r} is given twice")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _load_file(path: Path, scheme: str | None) -> PrecisionConfig:
    where = str(path)
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader)  # a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({_yaml_problem(exc)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{where}: not a precision config (expected a mapping of layers)")
    if "layers" in data or "kvtuner" in data or "heads" in data:
        return _from_own_format(data, where, scheme)
    layers, heads = _parse_layers(data, where, "layers.")
    return PrecisionConfig(layers=layers, heads=heads, scheme=scheme or "per-token", source=where)


def _from_own_format(data: dict[Any, Any], where: str, scheme: str | None) -> PrecisionConfig:
    unknown = [str(k) for k in data if k not in TOP_FIELDS]
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: unknown field (known: {', '.join(TOP_FIELDS)})")
    version = data.get("kvtuner", FORMAT_VERSION)
    if not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        raise ConfigError(
            f"{where}: kvtuner: format version {version!r} is not one this kvtuner reads (1, 2)"
        )
    if "layers" not in data:
        raise ConfigError(f"{where}: layers: field is missing")
    layers, heads = _parse_layers(data["layers"], where, "layers.")
    if data.get("heads") is not None:
        if heads is not None:
            raise ConfigError(f"{where}: heads: given twice (in layers and in heads)")
        from_heads, heads = _parse_layers(data["heads"], where, "heads.", heads_only=True)
        if len(heads) != len(layers):
            raise ConfigError(f"{where}: heads: has {len(heads)} layers, layers has {len(layers)}")
        for i, (pair, implied) in enumerate(zip(layers, from_heads)):
            if pair != implied:
                raise ConfigError(
                    f"{where}: layers.{i}: is {pair.name}, but its heads give {implied.name}"
                )
    stated = data.get("num_layers")
    if stated is not None and (not _is_int(stated) or stated != len(layers)):
        raise ConfigError(f"{where}: num_layers: says {stated!r}, layers has {len(layers)}")
    file_scheme = data.get("scheme")
    if file_scheme is not None and not isinstance(file_scheme, str):
        raise ConfigError(
            f"{where}: scheme must be one of {', '.join(SCHEMES)}; got {file_scheme!r}"
        )
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise ConfigError(f"{where}: model must be a string; got {model!r}")
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ConfigError(f"{where}: metadata must be a mapping; got {type(metadata).__name__}")
    chosen_scheme = file_scheme or scheme or defaults.SCHEME
    group_size = data.get("group_size", defaults.SCHEME_DEFAULT)
    block_size = data.get("block_size")
    sink_tokens, smooth = data.get("sink_tokens"), data.get("smooth")
    if version == 1:  # version 1 files keep their meaning: no sinks, no smoothing
        sink_tokens, smooth = 0, False
        if chosen_scheme == "kivi":
            # one group_size for KIVI's key blocks and value groups (null meant 32)
            group_size = group_size if group_size is not None else defaults.KIVI_GROUP_SIZE
            block_size = group_size
        elif group_size is defaults.SCHEME_DEFAULT:
            group_size = None  # version 1 per-token: one group per head
    config = PrecisionConfig(
        layers=layers,
        heads=heads,
        scheme=chosen_scheme,
        group_size=group_size,
        block_size=block_size,
        residual_length=data.get("residual_length"),
        sink_tokens=sink_tokens,
        smooth=smooth,
        model=model,
        metadata=dict(metadata),
        source=where,
    )
    stated_bits = data.get("equivalent_bits")
    if stated_bits is not None and (
        not isinstance(stated_bits, (int, float))
        or abs(stated_bits - config.equivalent_bits) > 1e-6
    ):
        warnings.warn(
            f"{where}: equivalent_bits says {stated_bits!r}, the layers give {config.equivalent_bits:g}; "
            "using the layers",
            stacklevel=3,
        )
    return config


def _parse_layers(
    block: Any, where: str, prefix: str, heads_only: bool = False
) -> tuple[tuple[PrecisionPair, ...], tuple[tuple[PrecisionPair, ...], ...] | None]:
    """`{layer: pair}` or `{layer: {head: pair}}` -> (per-layer pairs, per-head pairs or None)."""
    entries = _indexed(block, where, prefix.rstrip(".") or "layers", "layer")
    head_wise = [
        isinstance(v, dict) and bool(v) and all(_index(k) is not None for k in v)
        for _, v in entries
    ]
    if heads_only and not all(head_wise):
        raise ConfigError(
            f"{where}: {prefix}{entries[head_wise.index(False)][0]}: expected {{head: pair}}"
        )
    if any(head_wise) and not all(head_wise):
        mixed = entries[head_wise.index(not head_wise[0])][0]
        raise ConfigError(f"{where}: {prefix}{mixed}: mixes per-layer and per-head entries")
    if not head_wise[0]:
        return tuple(_pair(v, where, f"{prefix}{i}") for i, v in entries), None
    heads = tuple(
        tuple(
            _pair(p, where, f"{prefix}{i}.{h}")
            for h, p in _indexed(v, where, f"{prefix}{i}", "head")
        )
        for i, v in entries
    )
    layers = tuple(
        PrecisionPair(max(p.key_bits for p in hs), max(p.value_bits for p in hs)) for hs in heads
    )
    differing = [str(i) for i, hs in enumerate(heads) if len(set(hs)) > 1]
    if differing:
        warnings.warn(
            f"{where}: heads differ within layers {', '.join(differing)}; "
            "each layer uses the max key and value bits of its heads",
            stacklevel=4,
        )
    return layers, heads


def _indexed(block: Any, where: str, name: str, what: str) -> list[tuple[int, Any]]:
    """A mapping (or list) keyed 0..n-1 -> [(index, value)] in order; ConfigError on gaps or repeats."""
    if isinstance(block, list):
        block = dict(enumerate(block))
    if not isinstance(block, dict) or not block:
        raise ConfigError(
            f"{where}: {name}: expected a mapping of {what} index to bits; got {block!r}"
        )
    entries: dict[int, Any] = {}
    for key, value in block.items():
        index = _index(key)
        if index is None:
            raise ConfigError(f"{where}: {name}: {key!r} is not a {what} index (0, 1, 2, ...)")
        if index in entries:
            raise ConfigError(f"{where}: {name}.{index}: {what} {index} is given twice")
        entries[index] = value
    missing = sorted(set(range(max(entries) + 1)) - set(entries))
    if missing:
        raise ConfigError(
            f"{where}: {name}.{missing[0]}: {what} {missing[0]} is missing ({what}s must run 0..{max(entries)} without gaps)"
        )
    return sorted(entries.items())


def _index(key: Any) -> int | None:
    if _is_int(key) and key >= 0:
        return key
    if isinstance(key, str) and key.strip().isdigit():
        return int(key.strip())
    return None


def _pair(entry: Any, where: str, name: str) -> PrecisionPair:
    if not isinstance(entry, dict):
        raise ConfigError(
            f"{where}: {name}: expected {{nbits_key: K, nbits_value: V}}; got {entry!r}"
        )
    unknown = [str(k) for k in entry if k not in PAIR_FIELDS]
    if unknown:
        raise ConfigError(
            f"{where}: {name}.{unknown[0]}: unknown field (expected nbits_key, nbits_value)"
        )
    bits = []
    for key in PAIR_FIELDS:
        if key not in entry:
            raise ConfigError(f"{where}: {name}.{key}: field is missing")
        value = entry[key]
        if not _is_int(value) or value not in SUPPORTED_BITS:
            allowed = ", ".join(map(str, SUPPORTED_BITS))
            raise ConfigError(f"{where}: {name}.{key} must be one of {allowed}; got {value!r}")
        bits.append(value)
    return PrecisionPair(*bits)


def _pair_dict(pair: PrecisionPair) -> dict[str, int]:
    return {"nbits_key": pair.key_bits, "nbits_value": pair.value_bits}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    return f"{problem}, line {mark.line + 1}" if mark is not None else str(problem)
