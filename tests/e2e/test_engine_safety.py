"""Opening an engine never writes outside arc's cache; a crafted or malformed engine is one line
and exit 2 (issue 5, sections 1-3); an engine refuses a CPU without the extensions it needs."""

from __future__ import annotations

import hashlib
import shutil
import zipfile

import pytest
import torch

from arc import cpu
from tests.e2e.cli import arc, assert_clean_error
from tests.e2e.engine_tools import (
    craft,
    manifest_of,
    run_in_process,
    run_subprocess,
    shared_objects,
    tree,
)

TRAVERSAL = ["../../x", "../../../escaped", "a\\b", "artifacts/../../x", "tokenizer/../../../up"]


def _run_args(path) -> tuple[str, ...]:
    return ("run", str(path), "--prompt", "hi", "--max-new-tokens", "2")


def _unpacked(cache) -> list:
    """Files unpacked into the cache's engines directory (none when refused early)."""
    engines = cache / "engines"
    return sorted(p for p in engines.rglob("*") if p.is_file()) if engines.exists() else []


@pytest.fixture
def sandbox(tmp_path):
    """tmp/work (where crafted engines go and the CLI runs), tmp/cache (ARC_CACHE)."""
    (tmp_path / "work").mkdir()
    return tmp_path


# ---------------------------------------------------------------- section 1: names, members


@pytest.mark.parametrize("name", [*TRAVERSAL, "ABSOLUTE"])
def test_payload_name_outside_the_allowlist(eager_engine, sandbox, name):
    """The real CLI, in a fresh process: refused before anything is written anywhere."""
    if name == "ABSOLUTE":
        name = str(sandbox / "abs" / "path")  # an absolute path the user can write
    bad = craft(eager_engine, sandbox / "work" / "bad.arc", extra={name: b"pwned"})
    before = tree(sandbox)
    cache = sandbox / "cache"
    done = run_subprocess(*_run_args(bad), cache=cache, cwd=sandbox / "work")
    assert_clean_error(done, "is not one arc writes")
    assert tree(sandbox, skip=cache) == before  # nothing new or changed outside the cache
    assert not (sandbox / "abs").exists() and not (sandbox / "escaped").exists()
    assert _unpacked(cache) == []  # and nothing inside it either


def test_names_are_checked_before_any_write(eager_engine, sandbox):
    """A good payload listed before the bad one is not unpacked either: all names come first."""
    cache = sandbox / "cache"
    bad = craft(eager_engine, sandbox / "work" / "bad.arc", extra={"../../../late": b"x"})
    done = run_in_process(*_run_args(bad), cache=cache)
    assert_clean_error(done, "'../../../late' is not one arc writes")
    assert not (sandbox / "late").exists()
    assert _unpacked(cache) == []  # not even weights.safetensors, listed first


def test_duplicate_member(eager_engine, sandbox):
    bad = craft(eager_engine, sandbox / "work" / "dup.arc", duplicate=("weights.safetensors",))
    done = run_in_process(*_run_args(bad), cache=sandbox / "cache")
    assert_clean_error(done, "member 'weights.safetensors' appears twice")


def test_compressed_member(eager_engine, sandbox):
    bad = craft(eager_engine, sandbox / "work" / "zip.arc", compress=("tokenizer/tokenizer.json",))
    done = run_in_process(*_run_args(bad), cache=sandbox / "cache")
    assert_clean_error(done, "member 'tokenizer/tokenizer.json' is compressed")


def test_compressed_manifest(eager_engine, sandbox):
    bad = craft(eager_engine, sandbox / "work" / "zipm.arc", compress=("manifest.json",))
    assert_clean_error(run_in_process("inspect", str(bad), cache=sandbox / "cache"), "compressed")


def test_member_not_in_manifest(eager_engine, sandbox):
    src = sandbox / "work" / "src.arc"
    shutil.copy(eager_engine, src)
    with zipfile.ZipFile(src, "a") as zf:
        zf.writestr("tokenizer/extra.json", b"{}")
    done = run_in_process(*_run_args(src), cache=sandbox / "cache")
    assert_clean_error(done, "member 'tokenizer/extra.json' is not listed in the manifest")


@pytest.mark.parametrize("where", ["/etc", "../../elsewhere", "tokenizer/../../x", "tok"])
def test_tokenizer_dir_elsewhere(eager_engine, sandbox, where):
    """The tokenizer comes from the engine's own verified tokenizer/ payloads, nowhere else."""

    def edit(m):
        m["tokenizer"]["dir"] = where

    bad = craft(eager_engine, sandbox / "work" / "tok.arc", edit)
    done = run_in_process(*_run_args(bad), cache=sandbox / "cache")
    assert_clean_error(done, "tokenizer.dir is")


