"""GGUF files -> a cached fp32 safetensors HF directory, via transformers' GGUF loader.

transformers dequantizes the GGUF tensors (Q4_1, Q8_0, ...) to fp32 and maps llama.cpp's names
to HF's; arc then reads the saved safetensors like any HF checkpoint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from arc.cache import atomic_dir, cache_dir
from arc.errors import ArcError


def cached_dir(path: Path) -> Path:
    """The HF directory for GGUF `path`, converted once and cached by name, size and mtime."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    out = cache_dir("gguf", f"{path.stem}-{key[:12]}")
    if not (out / "config.json").exists():
        atomic_dir(out, lambda tmp: convert(path, tmp))
    return out


def convert(path: Path, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ArcError(f"{path} is not a GGUF file")
    try:
        kw = dict(gguf_file=path.name)
        tok = AutoTokenizer.from_pretrained(path.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
    except (ValueError, KeyError) as e:  # transformers' words for an architecture it can't map
        raise ArcError(f"cannot read GGUF {path.name}: {str(e).splitlines()[0]}") from None
    # Saved as plain fp32: forget the GGUF quantizer so save_pretrained writes real tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
