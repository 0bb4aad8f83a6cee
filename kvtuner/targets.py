"""What a serving engine can store per layer: the candidates an allocation for that engine picks from.

A `Choice` is one layer's KV storage in an engine: a key format and a value format
(`kvtuner.formats` names; None keeps the model dtype) and the engine's own name for it. A target
offers *families*, the per-layer candidate sets one engine setting allows:

- vllm: one `--kv-cache-dtype` D for the model, any layer skipped (kept at the model dtype):
  per D, the candidates {D, dense};
- llama.cpp: one `-ctk` and one `-ctv` type for every layer: per (K type, V type), that pair alone
  (the ik_llama.cpp first/last-N form: `first_last`);
- modelopt: per layer FP8, NVFP4 or FP8-K/NVFP4-V, or left unquantized: one family of four;
- lmdeploy: one `quant_policy` for every layer: {int4}, {int8}.

An allocation under a cap is the best family's knapsack (`kvtuner.allocate`) on single-layer KL.
`probes(target)` are the choices `kvtuner calibrate --target` measures per layer; the loss of a
choice it did not measure (a llama.cpp K/V pair) is its key-only loss plus its value-only loss.
Costs are effective bits of engine storage (`kvtuner.memory.engine_effective_bits`): each
format's real bits per element (scales included; 16 for the model dtype), weighted by the tokens
each layer holds at the budget context.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvtuner.errors import ConfigError
from kvtuner.formats import get_format
from kvtuner.formats.base import KVFormat

TARGETS = ("vllm", "llama.cpp", "modelopt", "lmdeploy")
DTYPE_BITS = 16  # engines keep unquantized KV in the model's 16-bit dtype


@dataclass(frozen=True, order=True)
class Choice:
    """One layer's KV storage: key and value format names (None: the model dtype), engine label."""

    key: str | None
    value: str | None
    label: str

    @property
    def dense(self) -> bool:
        return self.key is None and self.value is None

    def formats(self) -> tuple[KVFormat | None, KVFormat | None]:
        """The key and value formats (None where the layer keeps the model dtype)."""
        return (
            None if self.key is None else key_format(self.key),
            None if self.value is None else value_format(self.value),
        )

    def bits(self, head_dim: int) -> float:
        """Mean storage bits of a cached key and value element."""
        k, v = self.formats()
        kb = DTYPE_BITS if k is None else k.bits_per_element(head_dim)
        vb = DTYPE_BITS if v is None else v.bits_per_element(head_dim)
        return (kb + vb) / 2

    def check_head_dim(self, head_dim: int) -> str | None:
        """The head-size rule this choice breaks, or None."""
        for fmt in self.formats():
            problem = None if fmt is None else fmt.check_head_dim(head_dim)
            if problem:
                return problem
        return None


DENSE = Choice(None, None, "dense")


def key_format(name: str) -> KVFormat:
    return get_format(name)


def value_format(name: str) -> KVFormat:
    """llama.cpp rotates V in chunks of 64 whatever head_dim: its formats carry the role."""
    return get_format(name, role="v") if name.startswith("llamacpp:") else get_format(name)


VLLM_DTYPES = (
    "fp8_e4m3",
    "int8_per_token_head",
    "fp8_per_token_head",
    "int4_per_token_head",
    "nvfp4",
)
LLAMACPP_TYPES = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")
MODELOPT = {
    "FP8": ("modelopt:fp8", "modelopt:fp8"),
    "NVFP4": ("modelopt:nvfp4", "modelopt:nvfp4"),
    "FP8_K_NVFP4_V": ("modelopt:fp8", "modelopt:nvfp4"),
}
LMDEPLOY = {8: "lmdeploy:int8", 4: "lmdeploy:int4"}


def vllm_choice(dtype: str) -> Choice:
    return Choice(f"vllm:{dtype}", f"vllm:{dtype}", dtype)


def llamacpp_choice(ctk: str, ctv: str) -> Choice:
    """-ctk / -ctv types ("f16" keeps that side unquantized)."""
    return Choice(
        None if ctk == "f16" else f"llamacpp:{ctk}",
        None if ctv == "f16" else f"llamacpp:{ctv}",
        f"{ctk}/{ctv}",
    )


def modelopt_choice(algo: str) -> Choice:
    key, value = MODELOPT[algo]
    return Choice(key, value, algo)


def lmdeploy_choice(policy: int) -> Choice:
    return Choice(LMDEPLOY[policy], LMDEPLOY[policy], f"quant_policy {policy}")


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    return target


def families(target: str) -> dict[str, tuple[Choice, ...]]:
    """The engine settings of `target`, each with the per-layer candidates it allows."""
    check_target(target)
    if target == "vllm":
        return {d: (vllm_choice(d), DENSE) for d in VLLM_DTYPES}
    if target == "llama.cpp":
        types = (*LLAMACPP_TYPES, "f16")
        return {
            f"{k}/{v}": (llamacpp_choice(k, v),)
            for k in types
            for v in types
            if (k, v) != ("f16", "f16")
        }
    if target == "modelopt":
        return {"MIXED_PRECISION": (*(modelopt_choice(a) for a in MODELOPT), DENSE)}
    return {f"quant_policy {p}": (lmdeploy_choice(p),) for p in LMDEPLOY}


def uniform_choice(target: str, family: str) -> Choice:
    """The engine's all-layers setting of `family` (vLLM: no layer skipped; ModelOpt: NVFP4)."""
    found = families(target)[family]
    return next(c for c in found if not c.dense) if target != "modelopt" else found[1]


def probes(target: str) -> tuple[Choice, ...]:
    """The choices `kvtuner calibrate --target` measures on every layer."""
    check_target(target)
    if target == "llama.cpp":
        keys = tuple(Choice(f"llamacpp:{t}", None, f"{t}/f16") for t in LLAMACPP_TYPES)
        values = tuple(Choice(None, f"llamacpp:{t}", f"f16/{t}") for t in LLAMACPP_TYPES)
        return keys + values
    return tuple(
        dict.fromkeys(c for family in families(target).values() for c in family if not c.dense)
    )


def head_dim_problem(target: str, head_dim: int) -> str | None:
    """One line naming the first format of `target` that a model with `head_dim` cannot take."""
    for choice in probes(target):
        problem = choice.check_head_dim(head_dim)
        if problem:
            return problem
    return None


def usable_families(target: str, head_dim: int) -> dict[str, tuple[Choice, ...]]:
    """`families(target)` without the settings whose formats break the model's head size."""
    return {
        name: found
        for name, found in families(target).items()
        if all(c.check_head_dim(head_dim) is None for c in found)
    }


Losses = Sequence[Mapping[Choice, float]]


def choice_loss(measured: Mapping[Choice, float], choice: Choice) -> float:
    """A layer's loss at `choice`: measured, else key-only plus value-only loss (0 for dense)."""
    if choice.dense:
        return 0.0
    if choice in measured:
        return measured[choice]
    by_sides = {(c.key, c.value): loss for c, loss in measured.items()}
    key = 0.0 if choice.key is None else by_sides.get((choice.key, None))
    value = 0.0 if choice.value is None else by_sides.get((None, choice.value))
    if key is None or value is None:
        raise KeyError(f"no single-layer KL measured for {choice.label}")
    return key + value


def family_losses(measured: Losses, candidates: Sequence[Choice]) -> list[dict[Choice, float]]:
    """Per layer, each candidate's loss (see `choice_loss`)."""
    return [{c: choice_loss(layer, c) for c in candidates} for layer in measured]
