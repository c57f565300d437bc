"""Contract 4: bad input is one clear line and exit 2, never a traceback, never a half file."""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest

from tests.e2e.cli import arc, arc_json, assert_clean_error
from tests.e2e.engine_tools import craft


@pytest.fixture(scope="module")
def engine(eager_engine):
    """A small eager engine (no native artifact) to damage in several ways."""
    return eager_engine


def _rewrite(src, dst, edit_manifest=None, edit_payload=None, fix_digest=False):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        manifest = zin.read("manifest.json")
        if edit_manifest:
            manifest = json.dumps(edit_manifest(json.loads(manifest))).encode()
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == "manifest.json":
                data = manifest
            elif info.filename == "manifest.sha256" and fix_digest:
                data = hashlib.sha256(manifest).hexdigest().encode()
            elif edit_payload and info.filename == edit_payload:
                data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
            zout.writestr(info, data)
    return dst


def _run(path):
    return arc("run", str(path), "--prompt", "hi", "--max-new-tokens", "4")


def test_good_engine_runs(engine, hf_model):
    """The undamaged engine decodes Hugging Face's greedy continuation of the chat-templated
    prompt (so the refusals below are refusals of damage, not of everything)."""
    from transformers import AutoTokenizer

    from arc.models import loader
    from tests.conftest import hf_greedy

    r = arc_json("run", str(engine), "--prompt", "hi", "--max-new-tokens", "8", "--ignore-eos")
    tok = AutoTokenizer.from_pretrained(loader.resolve("tiny-qwen2")[1])
    msgs = [{"role": "user", "content": "hi"}]
    want_prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    assert r["prompt_ids"] == list(want_prompt)
    assert r["token_ids"] == hf_greedy(hf_model("tiny-qwen2"), r["prompt_ids"], 8, eos=None)
    assert r["stop_reason"] == "max_new_tokens"


def test_corrupted_payload_is_refused(engine, tmp_path):
    bad = _rewrite(engine, tmp_path / "corrupt.arc", edit_payload="weights.safetensors")
    assert_clean_error(_run(bad), "weights.safetensors fails its SHA-256 check")


def test_truncated_engine_is_refused(engine, tmp_path):
    bad = tmp_path / "truncated.arc"
    bad.write_bytes(engine.read_bytes()[: engine.stat().st_size // 2])
    assert_clean_error(_run(bad), "not an arc engine, or truncated")


def test_hand_edited_manifest_is_refused(engine, tmp_path):
    def edit(m):
        m["runtime"]["max_seq_len"] = 4096
        return m

    bad = _rewrite(engine, tmp_path / "edited.arc", edit_manifest=edit)
    assert_clean_error(_run(bad), "manifest.json was modified")


def test_engine_of_an_older_format_is_refused(engine, tmp_path):
    def edit(m):
        m["format_version"] = 2  # before tvm wrote and moved K/V rows in place
        return m

    bad = _rewrite(engine, tmp_path / "old.arc", edit_manifest=edit, fix_digest=True)
    assert_clean_error(_run(bad), "engine format 2 but this arc reads 3-5; rebuild it")


def test_engine_of_format_3_still_runs(engine, tmp_path):
    """Formats 4 and 5 only added the tvm AMX record and the drafting corpus; an engine
    written as format 3 runs as before."""

    def edit(m):
        assert m["format_version"] == 5
        m["format_version"] = 3
        return m

    old = _rewrite(engine, tmp_path / "three.arc", edit_manifest=edit, fix_digest=True)
    args = ("--prompt", "The capital of France is", "--max-new-tokens", "4")
    assert (
        arc_json("run", str(old), *args)["token_ids"]
        == arc_json("run", str(engine), *args)["token_ids"]
    )


def test_engine_of_a_newer_format_is_refused(engine, tmp_path):
    def edit(m):
        m["format_version"] = 6
        return m

    new = _rewrite(engine, tmp_path / "new.arc", edit_manifest=edit, fix_digest=True)
    assert_clean_error(_run(new), "engine format 6 but this arc reads 3-5; rebuild it")


def test_engine_for_other_torch_is_refused(engine, tmp_path):
    def edit(m):
        m["target"]["mode"], m["target"]["torch_version"] = "aot", "1.0.0"
        return m

    # an aot engine lists its artifact (the schema requires one); it is never loaded
    artifact = {"artifacts/decode.pt2": b"not native code"}
    bad = craft(engine, tmp_path / "oldtorch.arc", edit, extra=artifact)
    assert_clean_error(_run(bad), "needs torch 1.0.0")


def test_engine_for_gpu_is_refused_without_one(engine, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")

    def edit(m):
        m["target"]["device"] = m["device"] = "cuda"
        return m

    bad = _rewrite(engine, tmp_path / "gpu.arc", edit_manifest=edit, fix_digest=True)
    assert_clean_error(_run(bad), "built for CUDA but no CUDA GPU")


def test_not_an_engine(tmp_path):
    junk = tmp_path / "junk.arc"
    junk.write_text("hello")
    assert_clean_error(_run(junk), "not an arc engine")
    assert_clean_error(_run(tmp_path / "missing.arc"), "no such engine file")


def test_prompt_longer_than_cache(engine):
    done = arc("run", str(engine), "--prompt", "x" * 200, "--max-new-tokens", "4")
    assert_clean_error(done, "the engine's cache holds 64")


def test_unknown_model_leaves_no_file(tmp_path):
    out = tmp_path / "x.arc"
    assert_clean_error(arc("compile", "no-such-model", "-o", str(out)), "unknown model")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_unsupported_architecture(tmp_path):
    d = tmp_path / "gpt2ish"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2"]}))
    done = arc("compile", str(d), "-o", str(tmp_path / "x.arc"))
    assert_clean_error(done, "unsupported architecture 'gpt2'")


def test_bad_pass_spec_and_unbuilt_target(tmp_path):
    out = str(tmp_path / "x.arc")
    assert_clean_error(
        arc("compile", "tiny-llama", "--passes", "warp-drive", "-o", out),
        "unknown pass 'warp-drive'",
    )
    assert_clean_error(
        arc("compile", "tiny-llama", "--target", "warp", "-o", out), "unknown target 'warp'"
    )
    assert_clean_error(
        arc("compile", "tiny-llama", "--target", "tensorrt", "-o", out),
        "TensorRT is not installed (PyPI's tensorrt-cu13 is a stub",
    )
    assert "tensorrt   devices: -          unavailable: TensorRT is not installed" in (
        arc("targets").stdout
    )
    assert not list(tmp_path.iterdir())


def test_cuda_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    done = arc("compile", "tiny-llama", "--device", "cuda", "-o", str(tmp_path / "x.arc"))
    assert_clean_error(done, "no CUDA GPU is visible")


def test_inspect_engine_and_model(engine):
    done = arc("inspect", str(engine))
    assert done.returncode == 0
    assert "tiny-qwen2" in done.stdout and "kv-fusion" in done.stdout
    assert "weights.safetensors" in done.stdout
    ir = arc("inspect", "tiny-mistral", "--ir")
    assert ir.returncode == 0 and "mask=sliding" in ir.stdout and "func @decode" in ir.stdout
    assert "kv-fusion" in arc("passes").stdout
    assert "torch" in arc("targets").stdout
