"""MODEL (catalog name | HF directory | .gguf file) -> config, Arch, IR-named weights, tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arc.errors import ArcError, UnsupportedError
from arc.models import FAMILIES, catalog, gguf


@dataclass
class LoadedModel:
    name: str
    directory: Path
    hf_config: Any
    family: Any  # the family module
    arch: Any
    weights: dict[str, Any]  # IR name -> torch.Tensor (empty when loaded without weights)
    tokenizer: Any


def resolve(ref: str) -> tuple[str, Path]:
    """(display name, HF directory) for a model reference; ArcError when it names nothing."""
    path = Path(ref).expanduser()
    if ref in catalog.CATALOG:
        return ref, catalog.resolve(ref)
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, gguf.cached_dir(path)
    if path.is_dir() and (path / "config.json").exists():
        return path.name, path
    known = ", ".join(catalog.CATALOG)
    raise ArcError(
        f"unknown model {ref!r}: not a catalog name ({known}), a .gguf file, "
        "or a directory with config.json"
    )


def load(ref: str, *, weights: bool = True) -> LoadedModel:
    name, directory = resolve(ref)
    cfg = _config(directory)
    family = FAMILIES[cfg.model_type]
    arch = family.arch_from_config(cfg, _rope(cfg)[1])
    tensors = _weights(directory, family, arch, cfg) if weights else {}
    return LoadedModel(name, directory, cfg, family, arch, tensors, _tokenizer(directory))


def _config(directory: Path):
    from transformers import AutoConfig

    raw = json.loads((directory / "config.json").read_text())
    mtype = raw.get("model_type")
    if mtype not in FAMILIES:
        archs = ", ".join(raw.get("architectures") or []) or "?"
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedError(
            f"unsupported architecture {mtype!r} ({archs}); supported model types: {supported}"
        )
    return AutoConfig.from_pretrained(directory)


def _rope(cfg):
    """HF's own inv_freq and attention scaling for this config's rope type."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = getattr(cfg, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind == "dynamic":
        raise UnsupportedError("dynamic NTK rope changes with sequence length; not supported")
    if kind == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    if kind not in ROPE_INIT_FUNCTIONS:
        raise UnsupportedError(f"rope type {kind!r} is not supported")
    return ROPE_INIT_FUNCTIONS[kind](cfg)


def _weights(directory: Path, family, arch, cfg) -> dict[str, Any]:
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ArcError(f"{directory} has no .safetensors weights (pickled weights are refused)")
    hf: dict[str, Any] = {}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for key in sf.keys():
                hf[key] = sf.get_tensor(key)
    out = {"rope.inv_freq": _rope(cfg)[0].float()}
    for ir_name, key in family.hf_weight_names(arch).items():
        if key not in hf:
            raise ArcError(f"checkpoint {directory} lacks tensor {key}")
        out[ir_name] = hf[key].float()
    for k, shape in family.weight_shapes(arch).items():
        if tuple(out[k].shape) != tuple(shape):
            raise ArcError(f"tensor {k} has shape {tuple(out[k].shape)}, expected {shape}")
    return out


def _tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def eos_ids(loaded: LoadedModel) -> list[int]:
    """End-of-sequence ids from the generation config, config and tokenizer."""
    ids: set[int] = set()
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(loaded.directory)
        ids |= _as_set(gen.eos_token_id)
    except OSError:
        pass
    ids |= _as_set(getattr(loaded.hf_config, "eos_token_id", None))
    ids |= _as_set(loaded.tokenizer.eos_token_id)
    return sorted(ids)


def _as_set(v) -> set[int]:
    if v is None:
        return set()
    return set(v) if isinstance(v, list | tuple) else {int(v)}