# ---------------------------------------------------------------- section 3: manifest schema


def _delete(*keys):
    def edit(m):
        d = m
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]

    return edit


def _set(value, *keys):
    def edit(m):
        d = m
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value

    return edit


def _aot_without_artifacts(m):
    m["target"] |= {"mode": "aot", "torch_version": torch.__version__, "cpu_flags": []}


def _unlisted_weights(m):
    del m["files"]["weights.safetensors"]


SCHEMA_CASES = {
    "no files": (_delete("files"), "lacks files"),
    "no target": (_delete("target"), "lacks target"),
    "no runtime": (_delete("runtime"), "lacks runtime"),
    "no ir": (_delete("ir"), "lacks ir"),
    "no target name": (_delete("target", "name"), "lacks target.name"),
    "no prefill_chunk": (_delete("runtime", "prefill_chunk"), "lacks runtime.prefill_chunk"),
    "files a list": (_set([], "files"), "files: list where dict belongs"),
    "target a string": (_set("torch", "target"), "target: str where dict belongs"),
    "runtime a list": (_set([1], "runtime"), "runtime: list where dict belongs"),
    "ir a string": (_set("x", "ir"), "ir: str where dict belongs"),
    "prefill_chunk 0": (_set(0, "runtime", "prefill_chunk"), "prefill_chunk: 0 is below 1"),
    "prefill_chunk str": (_set("8", "runtime", "prefill_chunk"), "str where int belongs"),
    "prefill_chunk true": (_set(True, "runtime", "prefill_chunk"), "bool where int belongs"),
    "max_seq_len 1": (_set(1, "runtime", "max_seq_len"), "max_seq_len: 1 is below 2"),
    "max_seq_len float": (_set(64.0, "runtime", "max_seq_len"), "float where int belongs"),
    "compile_s nan": (_set(float("nan"), "compile_s"), "compile_s: float where number"),
    "weights not listed": (_unlisted_weights, "files lacks weights.safetensors"),
    "aot without artifacts": (_aot_without_artifacts, "target is aot but files lists no"),
    "size negative": (_set({"sha256": "0" * 64, "size": -1}, "files", "weights.safetensors"), ""),
    "sha256 not hex": (_set({"sha256": "zz", "size": 1}, "files", "weights.safetensors"), ""),
    "file entry a string": (_set("x", "files", "weights.safetensors"), "where dict belongs"),
    "pass record": (_set([{"name": "kv-fusion"}], "passes"), "lacks passes[0].wall_ms"),
    "chat_template str": (_set("yes", "tokenizer", "chat_template"), "str where bool"),
    "device mismatch": (_set("cuda", "device"), "target.device and device disagree"),
    "manifest a list": (None, "not a JSON object"),
}


@pytest.mark.parametrize("case", SCHEMA_CASES)
@pytest.mark.parametrize("cmd", ["run", "inspect"])
def test_manifest_schema(eager_engine, sandbox, case, cmd):
    """Every mutation is refused by one check, for `arc run` and `arc inspect` alike."""
    edit, fragment = SCHEMA_CASES[case]
    dst = sandbox / "work" / "schema.arc"
    if edit is None:  # a manifest that is JSON but not an object
        from tests.e2e.engine_tools import read_members, write_engine

        members = read_members(eager_engine)
        for k in ("manifest.json", "manifest.sha256"):
            del members[k]
        bad = write_engine(dst, b"[1, 2]", members)
    else:
        bad = craft(eager_engine, dst, edit)
    args = _run_args(bad) if cmd == "run" else ("inspect", str(bad))
    done = run_in_process(*args, cache=sandbox / "cache")
    assert_clean_error(done, fragment)
    assert "manifest" in done.stderr


@pytest.mark.parametrize(
    "edit",
    [
        _set({"functions": "x"}, "ir"),
        _delete("ir", "functions"),
        _set("NOT_AN_OP", "ir", "functions", 0, "nodes", 3, "op"),
        _set([], "ir", "functions", 0, "nodes"),
        _set(None, "ir", "kv"),
        _set(999, "ir", "kv", "max_seq_len"),
    ],
)
def test_crafted_ir_is_one_line(eager_engine, sandbox, edit):
    bad = craft(eager_engine, sandbox / "work" / "ir.arc", edit)
    for args in (_run_args(bad), ("inspect", str(bad))):
        done = run_in_process(*args, cache=sandbox / "cache")
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "IR" in done.stderr or "max_seq_len" in done.stderr


def test_unknown_target_name(eager_engine, sandbox):
    bad = craft(eager_engine, sandbox / "work" / "t.arc", _set("warp", "target", "name"))
    assert_clean_error(run_in_process(*_run_args(bad), cache=sandbox / "cache"), "unknown target")


