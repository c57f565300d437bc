"""--target auto: preference order, the timed choice, and what the manifest records."""

from __future__ import annotations

import time

import pytest

from arc import autotarget
from arc.errors import ArcError


class FakeSteps:
    """Steps whose decode takes `ms` milliseconds; records that prefill and reset ran."""

    def __init__(self, ms: float):
        self.ms, self.calls = ms, []

    def reset(self):
        self.calls.append("reset")

    def prefill(self, tokens, start):
        self.calls.append(("prefill", len(tokens), start))

    def decode(self, token, pos):
        time.sleep(self.ms / 1000)


def test_timed_choice_keeps_the_fastest(monkeypatch, tmp_path):
    monkeypatch.setattr(autotarget, "candidates", lambda device: ["slow", "fast", "mid"])
    speed = {"slow": 12.0, "fast": 2.0, "mid": 6.0}
    built, loaded = [], {}

    def build(name, out):
        built.append((name, out.name))
        return {"who": name}, {f"{name}.bin": out / f"{name}.bin"}

    def load(name, info, out):
        assert info == {"who": name}
        loaded[name] = FakeSteps(speed[name])
        return loaded[name]

    name, record, (info, artifacts) = autotarget.by_timing("cpu", build, load, tmp_path)
    assert name == "fast" and info == {"who": "fast"} and list(artifacts) == ["fast.bin"]
    assert [b[0] for b in built] == ["slow", "fast", "mid"]
    assert record["rule"] == "timed" and record["candidates"] == ["slow", "fast", "mid"]
    ms = record["decode_ms"]
    assert ms["fast"] < ms["mid"] < ms["slow"] and ms["fast"] >= 2.0
    assert "fastest decode step" in record["why"]
    # each candidate was timed after a prefill, and left reset
    assert loaded["mid"].calls[1] == ("prefill", autotarget.TIMED_PROMPT, 0)
    assert loaded["mid"].calls[-1] == "reset"


def test_preference_is_first_installed(monkeypatch):
    from arc import targets

    monkeypatch.setattr(
        targets, "describe_one", lambda n: "needs onnxruntime" if n == "onnx" else "installed"
    )
    monkeypatch.setitem(autotarget.PREFERENCE, "cpu", ("onnx", "torch"))
    name, record = autotarget.by_preference("cpu")
    assert name == "torch" and record["candidates"] == ["torch"]
    assert record["rule"] == "preference" and "onnx, torch" in record["why"]


def test_no_candidate_and_bad_device_are_errors(monkeypatch):
    from arc import targets

    monkeypatch.setattr(targets, "describe_one", lambda n: "not installed")
    with pytest.raises(ArcError, match="no installed target builds for cpu"):
        autotarget.candidates("cpu")
    with pytest.raises(ArcError, match="unknown device 'tpu'"):
        autotarget.resolve_device("tpu")
    monkeypatch.setattr(targets, "cuda_available", lambda: False)
    with pytest.raises(ArcError, match="no CUDA GPU is visible"):  # not torch's traceback
        autotarget.resolve_device("cuda")


def test_torch_mode_goes_to_torch_only():
    opts = {"mode": "eager", "cpu": "native"}
    assert autotarget.options_for("torch", opts) == opts
    assert autotarget.options_for("onnx", opts) == {"cpu": "native"}


def test_timed_choice_passes_over_a_refusing_candidate(monkeypatch, tmp_path):
    """A candidate whose build refuses the module (UnsupportedError) is not timed, and the
    record says why; when every candidate refuses, that is the error."""
    from arc.errors import UnsupportedError

    monkeypatch.setattr(autotarget, "candidates", lambda device: ["picky", "plain"])

    def build(name, out):
        if name == "picky":
            raise UnsupportedError("target picky cannot lower merged KV layers")
        return {"who": name}, {}

    name, record, _ = autotarget.by_timing("cpu", build, lambda n, i, o: FakeSteps(1.0), tmp_path)
    assert name == "plain" and list(record["decode_ms"]) == ["plain"]
    assert record["refused"] == {"picky": "target picky cannot lower merged KV layers"}
    monkeypatch.setattr(autotarget, "candidates", lambda device: ["picky"])
    with pytest.raises(UnsupportedError, match="no installed target takes this pipeline"):
        autotarget.by_timing("cpu", build, lambda n, i, o: FakeSteps(1.0), tmp_path)


@pytest.mark.extra
def test_auto_builds_the_next_target_when_tvm_refuses_the_pipeline(tmp_path):
    """--target auto prefers tvm on CPU; a pipeline tvm cannot lower (MiniCache's merged KV)
    is built for torch instead, and the manifest's auto record names what tvm said."""
    pytest.importorskip("tvm", reason="needs the [tvm] extra to be the preferred target")
    from arc.compiler import CompileOptions, compile_model
    from arc.engine import read_manifest

    out = tmp_path / "x.arc"
    opts = CompileOptions(
        target="auto", spec="kv-fusion{share=1,merge=slerp}", target_options={"mode": "eager"}
    )
    summary = compile_model("tiny-llama", out, opts)
    assert summary["target"] == "torch"
    auto = read_manifest(out)["target"]["auto"]
    assert auto["rule"] == "preference" and "tvm" in auto["refused"]
    assert "merged KV" in auto["refused"]["tvm"] and "passed over tvm" in auto["why"]


def test_compile_without_target_is_auto_unless_torch_mode_names_torch():
    from arc.cli import compile_target

    assert compile_target(None, None) == "auto"
    assert compile_target(None, "eager") == "torch"  # --torch-mode says how to build torch
    assert compile_target("onnx", None) == "onnx" and compile_target("auto", "aot") == "auto"


def test_compile_without_target_builds_the_preferred_target_untimed(tmp_path):
    """`arc compile MODEL -O3 -o X` (no --target) builds the device's first installed target
    that takes the pipeline, by preference: no candidate is built and timed (that is what
    naming --target auto at -O3 asks for), and the manifest says why this target."""
    from arc.engine import read_manifest
    from tests.e2e.cli import arc_json

    out = tmp_path / "x.arc"
    summary = arc_json("compile", "tiny-llama", "-O3", "--max-seq-len", "64", "-o", str(out))
    first = autotarget.candidates("cpu")[0]
    assert summary["target"] == first
    auto = read_manifest(out)["target"]["auto"]
    assert auto["rule"] == "preference" and auto["candidates"][0] == first
    assert "decode_ms" not in auto


@pytest.mark.extra
def test_auto_target_names_what_compile_would_build_without_building():
    """`arc profile`'s one target for all prefixes: the preferred target that takes the whole
    pipeline, or the next one with the refusal recorded, as compile_model chooses."""
    pytest.importorskip("tvm", reason="needs the [tvm] extra to be the preferred target")
    from arc.compiler import auto_target

    name, record = auto_target("tiny-llama", "kv-fusion,spec-tree", "cpu", 64)
    assert name == "tvm" and record["rule"] == "preference" and "refused" not in record
    name, record = auto_target("tiny-llama", "kv-fusion{share=1,merge=slerp}", "cpu", 64)
    assert name == "torch" and "merged KV" in record["refused"]["tvm"]
