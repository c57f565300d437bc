"""Targets side by side on this machine: decode tok/s, prefill ms for a 200-token prompt, build
s and engine size, for the same model and pipeline (-O1, fp32 compute) lowered per target.

    python benchmarks/targets_speed.py [--model smollm2-135m] [--new-tokens 128] [--rounds 3]
                                       [--targets torch-eager,torch-aot,onnx,tvm]

Each engine is compiled once into --engines (reused when present; its recorded build time is
printed). Every measurement runs in its own process (threads and allocators of one backend
must not slow another), rounds are interleaved so machine noise hits all rows alike, and the
median is reported. Decode tok/s is the runtime's own decode timer (prefill excluded) over
--new-tokens greedy tokens with EOS ignored; prefill ms is the median of three prefills of the
same 200-token prompt. `same ids` compares each row's tokens with torch AOT's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import engine_cache  # noqa: E402

SYSTEMS = {  # row -> arc compile flags
    "torch-eager": ["--target", "torch", "--torch-mode", "eager"],
    "torch-eager-f32": [
        *("--target", "torch", "--torch-mode", "eager"),
        *("--passes", "kv-fusion,weight-format{mode=f32}"),
    ],
    "torch-aot": ["--target", "torch", "--torch-mode", "aot"],
    # the same fp32 weights every other row computes with (-O1 keeps a GGUF's 4-bit blocks)
    "torch-aot-f32": ["--target", "torch", "--passes", "kv-fusion,weight-format{mode=f32}"],
    "onnx": ["--target", "onnx"],
    "tvm": ["--target", "tvm"],
}


def prompt_200(tok) -> list[int]:
    """200 token ids of the shipped prompts' text (a realistic prompt, not random ids)."""
    text = " ".join(p["prompt"] for p in json.loads((HERE / "prompts.json").read_text()))
    ids = tok.encode(text, add_special_tokens=False)
    while len(ids) < 200:
        ids = ids + ids
    return ids[:200]


def measure(engine: str, new_tokens: int, threads: int) -> dict:
    """In a fresh process: load, 3 prefills of 200 tokens, one greedy decode."""
    import torch

    from arc.runtime.load import load_engine

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    eng = load_engine(engine)
    load_s = time.perf_counter() - t0
    gen, ids = eng.generator, prompt_200(eng.tokenizer)
    prefill = []
    with torch.inference_mode():
        for _ in range(3):
            r = gen.generate(ids, max_new_tokens=1, ignore_eos=True)
            prefill.append(r.prefill_ms)
        r = gen.generate(ids[:40], max_new_tokens=new_tokens, ignore_eos=True)
    return {
        "tok_s": r.tokens_per_s,
        "prefill_ms": statistics.median(prefill),
        "load_s": load_s,
        "ids": r.token_ids,
    }


def compile_engine(name: str, model: str, out: Path) -> dict:
    from arc.engine import read_manifest

    if not engine_cache.fresh(out):  # absent, or built by other code
        cmd = [sys.executable, "-m", "arc.cli", "compile", model, *SYSTEMS[name], "-O1"]
        done = subprocess.run(
            [*cmd, "--max-seq-len", "1024", "-o", str(out), "--json"],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            return {"error": done.stderr.strip().splitlines()[-1][:200]}
        engine_cache.mark(out)
    m = read_manifest(out)
    return {"build_s": m["build_s"], "compile_s": m["compile_s"], "mb": out.stat().st_size / 1e6}


def run_child(engine: Path, new_tokens: int, threads: int) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--measure", str(engine), "--new-tokens", str(new_tokens)]
        + ["--threads", str(threads)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--targets", default=",".join(SYSTEMS))
    ap.add_argument("--engines", default=str(HERE / ".engines"))
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure, a.new_tokens, a.threads)))
        return
    names = a.targets.split(",")
    engines = Path(a.engines)
    engines.mkdir(parents=True, exist_ok=True)
    built, runs = {}, {n: [] for n in names}
    for n in names:
        built[n] = compile_engine(n, a.model, engines / f"{a.model}-{n}-O1.arc")
        print(f"{n}: {built[n]}", file=sys.stderr)
    for r in range(a.rounds):
        for n in names:
            if "error" not in built[n]:
                runs[n].append(
                    run_child(engines / f"{a.model}-{n}-O1.arc", a.new_tokens, a.threads)
                )
                print(f"round {r + 1} {n}: {_brief(runs[n][-1])}", file=sys.stderr)
    print(table(names, built, runs, a))


def _brief(x: dict) -> str:
    return x.get("error") or f"{x['tok_s']:.1f} tok/s, prefill {x['prefill_ms']:.0f} ms"


def table(names, built, runs, a) -> str:
    ref = next((x["ids"] for n in ("torch-aot", "torch-eager") for x in runs.get(n, [])), None)
    lines = [
        f"{a.model}, -O1, {a.threads} threads, {a.new_tokens} new tokens, median of {a.rounds}",
        "",
        "| target | decode tok/s | x torch eager | prefill 200 tok (ms) | build s | engine MB "
        "| load s | same ids as torch AOT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ok = {n: [x for x in runs[n] if "error" not in x] for n in names}
    med = {n: statistics.median(x["tok_s"] for x in ok[n]) for n in names if ok[n]}
    for n in names:
        if not ok[n]:
            why = built[n].get("error") or (runs[n][0].get("error") if runs[n] else "not run")
            lines.append(f"| {n} | failed: {why} | | | | | | |")
            continue
        base = med.get("torch-eager")
        ratio = f"{med[n] / base:.2f}x" if base else "-"
        pre = statistics.median(x["prefill_ms"] for x in ok[n])
        load = statistics.median(x["load_s"] for x in ok[n])
        same = "-" if ref is None else ("yes" if all(x["ids"] == ref for x in ok[n]) else "NO")
        b = built[n]
        lines.append(
            f"| {n} | {med[n]:.1f} | {ratio} | {pre:.0f} | {b['build_s']:.1f} | {b['mb']:.0f} "
            f"| {load:.1f} | {same} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
