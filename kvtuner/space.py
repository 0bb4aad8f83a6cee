"""SearchSpace: groups of layers that share one precision pair, each with its candidate pairs.

Written by `kvtuner prune` as `space.yaml` (the paper's grouped space), read by `kvtuner search
--space groups`. A space of one group per layer (`SearchSpace.per_layer`) is the default search's.
It also carries the cache layout its configs are stored in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvtuner import defaults
from kvtuner.errors import ConfigError
from kvtuner.io import atomic_write_text
from kvtuner.precision import PrecisionPair, parse_pair


@dataclass(frozen=True)
class LayerGroup:
    """Layers that take the same pair during the search, and the pairs they may take."""

    layers: tuple[int, ...]
    candidates: tuple[PrecisionPair, ...]


@dataclass(frozen=True)
class SearchSpace:
    """One categorical variable per group; `assign` maps a choice per group to a pair per layer."""

    model: str
    scheme: str
    num_layers: int
    groups: tuple[LayerGroup, ...]
    group_size: Any = defaults.SCHEME_DEFAULT  # int, or None for one group per head
    residual_length: int = 0
    block_size: int = defaults.KIVI_BLOCK_SIZE
    sink_tokens: int = defaults.SINK_TOKENS
    smooth: Any = defaults.SCHEME_DEFAULT
    unpruned_candidates: int = 9
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.group_size is defaults.SCHEME_DEFAULT:
            object.__setattr__(self, "group_size", defaults.group_size(self.scheme))
        if self.smooth is defaults.SCHEME_DEFAULT:
            object.__setattr__(self, "smooth", defaults.smooth(self.scheme))
        seen = sorted(layer for group in self.groups for layer in group.layers)
        if seen != list(range(self.num_layers)):
            raise ConfigError(
                f"search space groups must cover layers 0..{self.num_layers - 1} once each; got {seen}"
            )
        for i, group in enumerate(self.groups):
            if not group.candidates:
                raise ConfigError(f"search space group {i} has no candidate pairs")

    @classmethod
    def per_layer(cls, candidates: Sequence[Sequence[PrecisionPair]], **fields: Any) -> SearchSpace:
        """One group per layer, layer i taking `candidates[i]`."""
        groups = tuple(LayerGroup((i,), tuple(c)) for i, c in enumerate(candidates))
        return cls(num_layers=len(groups), groups=groups, **fields)

    @property
    def layout_fields(self) -> dict[str, Any]:
        """The PrecisionConfig fields of this space's cache layout (those of `Layout`)."""
        fields = ("scheme", "group_size", "block_size", "residual_length", "sink_tokens", "smooth")
        return {name: getattr(self, name) for name in fields}

    @property
    def size(self) -> int:
        """Number of configurations in the space (product of candidate counts)."""
        return math.prod(len(g.candidates) for g in self.groups)

    @property
    def log10_size(self) -> float:
        return sum(math.log10(len(g.candidates)) for g in self.groups)

    @property
    def log10_unpruned_size(self) -> float:
        """log10 of the space before pruning and clustering: candidates ** layers."""
        return self.num_layers * math.log10(self.unpruned_candidates)

    def assign(self, choices: Sequence[PrecisionPair]) -> list[PrecisionPair]:
        """One pair per group (in group order) -> one pair per layer."""
        if len(choices) != len(self.groups):
            raise ValueError(f"expected {len(self.groups)} choices, got {len(choices)}")
        pairs: list[PrecisionPair | None] = [None] * self.num_layers
        for group, pair in zip(self.groups, choices):
            for layer in group.layers:
                pairs[layer] = pair
        return pairs  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "scheme": self.scheme,
            "num_layers": self.num_layers,
            "group_size": self.group_size,
            "block_size": self.block_size,
            "residual_length": self.residual_length,
            "sink_tokens": self.sink_tokens,
            "smooth": self.smooth,
            "unpruned_candidates": self.unpruned_candidates,
            "size": self.size,
            "log10_size": round(self.log10_size, 4),
            "log10_unpruned_size": round(self.log10_unpruned_size, 4),
            "metadata": dict(self.metadata),
            "groups": [
                {"layers": list(g.layers), "candidates": [p.name for p in g.candidates]}
                for g in self.groups
            ],
        }

    def save(self, path: str | Path) -> Path:
        """Write YAML atomically (temporary file, then rename)."""
        return atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> SearchSpace:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: search space file not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({_first_line(exc)})") from None
        if not isinstance(data, dict) or "groups" not in data:
            raise ConfigError(f"{path}: not a search space (no 'groups' field)")
        try:
            groups = tuple(
                LayerGroup(
                    layers=tuple(int(x) for x in g["layers"]),
                    candidates=tuple(_pair(path, name) for name in g["candidates"]),
                )
                for g in data["groups"]
            )
            return cls(
                model=str(data.get("model", "")),
                scheme=str(data.get("scheme", "per-token")),
                num_layers=int(data["num_layers"]),
                groups=groups,
                group_size=data.get("group_size", defaults.SCHEME_DEFAULT),
                residual_length=int(data.get("residual_length") or 0),
                block_size=int(data.get("block_size") or defaults.KIVI_BLOCK_SIZE),
                sink_tokens=int(data.get("sink_tokens", defaults.SINK_TOKENS)),
                smooth=data.get("smooth", defaults.SCHEME_DEFAULT),
                unpruned_candidates=int(data.get("unpruned_candidates", 9)),
                metadata=dict(data.get("metadata") or {}),
            )
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: malformed search space ({exc})") from None


def _pair(path: Path, name: Any) -> PrecisionPair:
    pair = parse_pair(str(name))
    if pair is None:
        raise ConfigError(f"{path}: '{name}' is not a precision pair like KV8 or K8V4")
    return pair


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
