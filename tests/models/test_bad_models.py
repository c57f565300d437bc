"""Contract 4 for model inputs: a broken HF directory or GGUF file is one ArcError line (exit 2
from the CLI), refused before the slow part, and a failed conversion leaves nothing in the cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from arc.errors import ArcError, UnsupportedError
from arc.models import loader
from tests.e2e.cli import arc, assert_clean_error


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh, empty ARC_CACHE for this test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("ARC_CACHE", str(root))
    return root


def _leftovers(root: Path) -> list[str]:
    """Everything under the cache's entry directories (empty after a failed conversion)."""
    return sorted(str(p.relative_to(root)) for p in root.glob("*/*"))


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    tokens: list[str] | None = None,
    token_type: list[int] | None = None,
    merges: list[str] | None = None,
) -> Path:
    """A tiny GGUF (a few KB): llama-style metadata, a gpt2 tokenizer, one f32 tensor."""
    from gguf import GGUFWriter

    tokens = tokens or ["a", "b", "ab", "c"]
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    if token_type is not None:
        w.add_token_types(token_type)
    w.add_token_merges(merges if merges is not None else ["a b"])
    w.add_eos_token_id(0)
    w.add_tensor("token_embd.weight", np.ones((256, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _hf_copy(tmp_path: Path, name: str) -> Path:
    _, src = loader.resolve("tiny-llama")
    dst = tmp_path / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*"))
    return dst


# ---------------------------------------------------------------- HF directories


def test_malformed_config_json(tmp_path):
    cases = {
        "not-json": ('{"model_type": "llama", ', "is not readable JSON"),
        "a-list": ("[1, 2]", "is not a JSON object"),
        "bad-type": (None, "hidden_size"),
        "no-layers": (None, "inconsistent model sizes (layers)"),
    }
    for name, (text, fragment) in cases.items():
        d = _hf_copy(tmp_path, name)
        cfg = d / "config.json"
        if text is None:
            raw = json.loads(cfg.read_text())
            if name == "bad-type":
                raw["hidden_size"] = "big"
            else:
                raw["num_hidden_layers"] = 0
            text = json.dumps(raw)
        cfg.write_text(text)
        with pytest.raises(ArcError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            loader.load(str(d), weights=False)


def test_hf_directory_without_tokenizer(tmp_path):
    d = _hf_copy(tmp_path, "no-tokenizer")
    for p in d.glob("tokenizer*"):
        p.unlink()
    with pytest.raises(ArcError, match="has no tokenizer"):
        loader.load(str(d), weights=False)
    (d / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ArcError, match="cannot read the tokenizer"):
        loader.load(str(d), weights=False)


def test_malformed_config_from_the_cli(tmp_path):
    d = _hf_copy(tmp_path, "broken")
    (d / "config.json").write_text("{")
    assert_clean_error(arc("inspect", str(d), "--ir"), "config.json is not readable JSON")


# ---------------------------------------------------------------- GGUF files


def test_truncated_gguf(tmp_path, cache):
    whole = write_gguf(tmp_path / "whole.gguf").read_bytes()
    for n in (40, len(whole) * 3 // 4):  # inside the header; inside the tensor data
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(whole[:n])
        with pytest.raises(ArcError, match=f"GGUF cut{n}.gguf is truncated or corrupt"):
            loader.resolve(str(cut))
    assert _leftovers(cache) == []


def test_unsupported_gguf_architecture_is_refused_before_dequantizing(tmp_path, cache, monkeypatch):
    import transformers

    def never(*a, **k):
        raise AssertionError("transformers was asked to load the GGUF")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", never)
    path = write_gguf(tmp_path / "other.gguf", arch="gpt2")
    with pytest.raises(UnsupportedError, match="unsupported GGUF architecture 'gpt2'"):
        loader.resolve(str(path))
    assert _leftovers(cache) == []


def test_gguf_with_a_tokenizer_that_panics(tmp_path, cache, capfd):
    """Empty user-defined tokens make the tokenizers library panic (a BaseException, with Rust
    output written straight to fd 2): one ArcError, nothing else on stderr, nothing cached."""
    bad = write_gguf(tmp_path / "panic.gguf", tokens=["a", "b", "", ""], token_type=[4, 4, 4, 4])
    with pytest.raises(ArcError, match="cannot read GGUF panic.gguf \\(tokenizer\\)"):
        loader.resolve(str(bad))
    assert capfd.readouterr().err == ""
    assert _leftovers(cache) == []


def test_gguf_errors_from_the_cli(tmp_path):
    env = {"ARC_CACHE": str(tmp_path / "cache")}
    bad = write_gguf(tmp_path / "panic.gguf", tokens=["a", "b", "", ""], token_type=[4] * 4)
    assert_clean_error(arc("inspect", str(bad), env=env), "(tokenizer)")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(write_gguf(tmp_path / "ok.gguf").read_bytes()[:-100])
    assert_clean_error(arc("inspect", str(cut), env=env), "truncated or corrupt")


def test_failed_catalog_build_leaves_no_directory(cache, monkeypatch):
    from arc.models import tiny

    def boom(kind, out):
        (out / "config.json").write_text("{}")  # half written, then fails
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "build", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        loader.resolve("tiny-llama")
    assert _leftovers(cache) == []
    assert [p.name for p in (cache / "models").iterdir()] == []
