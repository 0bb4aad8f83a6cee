"""An engine plan (`kvtuner.plan.EnginePlan`) as the files and commands its engine reads, and back.

- vllm: `vllm serve MODEL --kv-cache-dtype D [--kv-cache-dtype-skip-layers ...]`, the `LLM(...)`
  keyword arguments and, for fp8, the per-layer k_scale / v_scale a checkpoint must carry
  (`<name>.vllm.json`);
- llama.cpp: `-ctk K -ctv V -fa on` (mainline), or the ik_llama.cpp first/last-N arguments when the
  plan's layers differ (`<name>.llama.json`);
- modelopt: `hf_quant_config.json` with a per-layer map (`<name>/hf_quant_config.json`) and the
  per-layer scales beside it (`kv_scales.json`: FP8 amax / 448, NVFP4 amax / 2688);
- lmdeploy: `lmdeploy serve api_server MODEL --quant-policy N` (`<name>.lmdeploy.json`).

`read_export(path, num_layers)` turns any of these files back into a plan, so `kvtuner eval`
measures what the engine will store.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from kvtuner.engines import llamacpp, lmdeploy, modelopt, vllm
from kvtuner.errors import ConfigError
from kvtuner.formats.floats import E4M3_MAX
from kvtuner.formats.nvfp4 import E2M1_MAX
from kvtuner.io import atomic_write_text
from kvtuner.plan import EnginePlan, parse_choice
from kvtuner.targets import DENSE, LMDEPLOY, Choice

# what `vllm serve` / `lmdeploy serve` take for the embedded models (their hub ids)
SERVE_NAMES = {
    "gemma-3-270m": "google/gemma-3-270m-it",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "qwen2.5-coder-0.5b": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
    "qwen2.5-coder-1.5b": "Qwen/Qwen2.5-Coder-1.5B-Instruct",
}
NVFP4_DIVISOR = E4M3_MAX * E2M1_MAX


def serve_name(model: str | None) -> str:
    return SERVE_NAMES.get(model or "", model or "MODEL")


def _dtype(choice: Choice) -> str:
    return choice.label


def vllm_launch(plan: EnginePlan) -> vllm.VllmLaunch:
    quantized = {c for c in plan.layers if not c.dense}
    if len(quantized) != 1:
        raise ConfigError(
            f"vLLM stores one --kv-cache-dtype for all layers; this plan has {len(quantized)}"
        )
    (choice,) = quantized
    skip = [i for i, c in enumerate(plan.layers) if c.dense]
    scales: dict[int, tuple[float, float]] = {}
    if choice.label.startswith("fp8") and "per_token" not in choice.label and plan.kv_amax:
        scales = {
            i: (_scale(k, E4M3_MAX), _scale(v, E4M3_MAX))
            for i, (k, v) in enumerate(plan.kv_amax)
            if not plan.layers[i].dense
        }
    return vllm.launch(serve_name(plan.model), _dtype(choice), skip, scales)


def _scale(amax: float, divisor: float) -> float:
    return amax / divisor if amax > 0 else 1.0


def llamacpp_args(plan: EnginePlan) -> list[str]:
    """Mainline `-ctk K -ctv V -fa on` when every layer is alike, else ik_llama.cpp's arguments."""
    k_types = [c.label.split("/")[0] for c in plan.layers]
    v_types = [c.label.split("/")[1] for c in plan.layers]
    if len(set(plan.layers)) == 1:
        return llamacpp.cache_args(k_types[0], v_types[0])
    return llamacpp.ik_llama_args(k_types, v_types) + ["-fa", "on"]


def modelopt_algos(plan: EnginePlan) -> list[str | None]:
    return [None if c.dense else c.label for c in plan.layers]


def modelopt_scales(plan: EnginePlan) -> dict[str, dict[str, float]]:
    """Per quantized layer, the k_scale / v_scale a ModelOpt checkpoint carries."""
    if plan.kv_amax is None:
        return {}
    out = {}
    for i, (choice, (k, v)) in enumerate(zip(plan.layers, plan.kv_amax)):
        if choice.dense:
            continue
        key_div = E4M3_MAX if choice.label in ("FP8", "FP8_K_NVFP4_V") else NVFP4_DIVISOR
        value_div = E4M3_MAX if choice.label == "FP8" else NVFP4_DIVISOR
        out[modelopt.ATTENTION_MODULE.format(i)] = {
            "k_scale": _scale(k, key_div),
            "v_scale": _scale(v, value_div),
        }
    return out


