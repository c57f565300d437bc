"""The torch target: lowered logits against HF's forward; AOT and jit against eager."""

from __future__ import annotations

import pytest
import torch

from arc.errors import EngineError
from arc.lowering import lower
from arc.pipeline import PassManager
from arc.runtime.steps import Steps
from tests.conftest import TINY

TOKENS = [5, 77, 120, 3, 250, 19, 64, 64, 201, 9, 33, 140, 2, 99, 180, 45, 7, 300, 12, 88] * 2


def _steps_logits(steps: Steps, tokens: list[int], split: int) -> torch.Tensor:
    """Logits rows for positions split-1 .. len-1: one prefill, then decode steps."""
    steps.reset()
    with torch.inference_mode():
        rows = [steps.prefill(tokens[:split], 0)]
        rows += [steps.decode(t, i) for i, t in enumerate(tokens[split:], start=split)]
    return torch.stack(rows[:-1])


@pytest.mark.parametrize("ref", TINY)
@pytest.mark.parametrize("spec", ["", "kv-fusion"])
@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "gqa-math"])
def test_eager_logits_match_hugging_face_forward(ref, spec, sdpa, traced, hf_model):
    loaded, module = traced(ref)
    module, _ = PassManager(spec).run(module)
    fns, kv = lower(module, loaded.weights, sdpa=sdpa)
    steps = Steps(fns, max_seq_len=module.kv.max_seq_len, reset=kv.reset)
    ours = _steps_logits(steps, TOKENS, split=11)
    with torch.inference_mode():
        ref_logits = hf_model(ref)(torch.tensor([TOKENS])).logits[0, 10:-1]
    torch.testing.assert_close(ours, ref_logits, rtol=1e-4, atol=1e-4)


def test_aot_engine_matches_eager(tiny_engines, traced):
    from arc.runtime.load import load_engine

    for ref, path in tiny_engines.items():
        eng = load_engine(path)
        loaded, _ = traced(ref)
        fns, kv = lower(eng.module, loaded.weights)
        eager = Steps(fns, max_seq_len=eng.module.kv.max_seq_len, reset=kv.reset)
        aot = eng.generator.steps
        torch.testing.assert_close(
            _steps_logits(aot, TOKENS, 9), _steps_logits(eager, TOKENS, 9), rtol=1e-5, atol=1e-5
        )


def test_jit_mode_matches_eager(traced):
    from arc.targets import torch_compile

    loaded, module = traced("tiny-llama")
    module, _ = PassManager("kv-fusion").run(module)
    jit = torch_compile.load(module, loaded.weights, None, {"mode": "jit"}, "cpu")
    fns, kv = lower(module, loaded.weights)
    eager = Steps(fns, max_seq_len=module.kv.max_seq_len, reset=kv.reset)
    torch.testing.assert_close(
        _steps_logits(jit, TOKENS, 7), _steps_logits(eager, TOKENS, 7), rtol=1e-5, atol=1e-5
    )


@pytest.mark.gpu
def test_cuda_matches_cpu(traced):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    loaded, module = traced("tiny-llama")
    cpu_fns, cpu_kv = lower(module, loaded.weights, "cpu")
    gpu_fns, gpu_kv = lower(module, loaded.weights, "cuda")
    cpu = Steps(cpu_fns, max_seq_len=module.kv.max_seq_len, reset=cpu_kv.reset)
    gpu = Steps(gpu_fns, max_seq_len=module.kv.max_seq_len, device="cuda", reset=gpu_kv.reset)
    torch.testing.assert_close(
        _steps_logits(gpu, TOKENS, 9).cpu(), _steps_logits(cpu, TOKENS, 9), rtol=1e-3, atol=1e-3
    )


def test_aot_weights_as_inputs_matches_eager(traced, tmp_path):
    """The CUDA engines' form, built and run on CPU: weights and KV cache are trailing inputs
    (bind=inputs), the KV ones mutated in place across prefill and decode; every call reads
    all slots (static_slots), attention written out."""
    from arc.targets import aoti_probe, torch_compile

    loaded, module = traced("tiny-llama", 64)
    module, _ = PassManager("kv-fusion").run(module)
    opts = {"mode": "aot", "bind": "inputs", "static_slots": True}
    info, artifacts = torch_compile.build(module, loaded.weights, "cpu", tmp_path, opts)
    assert info["bind"] == "inputs" and set(info["inputs"]) == {"prefill", "decode"}
    assert info["static_slots"]
    assert any(k.startswith("kv.") for k in info["inputs"]["decode"])
    aot = torch_compile.load(module, loaded.weights, tmp_path, info, "cpu")
    fns, kv = lower(module, loaded.weights)
    eager = Steps(fns, max_seq_len=module.kv.max_seq_len, reset=kv.reset)
    torch.testing.assert_close(
        _steps_logits(aot, TOKENS, 9), _steps_logits(eager, TOKENS, 9), rtol=1e-5, atol=1e-5
    )
    assert aoti_probe.check_loads(tmp_path / "decode.pt2", cached=False) == "package"
    # the other way to open a package (extracted .so, torch's runner directly): same logits
    fns2, kv2 = lower(module, loaded.weights, "cpu", **torch_compile._kernels(info))
    ways = dict.fromkeys(fns2, "runner")
    runner = Steps(
        torch_compile._load_aot_inputs(fns2, tmp_path, info["inputs"], ways),
        max_seq_len=module.kv.max_seq_len,
        reset=kv2.reset,
        bucket=module.kv.max_seq_len,
    )
    torch.testing.assert_close(
        _steps_logits(runner, TOKENS, 9), _steps_logits(eager, TOKENS, 9), rtol=1e-5, atol=1e-5
    )
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a package")
    with pytest.raises(EngineError, match="cannot load AOTInductor .* exit 1"):
        aoti_probe.check_loads(bad, cached=False)
    info["inputs"]["decode"] = info["inputs"]["decode"][::-1]  # a package built otherwise
    with pytest.raises(EngineError, match="recorded inputs differ"):
        torch_compile.load(module, loaded.weights, tmp_path, info, "cpu")


def test_aoti_runner_way_refuses_bad_members(tmp_path):
    """The runner way extracts a package's model members into arc's cache: a member name that
    could reach outside the folder is refused with one line, and nothing is left behind."""
    import zipfile

    from arc.targets import aoti_probe

    for i, bad_name in enumerate(["..", ".hidden.so"]):
        bad = tmp_path / f"bad{i}.pt2"
        with zipfile.ZipFile(bad, "w") as zf:
            zf.writestr("m/data/aotinductor/model/a.so", b"x")
            zf.writestr(f"m/data/aotinductor/model/{bad_name}", b"x")
        with pytest.raises(EngineError, match="bad member name"):
            aoti_probe.open_package(bad, "runner")
    with pytest.raises(EngineError, match="unknown way"):
        aoti_probe.open_package(bad, "other")
