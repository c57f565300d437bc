"""The torch target's parallel build (targets/torch_jobs.py): packages a child process built
run like the parent's own, a child that fails costs nothing but time, and ARC_BUILD_JOBS is
checked."""

from __future__ import annotations

import os

import pytest
import torch

from arc.errors import ArcError
from arc.lowering import lower
from arc.pipeline import PassManager
from arc.runtime.steps import Steps
from arc.targets import torch_compile, torch_jobs
from tests.targets.test_torch_target import TOKENS, _steps_logits


def test_packages_built_in_a_child_run_as_eager(traced, tmp_path, monkeypatch):
    loaded, module = traced("tiny-qwen2", 64)
    module, _ = PassManager("kv-fusion").run(module)
    built = {}
    build_all = torch_jobs.build_all

    def spy(*args, **kwargs):  # every function claimed by the child, none by this process
        built.update(build_all(*args, **{**kwargs, "in_parent": False}))
        return built

    monkeypatch.setattr(torch_jobs, "build_all", spy)
    monkeypatch.setenv("ARC_BUILD_JOBS", "2")
    info, artifacts = torch_compile.build(module, loaded.weights, "cpu", tmp_path / "a", {})
    assert set(built) == set(module.functions) and os.getpid() not in built.values()
    assert sorted(artifacts) == sorted(f"{n}.pt2" for n in module.functions)
    assert not list(tmp_path.glob("jobs-*"))  # the children's files are gone
    aot = torch_compile.load(module, loaded.weights, tmp_path / "a", info, "cpu")
    fns, kv = lower(module, loaded.weights)
    eager = Steps(fns, max_seq_len=module.kv.max_seq_len, reset=kv.reset)
    torch.testing.assert_close(
        _steps_logits(aot, TOKENS[:30], 9), _steps_logits(eager, TOKENS[:30], 9)
    )


def test_a_failed_child_leaves_its_work_to_the_parent(tmp_path, capfd):
    (tmp_path / "module.json").write_text("not json")  # the child dies reading it
    done = []
    built = torch_jobs.build_all(
        ["f", "g"], done.append, tmp_path, {"device": "cpu"}, jobs=2, in_parent=False
    )
    assert done == ["f", "g"] and set(built.values()) == {os.getpid()}
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "build process exited with 1" in err[0]


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_bad_jobs_value_is_refused(value, monkeypatch):
    monkeypatch.setenv("ARC_BUILD_JOBS", value)
    with pytest.raises(ArcError, match="ARC_BUILD_JOBS"):
        torch_jobs.jobs_for(6, 1000)


def test_jobs_follow_the_setting_functions_and_memory(monkeypatch):
    monkeypatch.setenv("ARC_BUILD_JOBS", "8")
    assert torch_jobs.jobs_for(3, 1000) == 3  # never more than functions
    monkeypatch.delenv("ARC_BUILD_JOBS")
    monkeypatch.setattr(torch_jobs, "_available_memory", lambda: 2 * torch_jobs.PER_JOB_OVERHEAD)
    assert torch_jobs.jobs_for(6, int(1e12)) == 1  # a TB of weights: one process