def lmdeploy_policy(plan: EnginePlan) -> int:
    policies = {int(c.label.split()[-1]) for c in plan.layers}
    if len(policies) != 1:
        raise ConfigError("LMDeploy takes one quant_policy for all layers; this plan has several")
    return policies.pop()


def commands(plan: EnginePlan) -> dict[str, Any]:
    """What to paste: the command line(s) and keyword arguments that set this plan in its engine."""
    if plan.target == "vllm":
        launch = vllm_launch(plan)
        return {"command": vllm.serve_command(launch), "llm_kwargs": vllm.llm_kwargs(launch)}
    if plan.target == "llama.cpp":
        args = llamacpp_args(plan)
        engine = "llama-server (mainline)" if plan.form == "uniform" else "ik_llama.cpp"
        return {
            "command": shlex.join(["llama-server", "-m", "MODEL.gguf", *args]),
            "engine": engine,
        }
    if plan.target == "modelopt":
        config = modelopt.hf_quant_config(modelopt_algos(plan))
        return {"kv_cache_quant_algo": config["quantization"]["kv_cache_quant_algo"]}
    policy = lmdeploy_policy(plan)
    return {
        "command": lmdeploy.serve_command(serve_name(plan.model), policy),
        "engine_config": lmdeploy.engine_config_kwargs(policy),
    }


def write_engine_files(plan: EnginePlan, stem: Path) -> list[Path]:
    """The engine's files for `plan`, named after `stem` (a path without suffix); atomic each."""
    if plan.target == "vllm":
        return [vllm.write_launch(stem.with_name(stem.name + ".vllm.json"), vllm_launch(plan))]
    if plan.target == "llama.cpp":
        return [llamacpp.write_args(stem.with_name(stem.name + ".llama.json"), llamacpp_args(plan))]
    if plan.target == "modelopt":
        config = modelopt.hf_quant_config(modelopt_algos(plan))
        paths = [modelopt.write_hf_quant_config(stem / "hf_quant_config.json", config)]
        scales = modelopt_scales(plan)
        if scales:
            text = json.dumps(scales, indent=2) + "\n"
            paths.append(atomic_write_text(stem / "kv_scales.json", text))
        return paths
    path = stem.with_name(stem.name + ".lmdeploy.json")
    return [lmdeploy.write_launch(path, serve_name(plan.model), lmdeploy_policy(plan))]


def is_engine_file(path: str | Path) -> bool:
    return str(path).endswith(
        (".vllm.json", ".llama.json", ".lmdeploy.json", "hf_quant_config.json")
    )


