"""GGUF files -> a cached fp32 safetensors HF directory, via transformers' GGUF loader.

transformers dequantizes the GGUF tensors (Q4_1, Q8_0, ...) to fp32 and maps llama.cpp's names
to HF's; arc then reads the saved safetensors like any HF checkpoint. Before that, the file's
header and tensor table are read with the gguf package (seconds, nothing dequantized): a
truncated file or an architecture arc does not support is refused up front.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from arc.cache import atomic_dir, cache_path, use_entry
from arc.errors import ArcError, UnsupportedError
from arc.models.guard import first_line, guarded


def cached_dir(path: Path) -> Path:
    """The HF directory for GGUF `path`, converted once and cached by name, size and mtime."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    out = cache_path("gguf", f"{path.stem}-{key[:12]}")
    if not (out / "config.json").exists():
        atomic_dir(out, lambda tmp: convert(path, tmp))
    return out


def convert(path: Path, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with use_entry(path):  # a GGUF in arc's cache (the downloaded smollm2) is held meanwhile
        check(path)
        kw = dict(gguf_file=path.name)
        what = f"cannot read GGUF {path.name}"
        tok = guarded(
            f"{what} (tokenizer)", lambda: AutoTokenizer.from_pretrained(path.parent, **kw)
        )
        model = guarded(
            what,
            lambda: AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw),
        )
    # Saved as plain fp32: forget the GGUF quantizer so save_pretrained writes real tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def check(path: Path) -> str:
    """The file's `general.architecture`, after checking it is a whole GGUF file of an
    architecture arc supports; ArcError otherwise."""
    from arc.models import FAMILIES

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ArcError(f"{path} is not a GGUF file")
    arch = architecture(path)
    if arch not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedError(
            f"unsupported GGUF architecture {arch!r} in {path.name}; supported: {supported}"
        )
    return arch


def architecture(path: Path) -> str:
    """`general.architecture` via gguf's GGUFReader, which also checks that the header and every
    tensor's data lie inside the file (a truncated download fails here, not mid-conversion)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields.get("general.architecture")
        arch = field.contents() if field is not None else None
    except Exception as e:  # numpy / struct errors on a cut or garbled file
        raise ArcError(f"GGUF {path.name} is truncated or corrupt ({first_line(e)})") from None
    if not isinstance(arch, str):
        raise ArcError(f"GGUF {path.name} does not name its architecture (general.architecture)")
    return arch


# ---------------------------------------------------------------- blocks kept as stored

_LAYER_NAMES = {
    "attn_q": "wq",
    "attn_k": "wk",
    "attn_v": "wv",
    "attn_output": "wo",
    "ffn_gate": "w_gate",
    "ffn_up": "w_up",
    "ffn_down": "w_down",
    "attn_norm": "attn_norm",
    "ffn_norm": "mlp_norm",
}
_TOP_NAMES = {"token_embd": "embed", "output_norm": "norm", "output": "lm_head"}


def read_blocks(path: Path, heads: int, kv_heads: int) -> dict[str, tuple[str, Any]]:
    """IR weight name -> (arc format, raw rows u8[N, bytes]) for the tensors of a llama GGUF,
    exactly as stored, in HF's row order: llama.cpp's converter permutes the rows of Q and K
    for its rope layout, and this undoes it as transformers does (LlamaTensorProcessor), by
    moving whole rows, so blocks stay intact. A block type arc cannot keep comes back as
    ("gguf:<TYPE>", None): only keeping it is an error."""
    import numpy as np
    import torch
    from gguf import GGUFReader

    from arc.formats import GGUF_KEPT

    out = {}
    for t in GGUFReader(path).tensors:
        stem, _, leaf = t.name.rpartition(".")
        if leaf != "weight" or len(t.shape) < 2:  # norms: fp32 in the GGUF and in HF alike
            continue
        parts = stem.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
            name = f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
        elif stem in _TOP_NAMES:
            name = _TOP_NAMES[stem]
        else:
            continue
        kind = t.tensor_type.name
        if kind not in GGUF_KEPT:  # weight-format{mode=keep} refuses it, naming the type
            out[name] = (f"gguf:{kind}", None)
            continue
        rows = np.ascontiguousarray(t.data).view(np.uint8).reshape(int(t.shape[-1]), -1)
        if parts[-1] in ("attn_q", "attn_k"):
            n = heads if parts[-1] == "attn_q" else kv_heads
            rows = rows.reshape(n, rows.shape[0] // n // 2, 2, -1).swapaxes(1, 2)
            rows = np.ascontiguousarray(rows).reshape(-1, rows.shape[-1])
        out[name] = (GGUF_KEPT[kind], torch.from_numpy(rows.copy()))
    return out
