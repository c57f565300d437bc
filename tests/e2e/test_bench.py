"""`arc bench`: an arc engine against Hugging Face on tiny-llama, each in its own processes.

One run (2 interleaved rounds, 2 prompts, 8 new tokens) is checked for the JSON's structure
and consistency: positive times, medians inside the per-round range, ratios that are the
quotients of the medians, and greedy ids equal to HF's for a lossless engine. llama.cpp is
asked for and skipped with a note (tiny-llama has no GGUF); so is a package that is missing, or
found but not importable (a fake `llama_cpp` that raises ImportError). Bad input is one line
and exit 2; Ctrl-C leaves no worker and no --results file behind."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from arc.bench import System, _systems, markdown, plain, print_rich, run_rounds
from tests.e2e.cli import arc, arc_json, assert_clean_error

PROMPTS = ["Write a haiku about the sea.", "List three colors."]
COMMON = ("--model", "tiny-llama", "--new-tokens", "8", "--threads", "1")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An eager -O2 tiny-llama engine (seconds to build, greedy-identical to HF), a prompts
    file, and a directory with a `llama_cpp` that raises ImportError (a missing package)."""
    root = tmp_path_factory.mktemp("bench")
    engine = root / "tiny-O2.arc"
    arc_json("compile", "tiny-llama", "-O2", "--torch-mode", "eager", "--max-seq-len", "128",
             "-o", str(engine))  # fmt: skip
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps([PROMPTS[0], {"kind": "chat", "prompt": PROMPTS[1]}]))
    fake = root / "fake"
    (fake / "llama_cpp").mkdir(parents=True)
    (fake / "llama_cpp" / "__init__.py").write_text("raise ImportError('no llama.cpp here')\n")
    return {"root": root, "engine": engine, "prompts": prompts, "fake": fake}


