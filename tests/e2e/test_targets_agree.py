"""Contract 2: every installed target gives the torch target's greedy ids for the same pipeline
(fp32), from an engine loaded in a fresh process with no rebuild. Parametrized over the
targets other than torch; one not installed is skipped with the extra to install."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY, hf_greedy
from tests.e2e.cli import arc, arc_json, assert_clean_error

OTHERS = ("onnx", "tvm")
PROMPTS = [
    "Write a Python function that checks if a number is prime.",
    "a" * 70,  # crosses tiny-mistral's 24-token sliding window during prefill
]
N = 40


def _installed(target: str) -> None:
    from arc import targets

    why = targets.describe_one(target)
    if why != "installed":
        pytest.skip(f"target {target} not installed ({why}): pip install 'arc-decode[{target}]'")


@pytest.fixture(scope="module")
def other_engines(engine_dir):
    """(target, ref) -> an -O2 engine of the same pipeline as tests.conftest.tiny_engines."""
    cache: dict = {}

    def get(target: str, ref: str):
        _installed(target)
        if (target, ref) not in cache:
            out = engine_dir / f"{target}-{ref}-O2.arc"
            s = arc_json(
                "compile", ref, "--target", target, "-O2", "--max-seq-len", "256", "-o", str(out)
            )
            assert s["target"] == target
            assert [p["name"] for p in s["passes"]] == ["kv-fusion", "weight-format", "spec-tree"]
            cache[target, ref] = out
        return cache[target, ref]

    return get


@pytest.mark.extra
@pytest.mark.parametrize("target", OTHERS)
@pytest.mark.parametrize("ref", TINY)
def test_greedy_ids_equal_torch_target(target, ref, other_engines, tiny_engines):
    engine = other_engines(target, ref)
    verifies = 0
    for prompt in PROMPTS:
        args = ("--prompt", prompt, "--max-new-tokens", str(N))
        got = arc_json("run", str(engine), *args)
        want = arc_json("run", str(tiny_engines[ref]), *args)
        assert got["token_ids"] == want["token_ids"], (target, ref, prompt)
        verifies += got["verify_passes"]
    assert verifies > 0  # the target's tree verify (tree mask, scratch rows) ran


@pytest.mark.extra
@pytest.mark.real
@pytest.mark.parametrize("target", OTHERS)
def test_smollm2_greedy_ids_equal_hugging_face(target, engine_dir, hf_model):
    """The real model at -O1 (its GGUF blocks kept, run as exact fp32 by these targets): the
    same ids as Hugging Face's fp32 greedy generation, which the torch target also gives."""
    _installed(target)
    out = engine_dir / f"{target}-smollm2-O1.arc"
    arc_json("compile", "smollm2-135m", "--target", target, "-O1", "-o", str(out))
    for prompt in ("What is the capital of France?", PROMPTS[0]):
        r = arc_json("run", str(out), "--prompt", prompt, "--max-new-tokens", "32")
        assert r["token_ids"] == hf_greedy(hf_model("smollm2-135m"), r["prompt_ids"], 32, eos=[2])


@pytest.mark.extra
def test_onnx_engine_records_and_shares_graphs(other_engines):
    """inspect shows target, device, artifacts; the verify functions share one ONNX graph."""
    from arc.engine import read_manifest

    engine = other_engines("onnx", "tiny-llama")
    m = read_manifest(engine)
    graphs = m["target"]["graphs"]
    verifies = {v for k, v in graphs.items() if k.startswith("verify_")}
    assert len(graphs) >= 4 and len(verifies) == 1  # verify_2, _4, ... -> one file
    assert m["target"]["weights_run_as"] == "f32" and m["build_s"] > 0
    shown = arc("inspect", str(engine)).stdout
    assert "target    onnx  device=cpu" in shown and "onnxruntime_version=" in shown
    assert "artifacts " in shown and "verify_2.onnx" in shown


@pytest.mark.extra
def test_missing_extra_at_run_time_is_one_line(other_engines, monkeypatch):
    """An engine whose target's extra is missing: one line naming the pip extra."""
    from arc import targets
    from arc.errors import MissingExtraError
    from arc.runtime.load import load_engine

    engine = other_engines("onnx", "tiny-qwen2")
    module = targets.get("onnx")
    monkeypatch.setattr(module, "installed", lambda: "needs onnxruntime")
    with pytest.raises(MissingExtraError, match=r"pip install 'arc-decode\[onnx\]'"):
        load_engine(engine)


@pytest.mark.extra
def test_onnx_refuses_torch_options_and_bad_engines(other_engines, tmp_path):
    _installed("onnx")
    done = arc(
        "compile",
        "tiny-llama",
        "--target",
        "onnx",
        "--torch-mode",
        "aot",
        "-o",
        str(tmp_path / "x"),
    )
    assert_clean_error(done, "--torch-mode applies to the torch target")
    assert not (tmp_path / "x").exists()
    # an engine recording a device this onnxruntime has no provider for
    from tests.e2e.engine_tools import craft

    def to_cuda(m):
        m["device"] = m["target"]["device"] = "cuda"

    bad = craft(other_engines("onnx", "tiny-llama"), tmp_path / "cuda.arc", to_cuda)
    done = arc("run", str(bad), "--prompt", "hi", "--max-new-tokens", "2")
    assert_clean_error(done, "CUDAExecutionProvider")

    def no_graphs(m):
        del m["target"]["graphs"]

    bad = craft(other_engines("onnx", "tiny-llama"), tmp_path / "nographs.arc", no_graphs)
    done = arc("run", str(bad), "--prompt", "hi", "--max-new-tokens", "2")
    assert_clean_error(done, "does not record its ONNX graphs")


def test_auto_target_records_why(engine_dir):
    """--target auto picks by preference (without -O3 timing) and the manifest says why."""
    from arc.engine import read_manifest

    out = engine_dir / "auto.arc"
    s = arc_json(
        "compile", "tiny-llama", "--target", "auto", "--torch-mode", "eager", "-O1", "-o", str(out)
    )
    from arc import autotarget, targets

    auto = read_manifest(out)["target"]["auto"]
    installed = [t for t in autotarget.PREFERENCE["cpu"] if targets.describe_one(t) == "installed"]
    assert s["target"] == auto["candidates"][0] == installed[0]  # first installed, in order
    assert auto["candidates"] == installed
    assert auto["rule"] == "preference" and "preference" in auto["why"]
    assert "auto      preference" in arc("inspect", str(out)).stdout
    json.dumps(auto)
