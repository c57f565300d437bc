"""Shared fixtures. The tiny engines are built once per run (once across pytest-xdist's
workers: `built_once`); smollm2-135m is converted once and kept in the user's cache (it is slow
to convert; the cache's entries are published atomically, so workers may share it)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: no hub calls
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist's workers (scripts/test.sh: one per core) share the cores: one thread each,
    # here and in the `arc` processes tests start (before torch is imported), else two
    # workers' OpenMP pools, spinning while they wait, fight over the same cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = ("tiny-llama", "tiny-qwen2", "tiny-mistral")


@pytest.fixture(scope="session", autouse=True)
def _quiet():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def traced():
    """model ref -> (loaded model, traced module), cached for the session."""
    from arc.compiler import trace_model

    cache: dict = {}

    def get(ref: str, max_seq_len: int | None = 256):
        key = (ref, max_seq_len)
        if key not in cache:
            cache[key] = trace_model(ref, max_seq_len)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def hf_model():
    """model ref -> the Hugging Face model (fp32, eval) from the same weights."""
    from transformers import AutoModelForCausalLM

    from arc.models import loader

    cache: dict = {}

    def get(ref: str):
        if ref not in cache:
            _, directory = loader.resolve(ref)
            cache[ref] = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        return cache[ref]

    return get


def hf_greedy(model, prompt_ids: list[int], n: int, eos: list[int] | None) -> list[int]:
    """Hugging Face's own greedy generation: the reference for every lossless claim.

    With `eos=None` it does not stop at EOS (like `arc run --ignore-eos`): HF's generate has no
    such switch, so this drives HF's own forward and cache greedily instead.
    """
    if eos is None:
        return _hf_greedy_no_eos(model, prompt_ids, n)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            eos_token_id=eos,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engines")


def built_once(tmp_path_factory, name: str, build) -> Path:
    """Directory `name`, filled by `build(directory)` once per test run.

    Under pytest-xdist each worker is its own process with its own session fixtures; the
    workers' base temp directories share a parent, where the first worker to take the lock
    builds and the others wait and reuse it. A build that raised leaves no `.done`, so the
    next worker tries again (and fails the same way, visibly)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out = root / name
    with FileLock(f"{out}.lock"):
        if not (out / ".done").exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out)
            (out / ".done").write_text("ok")
    return out


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _hf_greedy_no_eos(model, prompt_ids: list[int], n: int) -> list[int]:
    from transformers import DynamicCache

    cache, out = DynamicCache(config=model.config), []
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        for _ in range(n):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            out.append(int(logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]])
    return out


@pytest.fixture(scope="session")
def tiny_engines(tmp_path_factory):
    """ref -> an -O2 AOTInductor engine (256 slots) per tiny family, compiled once per run."""
    from tests.e2e.cli import arc_json

    def build(directory: Path) -> None:
        for ref in TINY:
            out = directory / f"{ref}-O2.arc"
            summary = arc_json(
                "compile", ref, "--target", "torch", "-O2", "--max-seq-len", "256", "-o", str(out)
            )
            assert summary["target"] == "torch" and summary["device"] == "cpu"
            passes = [p["name"] for p in summary["passes"]]
            assert passes == ["kv-fusion", "weight-format", "spec-tree"]

    directory = built_once(tmp_path_factory, "tiny-engines", build)
    return {ref: directory / f"{ref}-O2.arc" for ref in TINY}


def pytest_terminal_summary(terminalreporter):
    """Counts that tests report (`record_property`), printed at the end of the run: the fuzz
    test's number of damaged engines tried shows in CI's log without -s."""
    for report in terminalreporter.stats.get("passed", []):
        for key, value in getattr(report, "user_properties", []):
            terminalreporter.write_line(f"{report.nodeid}: {key} = {value}")
