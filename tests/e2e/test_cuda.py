"""CUDA engines (need an NVIDIA GPU; skipped without one).

- The default engine (eager kernels) replays its decode steps from CUDA graphs and gives
  Hugging Face's fp32 greedy ids on the GPU.
- An AOTInductor engine built with `--device cuda --torch-mode aot` runs in a fresh process,
  replays its decode step from a CUDA graph, and gives Hugging Face's fp32 greedy ids; another
  GPU arch is refused with one line. Where torch cannot load CUDA packages at all
  (targets/aoti_probe.py), the compile must fail with that one line and write nothing, and the
  AOT tests are skipped.

`ARC_GPU_MODELS` (comma list, default tiny-llama) picks the models; the device check adds
smollm2-135m."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.conftest import hf_greedy
from tests.e2e.cli import arc, arc_json, assert_clean_error
from tests.e2e.engine_tools import craft, manifest_of

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]
MODELS = os.environ.get("ARC_GPU_MODELS", "tiny-llama").split(",")
PASSES = "kv-fusion,weight-format{mode=f32}"
PROMPT = "Write a Python function that checks if a number is prime."
N = 48


@pytest.fixture(scope="module")
def cuda_engines(tmp_path_factory):
    out = {}
    root = tmp_path_factory.mktemp("cuda")
    for ref in MODELS:
        path = root / f"{ref}.arc"
        done = arc("compile", ref, "--device", "cuda", "--torch-mode", "aot", "--passes", PASSES,
                   "--max-seq-len", "512", "-o", str(path))  # fmt: skip
        if "cannot load AOTInductor CUDA packages" in done.stderr:  # targets/aoti_probe.py
            assert_clean_error(done, "use --torch-mode eager")
            assert not path.exists()
            pytest.skip(done.stderr.strip())
        assert done.returncode == 0, done.stderr[-4000:]
        out[ref] = path
    return out


@pytest.mark.parametrize("ref", MODELS)
def test_cuda_aot_engine_equals_hugging_face(ref, cuda_engines, hf_model):
    path = cuda_engines[ref]
    target = manifest_of(path)["target"]
    assert target["mode"] == "aot" and target["bind"] == "inputs" and target["static_slots"]
    assert target["gpu_arch"].startswith("sm_")
    r, ref_ids = _run_and_hf(path, ref, hf_model)
    assert r["token_ids"] == ref_ids
    assert r["cuda_graph_replays"] >= N - 2, r  # decode steps replayed, not launched


def _run_and_hf(path, ref, hf_model) -> tuple[dict, list[int]]:
    """`arc run --json` of the engine at `path`, and Hugging Face's greedy ids on the GPU."""
    r = arc_json("run", str(path), "--prompt", PROMPT, "--max-new-tokens", str(N), "--ignore-eos")
    model = hf_model(ref).to("cuda")
    try:
        return r, hf_greedy(_OnDevice(model), r["prompt_ids"], N, None)
    finally:
        hf_model(ref).to("cpu")


def test_cuda_eager_engine_replays_graphs_and_equals_hugging_face(hf_model, tmp_path):
    """The default CUDA engine (eager kernels) replays its decode steps from CUDA graphs, and
    its greedy ids equal Hugging Face's on the GPU; with ARC_CUDA_GRAPHS=0 it launches them."""
    ref = MODELS[0]
    path = tmp_path / "eager.arc"
    done = arc("compile", ref, "--device", "cuda", "--passes", PASSES, "--max-seq-len", "512",
               "-o", str(path))  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert manifest_of(path)["target"]["mode"] == "eager"
    r, ref_ids = _run_and_hf(path, ref, hf_model)
    assert r["token_ids"] == ref_ids
    assert r["cuda_graph_replays"] >= N // 2, r  # one eager run and a capture per L bucket
    assert not r.get("cuda_graph_failures"), r
    plain = arc_json("run", str(path), "--prompt", PROMPT, "--max-new-tokens", str(N),
                     "--ignore-eos", env={"ARC_CUDA_GRAPHS": "0"})  # fmt: skip
    assert plain["token_ids"] == ref_ids and "cuda_graph_replays" not in plain


def test_other_gpu_arch_is_refused(cuda_engines, tmp_path):
    src = next(iter(cuda_engines.values()))

    def edit(m):
        m["target"]["gpu_arch"] = "sm_1"

    bad = craft(src, tmp_path / "arch.arc", edit)
    done = arc("run", str(bad), "--prompt", "hi", "--max-new-tokens", "2")
    assert_clean_error(done, "built for GPU arch sm_1")


class _OnDevice:
    """HF model whose inputs are moved to its device (hf_greedy builds CPU tensors)."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def __call__(self, input_ids, **kw):
        kw = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in kw.items()}
        return self.model(input_ids.to("cuda"), **kw)

    def generate(self, input_ids, **kw):
        kw = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in kw.items()}
        return self.model.generate(input_ids.to("cuda"), **kw).cpu()


def test_json_of_cuda_run_is_plain(cuda_engines):
    r = arc("run", str(next(iter(cuda_engines.values()))), "--prompt", "hi", "--json",
            "--max-new-tokens", "4")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    json.loads(r.stdout)
