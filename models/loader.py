"""MODEL (catalog name | HF directory | .gguf file) -> config, Arch, IR-named weights, tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arc.cache import EntryGone, use_entry
from arc.errors import ArcError, UnsupportedError
from arc.models import FAMILIES, catalog, gguf
from arc.models.guard import first_line, guarded

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class LoadedModel:
    name: str
    directory: Path
    hf_config: Any
    family: Any  # the family module
    arch: Any
    weights: dict[str, Any]  # IR name -> torch.Tensor (empty when loaded without weights)
    tokenizer: Any
    # IR name -> (format, raw GGUF rows) for a GGUF checkpoint's tensors as stored (formats.py)
    blocks: dict[str, Any] = field(default_factory=dict)


def resolve(ref: str) -> tuple[str, Path]:
    """(display name, HF directory) for a model reference; ArcError when it names nothing."""
    path = Path(ref).expanduser()
    if ref in catalog.CATALOG:
        return ref, catalog.resolve(ref)
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, gguf.cached_dir(path)
    return _directory(ref, path)


def gguf_source(ref: str) -> Path | None:
    """The GGUF file a model reference comes from, if any (its blocks can be kept as stored)."""
    path = Path(ref).expanduser()
    if ref in catalog.CATALOG:
        return catalog.gguf_file(ref)
    return path if path.is_file() and path.suffix == ".gguf" else None


def _directory(ref: str, path: Path) -> tuple[str, Path]:
    if path.is_dir() and (path / "config.json").exists():
        return path.name, path
    known = ", ".join(catalog.CATALOG)
    raise ArcError(
        f"unknown model {ref!r}: not a catalog name ({known}), a .gguf file, "
        "or a directory with config.json"
    )


def load(ref: str, *, weights: bool = True) -> LoadedModel:
    try:
        return _load(ref, weights)
    except EntryGone:  # `arc cache prune` removed it between resolving and locking: rebuild
        return _load(ref, weights)


def _load(ref: str, weights: bool) -> LoadedModel:
    name, directory = resolve(ref)
    with use_entry(directory):  # a cache entry is held against prune while it is read
        cfg = _config(directory)
        family = FAMILIES[cfg.model_type]
        arch = _arch(directory, family, cfg)
        tensors = _weights(directory, family, arch, cfg) if weights else {}
        blocks = _blocks(ref, arch, tensors) if weights else {}
        tok = _tokenizer(directory)
        return LoadedModel(name, directory, cfg, family, arch, tensors, tok, blocks)


def _blocks(ref: str, arch, tensors: dict[str, Any]) -> dict[str, Any]:
    """A llama GGUF's weights as stored, each checked to dequantize to exactly the fp32 tensor
    transformers made of it (the reference every engine is compared with)."""
    from arc import formats

    src = gguf_source(ref)
    if src is None or arch.model_type != "llama":
        return {}
    out = {}
    with use_entry(src):
        raw = gguf.read_blocks(src, arch.heads, arch.kv_heads)
    for name, (fmt, rows) in raw.items():
        if name not in tensors:
            continue
        if rows is None:  # a block type arc cannot keep
            out[name] = (fmt, None)
            continue
        comps = formats.from_gguf(fmt, rows, tuple(tensors[name].shape))
        if not formats.dequantize(fmt, comps).equal(tensors[name]):
            raise ArcError(f"GGUF {src.name}: {name} does not match its dequantized copy")
        out[name] = (fmt, comps)
    return out


def _config(directory: Path):
    from transformers import AutoConfig

    raw = _config_json(directory / "config.json")
    mtype = raw.get("model_type")
    if mtype not in FAMILIES:
        archs = ", ".join(raw.get("architectures") or []) or "?"
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedError(
            f"unsupported architecture {mtype!r} ({archs}); supported model types: {supported}"
        )
    return guarded(f"{directory}/config.json", lambda: AutoConfig.from_pretrained(directory))


def _config_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise ArcError(f"{path} is not readable JSON ({first_line(e)})") from None
    if not isinstance(raw, dict):
        raise ArcError(f"{path} is not a JSON object")
    return raw


def _arch(directory: Path, family, cfg):
    """The family's Arch for `cfg`, or one line naming what in config.json does not fit."""
    try:
        arch = family.arch_from_config(cfg, _rope(cfg)[1])
    except ArcError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as e:
        raise ArcError(f"{directory}/config.json: cannot read the architecture ({e})") from None
    sizes = ("vocab", "hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate")
    bad = [k for k in (*sizes, "max_positions") if not _positive_int(getattr(arch, k))]
    if bad or arch.heads % arch.kv_heads or len(arch.windows) != arch.layers:
        what = ", ".join(bad) or "heads / kv_heads / layer_types"
        raise ArcError(f"{directory}/config.json: inconsistent model sizes ({what})")
    return arch


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


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
        hf |= guarded(f"cannot read weights {f}", lambda f=f: _read_safetensors(safe_open, f))
    out = {"rope.inv_freq": _rope(cfg)[0].float()}
    for ir_name, key in family.hf_weight_names(arch).items():
        if key not in hf:
            raise ArcError(f"checkpoint {directory} lacks tensor {key}")
        out[ir_name] = hf[key].float()
    for k, shape in family.weight_shapes(arch).items():
        if tuple(out[k].shape) != tuple(shape):
            raise ArcError(f"tensor {k} has shape {tuple(out[k].shape)}, expected {shape}")
    return out


def _read_safetensors(safe_open, path: Path) -> dict[str, Any]:
    with safe_open(path, framework="pt") as sf:
        return {key: sf.get_tensor(key) for key in sf.keys()}


def _tokenizer(directory: Path):
    """The directory's own tokenizer: arc ships it in the engine, so a model without one (or
    with one the tokenizers library cannot read) is refused here, before any build."""
    from transformers import AutoTokenizer

    if not any((directory / f).exists() for f in TOKENIZER_FILES):
        raise ArcError(f"{directory} has no tokenizer (tokenizer.json or tokenizer.model)")
    return guarded(
        f"cannot read the tokenizer in {directory}",
        lambda: AutoTokenizer.from_pretrained(directory),
    )


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
