"""Contract 4 for flags: every bad value is one line `arc: error: ...` and exit 2, found before
any slow work (loading an engine, tracing, building).

Most cases call `arc.cli.main` in this process (the same code path as the command, seconds
faster); a few run the real command in a fresh process.
"""

from __future__ import annotations

import pytest

from arc.cli import main
from tests.e2e.cli import arc, arc_json, assert_clean_error


def _main(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `arc ARGV` run in this process."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors exit from inside parse_args
        rc = e.code
    return rc, capsys.readouterr().err


def _assert_one_line(rc: int, err: str, fragment: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("arc: error: "), err
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--temperature", "0.8", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--temperature", "0.8", "--top-p", "-0.5"], "--top-p must be in (0, 1]"),
        (["--temperature", "0.8", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--temperature", "nan"], "--temperature must be a finite number"),
        (["--temperature", "inf"], "--temperature must be a finite number"),
        (["--temperature", "-1"], "--temperature must be a finite number"),
        (["--top-k", "-3"], "--top-k must be an integer >= 0"),
        (["--seed", "1e23"], "argument --seed: invalid int value: '1e23'"),
        (["--seed", str(2**64)], "--seed must be an integer from 0 to 18446744073709551615"),
        (["--seed", "-1"], "--seed must be an integer from 0"),
        (["--threads", "-1"], "--threads must be at least 1"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--threads", "100000"], "--threads 100000 is more than arc runs here"),  # segfaulted
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ],
)
def test_bad_run_flags(flags, fragment, eager_engine, capsys):
    rc, err = _main(["run", str(eager_engine), "--prompt", "hi", *flags], capsys)
    _assert_one_line(rc, err, fragment)


def test_bad_flags_in_a_fresh_process(eager_engine):
    done = arc("run", str(eager_engine), "--prompt", "hi", "--seed", "1e23")
    assert_clean_error(done, "invalid int value: '1e23'")
    done = arc("run", str(eager_engine), "--prompt", "hi", "--temperature", "nan")
    assert_clean_error(done, "--temperature must be a finite number")


def test_tiny_temperature_samples_the_argmax(eager_engine):
    """Temperature 1e-40 is valid: the sampler keeps it finite, so it decodes greedily."""
    common = ("run", str(eager_engine), "--prompt", "hello", "--max-new-tokens", "12")
    greedy = arc_json(*common, "--ignore-eos")
    cold = arc_json(*common, "--ignore-eos", "--temperature", "1e-40", "--top-p", "1e-9")
    assert cold["token_ids"] == greedy["token_ids"] and len(greedy["token_ids"]) == 12


def test_bad_output_path_fails_before_tracing(tmp_path, capsys, monkeypatch):
    import arc.compiler

    def no_tracing(*a, **k):
        raise AssertionError("traced before checking -o")

    monkeypatch.setattr(arc.compiler, "trace_model", no_tracing)
    (tmp_path / "file").write_text("x")
    cases = [
        (str(tmp_path), "is a directory"),
        (str(tmp_path / "missing" / "x.arc"), "does not exist"),
        (str(tmp_path / "file" / "x.arc"), "does not exist"),
        ("/proc/x.arc", "cannot write in /proc"),  # unwritable even for root
        ("/dev/null", "is not a regular file"),
    ]
    for out, fragment in cases:
        rc, err = _main(["compile", "tiny-llama", "--torch-mode", "eager", "-o", out], capsys)
        _assert_one_line(rc, err, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no probe left behind


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--max-seq-len", "2"], "--max-seq-len 2 outside 16..1024"),
        (["--max-seq-len", "15"], "outside 16..1024"),
        (["--max-seq-len", "5000"], "outside 16..1024"),
        (["--max-seq-len", "64", "--prefill-chunk", "65"], "--prefill-chunk 65 exceeds the cache"),
        (["--prefill-chunk", "0"], "--prefill-chunk must be at least 1"),
        (["--print-after", "warp-drive"], "unknown pass 'warp-drive'; known: kv-fusion"),
        (["-O0", "--print-after", "kv-fusion"], "not in this pipeline (no passes)"),
    ],
)
def test_bad_compile_flags(flags, fragment, tmp_path, capsys):
    out = tmp_path / "x.arc"
    argv = ["compile", "tiny-llama", "--torch-mode", "eager", "-o", str(out), *flags]
    _assert_one_line(*_main(argv, capsys), fragment)
    assert not out.exists()


def test_dump_ir_onto_a_file(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("x")
    argv = ["compile", "tiny-llama", "--torch-mode", "eager", "-o", str(tmp_path / "x.arc")]
    rc, err = _main([*argv, "--dump-ir", str(taken)], capsys)
    _assert_one_line(rc, err, "exists and is not a directory")
    rc, err = _main([*argv, "--dump-ir", str(taken / "sub")], capsys)
    _assert_one_line(rc, err, "cannot write")


def test_print_after_and_dump_ir_work(tmp_path, capsys):
    out, dump = tmp_path / "x.arc", tmp_path / "dump"
    argv = ["compile", "tiny-llama", "--torch-mode", "eager", "--max-seq-len", "16"]
    rc, err = _main(
        [*argv, "-o", str(out), "--print-after", "kv-fusion", "--dump-ir", str(dump)], capsys
    )
    assert rc == 0, err
    assert "// ---- IR after kv-fusion" in err and out.is_file()
    assert sorted(p.name for p in dump.iterdir())[:2] == ["00-input.ir", "00-input.json"]


def test_usage_errors_are_one_line(capsys):
    _assert_one_line(*_main(["compile"], capsys), "the following arguments are required")
    _assert_one_line(
        *_main(["run", "x.arc", "--prompt", "hi", "--top-k", "many"], capsys), "--top-k"
    )


def test_threads_above_the_cap_are_refused_everywhere(capsys, monkeypatch):
    """--threads of run, profile and bench: 1..4x the usable CPUs (100,000 threads crashed
    torch's OpenMP with a segfault, 20,000 TVM's pool with an abort); the cap follows the
    CPUs this process may use, and the largest value passes the check."""
    import arc.cpu

    monkeypatch.setattr(arc.cpu.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert arc.cpu.max_threads() == 12
    arc.cpu.check_threads(12)
    for argv in (
        ["profile", "tiny-llama", "--threads", "13"],
        ["bench", "--baselines", "hf", "--threads", "13"],
    ):
        rc, err = _main(argv, capsys)
        _assert_one_line(rc, err, "--threads 13 is more than arc runs here (1..12: 4x the 3 CPUs")
