"""sparse-attention{kind=sink-window} (StreamingLLM) against dense attention with a cache big
enough: decode tok/s and resident memory per window of generated tokens, and perplexity.

    python benchmarks/sink_window.py [--model smollm2-135m] [--new-tokens 2048] \
        [--max-seq-len 256] [--sink 4] [--torch-mode eager] [--ppl-tokens 1024]

Builds two engines with `arc compile` (both `kv-fusion`; one adds
`sparse-attention{sink=S}` with `--max-seq-len 256`, a ring of 4 sinks + 252 recent tokens;
the other has a dense cache of new tokens + 256 slots), then, each in its own process:
- generation: one chat prompt, greedy, `--ignore-eos`, through the engine's own Generator
  (the loop `arc run` uses); each decode step is timed, and the process's resident set size
  (VmRSS) is read at the end of every `--every` tokens;
- streaming perplexity: `--ppl-tokens` of Python's pydoc_data.topics fed one token at a time
  through `decode` (so the ring wraps: text longer than the ring), NLL of each next token;
and `arc eval` of the sink-window pipeline against no passes on text that fits both caches
(`--eval-tokens` <= the ring), which must show no loss there.

Default `--torch-mode eager`: an AOT build of two smollm2 engines takes minutes on a 2-core
machine; the comparison is side by side in one mode.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Write a long story about a lighthouse keeper and the sea, chapter by chapter."


def _arc(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "arc.cli", *args], capture_output=True, text=True, check=False
    )
    if done.returncode:
        sys.exit(f"arc {' '.join(args[:2])} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_generate(engine: str, new_tokens: int, every: int) -> dict:
    import torch

    from arc.runtime.load import load_engine

    eng = load_engine(engine)
    steps = eng.generator.steps
    stamps: list[float] = []  # the start of the first decode step, then the end of each
    rss: list[float] = []  # VmRSS after each decode step
    decode = steps.decode

    def timed(token: int, pos: int):
        if not stamps:
            stamps.append(time.perf_counter())
        out = decode(token, pos)
        stamps.append(time.perf_counter())
        rss.append(_rss_mb())
        return out

    steps.decode = timed
    ids = eng.prompt_ids(PROMPT)
    with torch.inference_mode():
        r = eng.generator.generate(ids, max_new_tokens=new_tokens, ignore_eos=True)
    n, windows = len(rss), []
    for i in range(0, n, every):
        j = min(i + every, n)  # decode steps i..j-1; token 1 came from prefill
        tok_s = (j - i) / (stamps[j] - stamps[i])
        windows.append({"tokens": j + 1, "steps": j - i, "tok_s": tok_s, "rss_mb": rss[j - 1]})
    return {
        "generated": len(r.token_ids),
        "stop_reason": r.stop_reason,
        "tokens_per_s": r.tokens_per_s,
        "prompt_tokens": len(ids),
        "windows": windows,
        "peak_rss_mb": _peak_mb(),
    }


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_ppl(engine: str, tokens: int) -> dict:
    """Perplexity of the first `tokens` of the corpus, fed one token at a time to decode."""
    import torch
    import torch.nn.functional as F

    from arc.evaluate import corpus_ids
    from arc.runtime.load import load_engine

    eng = load_engine(engine)
    steps = eng.generator.steps
    ids = corpus_ids(eng.tokenizer, tokens)
    nll = 0.0
    with torch.inference_mode():
        steps.reset()
        for pos, tok in enumerate(ids[:-1]):
            logits = steps.decode(tok, pos)
            nll += float(F.cross_entropy(logits[None].double(), torch.tensor([ids[pos + 1]])))
    return {"tokens": len(ids), "ppl": math.exp(nll / (len(ids) - 1))}


def _child(kind: str, engine: Path, a: argparse.Namespace) -> dict:
    args = [sys.executable, __file__, "--child", kind, "--engine", str(engine)]
    args += ["--new-tokens", str(a.new_tokens), "--every", str(a.every)]
    args += ["--ppl-tokens", str(a.ppl_tokens)]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{kind} on {engine.name} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--new-tokens", type=int, default=2048)
    p.add_argument("--every", type=int, default=256, help="tokens per reported window")
    p.add_argument("--max-seq-len", type=int, default=256, help="the ring's cache slots")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--torch-mode", default="eager", choices=("eager", "jit", "aot"))
    p.add_argument("--ppl-tokens", type=int, default=1024, help="streamed text (0: skip)")
    p.add_argument("--eval-tokens", type=int, default=256, help="arc eval text (0: skip)")
    p.add_argument("--child", choices=("generate", "ppl"), help=argparse.SUPPRESS)
    p.add_argument("--engine", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child == "generate":
        print(json.dumps(child_generate(a.engine, a.new_tokens, a.every)))
        return
    if a.child == "ppl":
        print(json.dumps(child_ppl(a.engine, a.ppl_tokens)))
        return
    spec = f"kv-fusion,sparse-attention{{sink={a.sink}}}"
    dense_len = a.new_tokens + 256
    with tempfile.TemporaryDirectory(prefix="arc-sink-") as tmp:
        ring, dense = Path(tmp) / "ring.arc", Path(tmp) / "dense.arc"
        mode = ("--torch-mode", a.torch_mode)
        _arc(
            "compile",
            a.model,
            "--passes",
            spec,
            "--max-seq-len",
            str(a.max_seq_len),
            *mode,
            "-o",
            str(ring),
        )
        _arc(
            "compile",
            a.model,
            "--passes",
            "kv-fusion",
            "--max-seq-len",
            str(dense_len),
            *mode,
            "-o",
            str(dense),
        )
        rows = {
            f"sink-window ({a.max_seq_len} slots)": ring,
            f"dense ({dense_len} slots)": dense,
        }
        gens = {name: _child("generate", path, a) for name, path in rows.items()}
        ppls = {name: _child("ppl", path, a) for name, path in rows.items()} if a.ppl_tokens else {}
    _print_generation(a, gens)
    if ppls:
        print(f"\nstreamed perplexity, first {a.ppl_tokens} tokens of pydoc_data.topics, one token")
        print("per decode step (the ring wraps; the dense cache holds all of it):")
        for name, r in ppls.items():
            print(f"  {name:<28} ppl {r['ppl']:.4f}")
        base, cand = list(ppls.values())[1]["ppl"], list(ppls.values())[0]["ppl"]
        print(f"  sink-window vs dense: {100 * (cand - base) / base:+.2f}%")
    if a.eval_tokens:
        spec_eval = f"sparse-attention{{sink={a.sink},window={a.max_seq_len - a.sink}}}"
        out = _arc(
            "eval", a.model, "--passes", spec_eval, "--ppl-tokens", str(a.eval_tokens), "--json"
        )
        r = json.loads(out)
        pp, g = r["perplexity"], r["greedy"]
        print(f"\narc eval --passes '{spec_eval}' --ppl-tokens {a.eval_tokens} (text fits both):")
        print(
            f"  perplexity reference {pp['reference']:.4f}, sink-window {pp['passes']:.4f} "
            f"({pp['delta_pct']:+.4f}%); greedy agreement {g['agreement']:.3f} over "
            f"{g['prompts']} prompts x {g['max_new_tokens']} tokens"
        )


def _print_generation(a: argparse.Namespace, gens: dict) -> None:
    print(
        f"{a.model}, greedy, --ignore-eos, {a.new_tokens} new tokens, --torch-mode "
        f"{a.torch_mode}; tok/s and RSS per {a.every}-token window:"
    )
    names = list(gens)
    print(f"{'tokens':>7}  " + "  ".join(f"{n:>34}" for n in names))
    count = max(len(g["windows"]) for g in gens.values())
    for i in range(count):
        cells = []
        for n in names:
            w = gens[n]["windows"]
            cells.append(
                f"{w[i]['tok_s']:>12.1f} tok/s {w[i]['rss_mb']:>9.0f} MB"
                if i < len(w)
                else f"{'-':>34}"
            )
        end = max(g["windows"][i]["tokens"] for g in gens.values() if i < len(g["windows"]))
        print(f"{end:>7}  " + "  ".join(f"{c:>34}" for c in cells))
    for n in names:
        g = gens[n]
        print(
            f"  {n}: {g['generated']} tokens (prompt {g['prompt_tokens']}), stop "
            f"{g['stop_reason']}, {g['tokens_per_s']:.1f} tok/s overall, peak RSS "
            f"{g['peak_rss_mb']:.0f} MB"
        )


if __name__ == "__main__":
    main()
