"""Model references: catalog names, HF directories, GGUF files, and clear refusals."""

from __future__ import annotations

import json

import pytest
import torch

from arc.errors import ArcError, UnsupportedError
from arc.models import catalog, loader


def test_catalog_tiny_models_have_the_right_families():
    kinds = {ref: loader.load(ref, weights=False).arch.model_type for ref in catalog.tiny.KINDS}
    assert kinds == {"tiny-llama": "llama", "tiny-qwen2": "qwen2", "tiny-mistral": "mistral"}


def test_hf_directory_loads_like_its_catalog_name():
    by_name = loader.load("tiny-qwen2")
    _, directory = loader.resolve("tiny-qwen2")
    by_dir = loader.load(str(directory))
    assert by_dir.arch == by_name.arch
    assert torch.equal(by_dir.weights["layers.1.bq"], by_name.weights["layers.1.bq"])
    assert by_name.arch.qkv_bias and by_name.arch.tied


def test_unknown_and_unsupported(tmp_path):
    with pytest.raises(ArcError, match="unknown model 'nope'"):
        loader.resolve("nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(UnsupportedError, match="unsupported architecture 'mamba'"):
        loader.load(str(tmp_path))


def test_not_a_gguf(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(ArcError, match="not a GGUF file"):
        loader.resolve(str(fake))


@pytest.mark.real
def test_gguf_file_path_reads_the_real_model():
    """A .gguf path is dequantized through transformers into the same fp32 weights."""
    gguf = catalog._smollm2_gguf()
    from_file = loader.load(str(gguf))
    from_catalog = loader.load("smollm2-135m")
    assert from_file.arch == from_catalog.arch
    assert from_file.arch.layers == 30 and from_file.arch.kv_heads == 3
    for key in ("embed", "layers.7.wk", "layers.29.w_down"):
        assert torch.equal(from_file.weights[key], from_catalog.weights[key])
