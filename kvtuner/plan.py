"""An engine plan: per layer, what a serving engine stores (`kvtuner.targets.Choice`), as a file.

`allocate_plan` picks, under a cap on effective bits of engine storage, the engine setting and the
per-layer choices that minimise the summed single-layer KL (the knapsack of `kvtuner.allocate`
within each setting, the best setting kept); `first_last_plan` does the same for the
ik_llama.cpp form (one type pair for the first N layers, one for the last M, one between).
A plan is saved as YAML (`kvtuner_engine_plan: 1`) with the per-layer amax of the keys and values
measured on the calibration text (what per-tensor FP8 / NVFP4 scales are made of).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from kvtuner.allocate import allocate
from kvtuner.errors import ConfigError
from kvtuner.io import atomic_write_text
from kvtuner.memory import engine_layer_costs, token_shares
from kvtuner.targets import (
    DENSE,
    LLAMACPP_TYPES,
    LMDEPLOY,
    MODELOPT,
    VLLM_DTYPES,
    Choice,
    Losses,
    check_target,
    choice_loss,
    family_losses,
    llamacpp_choice,
    lmdeploy_choice,
    modelopt_choice,
    usable_families,
    vllm_choice,
)

PLAN_VERSION = 1


@dataclass(frozen=True)
class EnginePlan:
    """Per layer, the engine's KV choice; `family` the engine setting (vLLM's dtype, ...).

    `kv_amax[l]` = (max |key|, max |value|) of layer l on the calibration text, or None.
    """

    target: str
    family: str
    layers: tuple[Choice, ...]
    model: str | None = None
    kv_amax: tuple[tuple[float, float], ...] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def form(self) -> str:
        """ "uniform" when every layer has the same choice, else "per-layer"."""
        return "uniform" if len(set(self.layers)) == 1 else "per-layer"

    def with_amax(self, kv_amax: Sequence[tuple[float, float]] | None) -> EnginePlan:
        if kv_amax is not None and len(kv_amax) != self.num_layers:
            raise ConfigError(f"{len(kv_amax)} amax pairs for a plan of {self.num_layers} layers")
        amax = None if kv_amax is None else tuple((float(k), float(v)) for k, v in kv_amax)
        return replace(self, kv_amax=amax)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "kvtuner_engine_plan": PLAN_VERSION,
            "target": self.target,
            "family": self.family,
        }
        if self.model:
            data["model"] = self.model
        data["layers"] = [c.label for c in self.layers]
        if self.kv_amax is not None:
            data["kv_amax"] = [[k, v] for k, v in self.kv_amax]
        if self.metadata:
            data["metadata"] = self.metadata
        return data

    def save(self, path: str | Path) -> Path:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        return atomic_write_text(path, text)


def parse_choice(target: str, label: str) -> Choice:
    """The choice an engine names `label` ("int4_per_token_head", "q8_0/q4_0", "FP8", ...)."""
    check_target(target)
    label = str(label).strip()
    if label == "dense" and target in ("vllm", "modelopt"):
        return DENSE
    if target == "vllm" and label in VLLM_DTYPES:
        return vllm_choice(label)
    if target == "modelopt" and label in MODELOPT:
        return modelopt_choice(label)
    if target == "lmdeploy":
        number = label.removeprefix("quant_policy").strip()
        if number.isdigit() and int(number) in LMDEPLOY:
            return lmdeploy_choice(int(number))
    if target == "llama.cpp":
        k, _, v = label.partition("/")
        types = (*LLAMACPP_TYPES, "f16")
        if k in types and v in types:
            return llamacpp_choice(k, v)
    raise ConfigError(f"{target} has no per-layer KV setting {label!r}")


def load_plan(path: str | Path) -> EnginePlan:
    """Read a plan YAML; one-line ConfigError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({type(exc).__name__})") from None
    if not is_plan(data):
        raise ConfigError(f"{path}: not a kvtuner engine plan (no 'kvtuner_engine_plan' key)")
    target = data.get("target")
    if target not in ("vllm", "llama.cpp", "modelopt", "lmdeploy"):
        raise ConfigError(f"{path}: target: unknown target {target!r}")
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ConfigError(f"{path}: layers: a non-empty list of per-layer settings is needed")
    try:
        choices = tuple(parse_choice(target, label) for label in layers)
    except ConfigError as exc:
        raise ConfigError(f"{path}: layers: {exc}") from None
    plan = EnginePlan(
        target,
        str(data.get("family", "")),
        choices,
        model=data.get("model"),
        metadata=dict(data.get("metadata") or {}),
    )
    amax = data.get("kv_amax")
    if amax is not None:
        if not (isinstance(amax, list) and all(_is_pair(a) for a in amax)):
            raise ConfigError(f"{path}: kv_amax: a list of [key amax, value amax] per layer")
        try:
            plan = plan.with_amax(amax)
        except ConfigError as exc:
            raise ConfigError(f"{path}: kv_amax: {exc}") from None
    return plan


def is_plan(data: Any) -> bool:
    return isinstance(data, dict) and "kvtuner_engine_plan" in data


def _is_pair(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(x, int | float) and x >= 0 for x in value)
    )


def _order(choice: Choice) -> tuple:
    return (choice.dense, choice.label)


@dataclass(frozen=True)
class Allotted:
    """A plan with its summed single-layer KL and its effective bits."""

    plan: EnginePlan
    loss: float
    bits: float