@pytest.fixture(scope="module")
def run(files):
    out = files["root"] / "results"
    out.mkdir()
    results = out / "RESULTS.md"
    done = arc(
        "bench", str(files["engine"]), *COMMON, "--baselines", "hf,llama.cpp",
        "--prompts", str(files["prompts"]), "--rounds", "2", "--json",
        "--results", str(results),
        env={"PYTHONPATH": os.pathsep.join([str(files["fake"]), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout), done.stderr, results


def test_json_structure(run):
    r, _, _ = run
    assert set(r) == {"command", "date", "machine", "settings", "systems", "skipped", "rounds",
                      "medians", "tokens_per_forward", "same_ids_as_hf", "ratios"}  # fmt: skip
    assert [(s["name"], s["kind"]) for s in r["systems"]] == [("tiny-O2.arc", "arc"), ("hf", "hf")]
    assert r["systems"][1]["versions"]["transformers"]
    s = r["settings"]
    assert (s["model"], s["prompts"], s["new_tokens"], s["rounds"], s["threads"]) == (
        "tiny-llama", 2, 8, 2, 1)  # fmt: skip
    assert s["greedy"] and len(s["prompt_tokens"]) == 2 and min(s["prompt_tokens"]) > 0
    assert set(r["machine"]) >= {"cpu", "cores", "torch", "transformers"}
    assert r["machine"]["cores"] >= 1 and r["command"].startswith("arc bench ")
    for name in ("tiny-O2.arc", "hf"):
        assert len(r["rounds"][name]) == 2  # one worker per round
        for rnd in r["rounds"][name]:
            assert rnd["load_s"] > 0 and rnd["warmup_s"] > 0 and len(rnd["prompts"]) == 2
            for p in rnd["prompts"]:
                assert 1 <= len(p["ids"]) <= 8 and p["produced"] == len(p["ids"]) - 1
                assert p["prefill_ms"] > 0 and p["decode_ms"] > 0
                assert p["stop_reason"] in ("eos", "max_new_tokens")


def test_figures_are_consistent(run):
    r, _, _ = run
    for name, rounds in r["rounds"].items():
        m = r["medians"][name]
        for key in ("tok_s", "prefill_ms", "warmup_s", "load_s"):
            values = [rnd[key] for rnd in rounds]
            assert 0 < min(values) <= m[key] <= max(values), (name, key, values, m[key])
        for rnd in rounds:  # a round's tok/s: all its decode tokens over all its decode time
            tokens = sum(p["produced"] for p in rnd["prompts"])
            seconds = sum(p["decode_ms"] for p in rnd["prompts"]) / 1e3
            assert rnd["tok_s"] == pytest.approx(tokens / seconds)
        assert m["ms_per_token"] == pytest.approx(1e3 / m["tok_s"])
        assert set(r["ratios"][name]) == {"hf"}  # baselines that ran, not skipped ones
        assert r["ratios"][name]["hf"] == pytest.approx(m["tok_s"] / r["medians"]["hf"]["tok_s"])
    assert r["ratios"]["hf"]["hf"] == pytest.approx(1.0)
    assert r["tokens_per_forward"]["hf"] == pytest.approx(1.0)  # one forward per decode token
    assert r["tokens_per_forward"]["tiny-O2.arc"] >= 1.0  # speculative: one or more


def test_lossless_engine_has_hf_ids(run):
    r, _, _ = run
    assert r["same_ids_as_hf"] == {"tiny-O2.arc": 1.0, "hf": 1.0}
    for a, h in zip(r["rounds"]["tiny-O2.arc"], r["rounds"]["hf"], strict=True):
        assert [p["ids"] for p in a["prompts"]] == [p["ids"] for p in h["prompts"]]


def test_sampled_run_samples_every_system_and_compares_no_ids(files):
    """--temperature: arc and hf both sample with the same settings, seeded per prompt (a
    second round draws the same texts), the report says so and compares no ids."""
    done = arc(
        "bench", str(files["engine"]), *COMMON, "--baselines", "hf", "--prompts",
        str(files["prompts"]), "--rounds", "2", "--temperature", "1.5", "--top-p", "0.95",
        "--seed", "3", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout)
    assert not r["settings"]["greedy"]
    assert r["settings"]["sampling"] == {"temperature": 1.5, "top_p": 0.95, "top_k": 0, "seed": 3}
    assert r["same_ids_as_hf"] == {"tiny-O2.arc": None, "hf": None}
    assert "--temperature 1.5 --top-p 0.95 --top-k 0 --seed 3" in r["command"]
    for name in ("tiny-O2.arc", "hf"):
        first, second = ([p["ids"] for p in rnd["prompts"]] for rnd in r["rounds"][name])
        assert first == second and r["medians"][name]["tok_s"] > 0  # seeded: the same draws
    hf = [p["ids"] for p in r["rounds"]["hf"][0]["prompts"]]
    assert hf != [p["ids"] for p in r["rounds"]["tiny-O2.arc"][0]["prompts"]]  # greedy: equal
    assert "sampled (temperature 1.5, top-p 0.95, top-k 0)" in plain(r).splitlines()[0]


def test_a_baseline_that_cannot_run_is_a_note(run):
    r, err, _ = run  # the fake llama_cpp is found; tiny-llama has no GGUF for it
    assert r["skipped"] == [{"system": "llama.cpp", "reason": "tiny-llama has no GGUF file"}]
    notes = [ln for ln in err.splitlines() if ln.startswith("arc: note: ")]
    assert notes == ["arc: note: llama.cpp skipped: tiny-llama has no GGUF file"], err
    assert "Traceback" not in err and "llama.cpp" not in r["rounds"]


def test_a_package_missing_is_a_note(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name)
    )
    systems, skipped = _systems([], ["hf", "llama.cpp"], "smollm2-135m", "/some/hf/dir")
    assert systems == [System("hf", "hf", "/some/hf/dir")]
    assert skipped == [{"system": "llama.cpp", "reason": "llama-cpp-python is not installed"}]


def test_a_package_that_does_not_import_is_skipped_by_its_worker(files, monkeypatch, capsys):
    """Found but broken (here: a fake raising ImportError): the first worker says so, the
    system runs no more rounds, the others go on."""
    monkeypatch.setenv("PYTHONPATH", str(files["fake"]))
    job = {"threads": 1}  # the worker stops at its import, before reading anything else
    raw, skipped = run_rounds([System("llama.cpp", "llama.cpp", "none.gguf")], job, 3)
    assert raw == {}
    why = "llama-cpp-python is not installed (no llama.cpp here)"
    assert skipped == [{"system": "llama.cpp", "reason": why}]
    assert "arc: note: llama.cpp skipped: llama-cpp-python" in capsys.readouterr().err


def test_results_markdown_and_tables(run, capsys):
    r, _, results = run
    text = results.read_text()
    assert text == markdown(r)  # the same table, written whole
    assert os.listdir(results.parent) == ["RESULTS.md"]  # no temp file left
    assert r["machine"]["cpu"] in text and "Reproduce: `arc bench " in text
    head = "| system | tok/s | ms/token | prefill ms | tok/forward | same ids as hf | warm-up s"
    assert head + " | x hf |" in text
    rows = [
        ln for ln in text.splitlines() if ln.startswith("| tiny-O2.arc") or ln.startswith("| hf")
    ]
    assert len(rows) == 2 and rows[1].endswith("| 1.00x |")
    assert "note: llama.cpp skipped: tiny-llama has no GGUF file" in text
    lines = plain(r).splitlines()
    assert lines[0].startswith("arc bench: tiny-llama, 2 prompts") and "x hf" in plain(r)
    assert sum(ln.startswith(("tiny-O2.arc ", "hf ")) for ln in lines) == 2
    print_rich(r)
    assert "tiny-O2.arc" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["/no/such.arc"], "no such engine file"),
        (["JUNK"], "not an arc engine"),
        (["--baselines", "hf", "--rounds", "0"], "--rounds: 0 must be at least 1"),
        (["--baselines", "hf", "--new-tokens", "x"], "not a whole number"),
        (["--baselines", "hf,vllm"], "unknown baseline 'vllm'"),
        (["--baselines", ""], "nothing to measure"),
        (["--baselines", "hf", "--results", "/no/such/dir/r.md"], "does not exist"),
        (["--baselines", "hf", "--temperature", "-1"], "--temperature must be"),
        (["--baselines", "hf", "--temperature", "0.7", "--top-p", "2"], "--top-p must be in"),
    ],
)
def test_bad_input_is_one_line(files, args, fragment):
    junk = files["root"] / "junk.arc"
    junk.write_bytes(b"not a zip file" * 10)
    args = [str(junk) if a == "JUNK" else a for a in args]
    assert_clean_error(arc("bench", *args), fragment)