def read_export(path: str | Path, num_layers: int) -> EnginePlan:
    """The plan an exported engine file sets, for a model of `num_layers` layers."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not an engine file kvtuner wrote")
    try:
        if "quantization" in data:
            return _read_modelopt(path, data, num_layers)
        if isinstance(data.get("llm_kwargs"), dict):
            return _read_vllm(data, num_layers)
        if isinstance(data.get("args"), list):
            return _read_llamacpp(data["args"], num_layers)
        if isinstance(data.get("engine_config"), dict):
            policy = data["engine_config"].get("quant_policy")
            if policy not in LMDEPLOY:
                raise ConfigError(f"quant_policy {policy!r} is not one of 4, 8")
            return EnginePlan(
                "lmdeploy",
                f"quant_policy {policy}",
                (parse_choice("lmdeploy", str(policy)),) * num_layers,
            )
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    raise ConfigError(
        f"{path}: not an engine file kvtuner wrote (vLLM, llama.cpp, ModelOpt or LMDeploy)"
    )


def _read_vllm(data: dict[str, Any], num_layers: int) -> EnginePlan:
    kwargs = data["llm_kwargs"]
    dtype = kwargs.get("kv_cache_dtype")
    choice = parse_choice("vllm", str(dtype))
    skip = {int(s) for s in kwargs.get("kv_cache_dtype_skip_layers", []) if str(s).isdigit()}
    bad = [s for s in skip if s >= num_layers]
    if bad:
        raise ConfigError(f"skips layer {bad[0]}, the model has {num_layers} layers")
    layers = tuple(DENSE if i in skip else choice for i in range(num_layers))
    plan = EnginePlan("vllm", str(dtype), layers, model=kwargs.get("model"))
    scales = data.get("kv_scales") or {}
    if scales:
        amax = [(1.0 * E4M3_MAX, 1.0 * E4M3_MAX)] * num_layers
        for layer, s in scales.items():
            amax[int(layer)] = (s["k_scale"] * E4M3_MAX, s["v_scale"] * E4M3_MAX)
        plan = plan.with_amax(amax)
    return plan


def _read_llamacpp(args: list[str], num_layers: int) -> EnginePlan:
    values = dict(zip(args[::2], args[1::2]))
    types = {}
    for side in ("k", "v"):
        base = values.get(f"-ct{side}", "f16")
        per_layer = [base] * num_layers
        for where in ("first", "last"):
            spec = values.get(f"--cache-type-{side}-{where}")
            if spec:
                kind, _, count = spec.partition(",")
                n = int(count)
                span = range(n) if where == "first" else range(num_layers - n, num_layers)
                for i in span:
                    per_layer[i] = kind
        types[side] = per_layer
    layers = tuple(parse_choice("llama.cpp", f"{k}/{v}") for k, v in zip(types["k"], types["v"]))
    family = "first/last-N" if len(set(layers)) > 1 else layers[0].label
    return EnginePlan("llama.cpp", family, layers)


def _read_modelopt(path: Path, data: dict[str, Any], num_layers: int) -> EnginePlan:
    quant = data["quantization"]
    algo = quant.get("kv_cache_quant_algo")
    per_layer = quant.get("kv_cache_quantized_layers")
    if per_layer is None:
        if algo is None:
            layers = (DENSE,) * num_layers
        else:
            layers = (parse_choice("modelopt", algo),) * num_layers
    else:
        found = {}
        for module, entry in per_layer.items():
            index = _module_index(module)
            if index is None or index >= num_layers:
                raise ConfigError(f"{module}: not an attention layer of a {num_layers}-layer model")
            found[index] = parse_choice("modelopt", entry.get("quant_algo"))
        layers = tuple(found.get(i, DENSE) for i in range(num_layers))
    plan = EnginePlan("modelopt", str(algo), layers)
    scales_path = path.with_name("kv_scales.json")
    if scales_path.is_file():
        scales = json.loads(scales_path.read_text())
        amax = [(0.0, 0.0)] * num_layers
        for module, s in scales.items():
            i = _module_index(module)
            label = layers[i].label
            key_div = E4M3_MAX if label in ("FP8", "FP8_K_NVFP4_V") else NVFP4_DIVISOR
            value_div = E4M3_MAX if label == "FP8" else NVFP4_DIVISOR
            amax[i] = (s["k_scale"] * key_div, s["v_scale"] * value_div)
        plan = plan.with_amax(amax)
    return plan


def _module_index(module: str) -> int | None:
    for part in module.split("."):
        if part.isdigit():
            return int(part)
    return None


def is_engine_config(config: str | Path) -> bool:
    """Whether `config` names an engine file or an engine plan YAML (not a kvtuner config)."""
    path = Path(config)
    if is_engine_file(path):
        return True
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        return False
    try:
        import yaml

        from kvtuner.plan import is_plan

        return is_plan(yaml.safe_load(path.read_text(encoding="utf-8")))
    except Exception:  # a malformed file is the kvtuner config loader's to report
        return False


def load_engine_config(config: str | Path, num_layers: int) -> EnginePlan:
    """An engine plan YAML or an exported engine file, checked against the model's layer count."""
    from kvtuner.plan import load_plan

    if is_engine_file(config):
        return read_export(config, num_layers)
    plan = load_plan(config)
    if plan.num_layers != num_layers:
        raise ConfigError(
            f"{config}: num_layers: plan has {plan.num_layers} layers, model has {num_layers}"
        )
    return plan


def needs_amax(plan: EnginePlan) -> bool:
    """Whether the plan's formats need calibrated per-tensor scales it does not carry."""
    if plan.kv_amax is not None:
        return False
    names = {n for c in plan.layers for n in (c.key, c.value) if n}
    return any(n.startswith("modelopt:") or n.endswith("nvfp4") for n in names)