def allocate_plan(
    target: str,
    measured: Losses,
    head_dim: int,
    windows: Sequence[int | None],
    context: int,
    cap: float,
) -> Allotted | None:
    """The lowest summed single-layer KL any setting of `target` reaches under `cap` bits."""
    best: Allotted | None = None
    for family, candidates in usable_families(target, head_dim).items():
        losses = family_losses(measured, candidates)
        costs = engine_layer_costs(candidates, head_dim, windows, context)
        found = allocate(losses, costs, cap, order=_order)
        if found is None:
            continue
        plan = EnginePlan(target, family, tuple(found.pairs))
        best = _better(best, Allotted(plan, found.loss, found.bits))
    return best


def uniform_plans(
    target: str, measured: Losses, head_dim: int, windows: Sequence[int | None], context: int
) -> list[Allotted]:
    """Every all-layers setting of `target` (each layer quantized alike), cheapest loss first."""
    out = []
    weights = token_shares(windows, context)
    for family, candidates in usable_families(target, head_dim).items():
        for choice in candidates:
            if choice.dense:
                continue
            loss = sum(choice_loss(layer, choice) for layer in measured)
            plan = EnginePlan(target, family, (choice,) * len(measured))
            out.append(Allotted(plan, loss, sum(weights) * choice.bits(head_dim)))
    return sorted(out, key=lambda a: (a.loss, a.bits))


def best_uniform(
    target: str,
    measured: Losses,
    head_dim: int,
    windows: Sequence[int | None],
    context: int,
    cap: float,
) -> Allotted | None:
    """The all-layers setting with the lowest summed single-layer KL under `cap`."""
    fits = [
        a
        for a in uniform_plans(target, measured, head_dim, windows, context)
        if a.bits <= cap + 1e-9
    ]
    return fits[0] if fits else None


FIRST_LAST_UPGRADES = ("q8_0/q8_0", "f16/f16")


def first_last_plan(
    measured: Losses,
    head_dim: int,
    windows: Sequence[int | None],
    context: int,
    cap: float,
) -> Allotted | None:
    """ik_llama.cpp's form: a type pair for all layers but the first N and last M, which take a
    richer pair (q8_0/q8_0 or f16/f16); the lowest summed single-layer KL under `cap`."""
    n = len(measured)
    weights = token_shares(windows, context)
    bases = [c for (c,) in usable_families("llama.cpp", head_dim).values()]
    best: Allotted | None = None
    for base, up_label in itertools.product(bases, FIRST_LAST_UPGRADES):
        up = parse_choice("llama.cpp", up_label)
        if up == base or up.bits(head_dim) <= base.bits(head_dim):
            continue
        gain = [choice_loss(m, base) - choice_loss(m, up) for m in measured]
        extra = [w * (up.bits(head_dim) - base.bits(head_dim)) for w in weights]
        base_loss = sum(choice_loss(m, base) for m in measured)
        base_bits = sum(w * base.bits(head_dim) for w in weights)
        prefix_gain, prefix_bits = _prefix(gain), _prefix(extra)
        for first in range(n + 1):
            for last in range(n - first + 1):
                if first == 0 and last == 0:
                    continue
                bits = base_bits + prefix_bits[first] + prefix_bits[n] - prefix_bits[n - last]
                if bits > cap + 1e-9:
                    continue
                loss = base_loss - prefix_gain[first] - (prefix_gain[n] - prefix_gain[n - last])
                layers = (up,) * first + (base,) * (n - first - last) + (up,) * last
                plan = EnginePlan("llama.cpp", "first/last-N", layers)
                best = _better(best, Allotted(plan, loss, bits))
    return best


def _prefix(values: Sequence[float]) -> list[float]:
    out = [0.0]
    for v in values:
        out.append(out[-1] + v)
    return out


def _better(best: Allotted | None, found: Allotted) -> Allotted:
    if best is None or found.loss < best.loss - 1e-12:
        return found
    if abs(found.loss - best.loss) <= 1e-12 and found.bits < best.bits:
        return found
    return best


IK_MARGIN = 0.98  # a first/last-N form is chosen only where it beats the best pair by 2%


def engine_allocation(
    target: str,
    measured: Losses,
    head_dim: int,
    windows: Sequence[int | None],
    context: int,
    cap: float,
) -> tuple[Allotted | None, EnginePlan | None]:
    """What `kvtuner allocate --target` picks under `cap`, and the engine's all-layers setting to
    judge it against (vLLM: the same dtype on every layer; otherwise the all-layers setting of
    least summed single-layer KL under the cap). llama.cpp: the best K/V pair, or the ik_llama.cpp
    first/last-N form where that is better by more than 2%."""
    found = allocate_plan(target, measured, head_dim, windows, context, cap)
    if target == "llama.cpp":
        ik = first_last_plan(measured, head_dim, windows, context, cap)
        if ik is not None and (found is None or ik.loss < found.loss * IK_MARGIN):
            found = ik
    if found is None:
        return None, None
    if target == "vllm":
        choice = next(c for c in found.plan.layers if not c.dense)
        return found, EnginePlan(target, found.plan.family, (choice,) * len(measured))
    best = best_uniform(target, measured, head_dim, windows, context, cap)
    return found, None if best is None else best.plan