def test_corrupt_payload_is_reported_from_the_worker(files, tmp_path):
    """The manifest reads, a payload's digest does not match: the worker says so, in one line."""
    bad = tmp_path / "bad.arc"
    with zipfile.ZipFile(files["engine"]) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith(".safetensors"):
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            zout.writestr(info, data)
    done = arc("bench", str(bad), *COMMON, "--baselines", "", "--prompts", str(files["prompts"]))
    assert_clean_error(done, "bad.arc")


def test_ctrl_c_kills_the_worker_and_writes_nothing(files, tmp_path):
    results = tmp_path / "RESULTS.md"
    args = ["bench", str(files["engine"]), *COMMON, "--baselines", "hf"]
    args += ["--prompts", str(files["prompts"]), "--results", str(results)]
    args += ["--rounds", "500"]  # still running when the signal comes, however fast the machine
    cmd = [sys.executable, "-m", "arc.cli", *args]
    # A shell's background job (`cmd &`, nohup) starts with SIGINT ignored, and Python keeps an
    # inherited SIG_IGN: give the driver the default action, as a terminal's Ctrl-C meets it.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        worker = _wait_for(lambda: _worker_of(proc.pid), 120)
        assert worker, proc.communicate(timeout=60)[1].decode()[-2000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err.decode()[-2000:]
    assert b"Traceback" not in err
    assert not Path(f"/proc/{worker}").exists()  # killed and reaped
    assert list(tmp_path.iterdir()) == []


def _wait_for(predicate, timeout: float):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if found := predicate():
            return found
        time.sleep(0.05)
    return None


def _worker_of(pid: int) -> int | None:
    """The pid of `pid`'s `arc.bench --worker` child process, if it has one now."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"--worker" in cmdline:
            return int(stat.parent.name)
    return None


def test_ctrl_c_while_a_worker_starts_still_kills_it(tmp_path, monkeypatch):
    """A Ctrl-C that lands inside Popen, after the fork, once left the new worker running with
    no handle to kill it; now it is held until the handle exists, then raised."""
    import arc.bench as bench

    started = []
    real = subprocess.Popen

    def popen(cmd, **kw):  # the worker starts (a stand-in that would run a minute)...
        proc = real(["sleep", "60"], **kw)
        started.append(proc.pid)
        signal.raise_signal(signal.SIGINT)  # ...and Ctrl-C comes before Popen returns
        return proc

    monkeypatch.setattr(bench.subprocess, "Popen", popen)
    with pytest.raises(KeyboardInterrupt):
        bench._spawn(System("x", "arc", "x.arc"), {"threads": 1}, tmp_path / "job")
    assert started and not Path(f"/proc/{started[0]}").exists()  # killed and reaped
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