# ---------------------------------------------------------------- section 2: the CPU


def _as_aot(flags, march="native"):
    """An engine that claims aot CPU code with `flags` (its artifact is never loaded: the CPU
    check comes first)."""

    def edit(m):
        m["target"] |= {"mode": "aot", "torch_version": torch.__version__, "march": march}
        m["target"] |= {"cpu_flags": flags, "cpu_name": "Imaginary CPU"}
        data = b"not native code"
        m["files"]["artifacts/decode.pt2"] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
        }

    return edit


def _with_artifact(src, dst, edit):
    return craft(src, dst, edit, extra={"artifacts/decode.pt2": b"not native code"})


def test_engine_needing_missing_cpu_flags_is_refused(eager_engine, sandbox):
    bad = _with_artifact(eager_engine, sandbox / "work" / "cpu.arc", _as_aot(["avx512_fake"]))
    done = arc(*_run_args(bad), env={"ARC_CACHE": str(sandbox / "cache")})
    assert_clean_error(done, "this CPU lacks: avx512_fake")
    assert "--cpu x86-64-v3" in done.stderr and "Imaginary CPU" in done.stderr
    assert _unpacked(sandbox / "cache") == []  # refused before any payload was unpacked


def test_engine_without_cpu_record_is_refused(eager_engine, sandbox):
    def edit(m):
        _as_aot([])(m)
        del m["target"]["cpu_flags"]

    bad = _with_artifact(eager_engine, sandbox / "work" / "nocpu.arc", edit)
    done = run_in_process(*_run_args(bad), cache=sandbox / "cache")
    assert_clean_error(done, "does not record the CPU extensions")


def test_cpu_levels():
    assert cpu.build_target("x86-64-v3") == ("x86-64-v3", cpu.LEVELS["x86-64-v3"])
    assert {"avx2", "fma", "bmi2", "f16c"} <= cpu.LEVELS["x86-64-v3"]
    assert cpu.LEVELS["x86-64-v4"] - cpu.LEVELS["x86-64-v3"] == {
        "avx512f",
        "avx512bw",
        "avx512cd",
        "avx512dq",
        "avx512vl",
    }
    march, flags = cpu.build_target("native")
    assert march == "native" and flags <= cpu.host_flags() and flags <= cpu.ISA_FLAGS
    if cpu.is_x86() and cpu.host_flags():
        assert "avx2" in flags or not {"avx2"} <= cpu.host_flags()
    assert cpu.gcc_flags_to_cpuinfo("-mavx512f -mavx512bf16 -mamx-tile -march=native -O3") == {
        "avx512f",
        "avx512_bf16",
        "amx_tile",
    }
    assert cpu.missing_flags(["avx2", "avx512_fake"], frozenset({"avx2"})) == ["avx512_fake"]


def test_cpu_option_is_checked(tmp_path):
    with pytest.raises(SystemExit) as e:
        from arc.cli import main

        main(["compile", "tiny-llama", "--cpu", "x86-64-v9", "-o", str(tmp_path / "x.arc")])
    assert e.value.code == 2


@pytest.mark.skipif(not cpu.is_x86(), reason="x86-64 levels")
def test_portable_build_records_and_runs(sandbox, hf_model):
    """A --cpu x86-64-v3 engine records that level, its code has no AVX-512 (no zmm
    register), and it gives Hugging Face's greedy ids."""
    from tests.conftest import hf_greedy
    from tests.e2e.cli import arc_json

    out = sandbox / "work" / "v3.arc"
    arc_json(
        *("compile", "tiny-llama", "--target", "torch", "-O1", "--cpu", "x86-64-v3"),
        *("--max-seq-len", "64", "-o", str(out)),
    )
    target = manifest_of(out)["target"]
    assert target["march"] == "x86-64-v3" and target["cpu"] == "x86-64-v3"
    assert target["cpu_flags"] == sorted(cpu.LEVELS["x86-64-v3"])
    env = {"ARC_CACHE": str(sandbox / "cache")}
    r = arc_json(*_run_args(out), "--ignore-eos", env=env)
    assert r["token_ids"] == hf_greedy(hf_model("tiny-llama"), r["prompt_ids"], 2, eos=None)
    objdump = shutil.which("objdump")
    if objdump:
        import subprocess

        libs = shared_objects(out, sandbox)
        assert libs  # the check below must not pass on nothing
        for so in libs:
            code = subprocess.run([objdump, "-d", str(so)], capture_output=True, text=True)
            assert "ymm" in code.stdout and "zmm" not in code.stdout, so
