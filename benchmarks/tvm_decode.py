"""Decode speed and build time of the tvm target against the torch target (AOTInductor).

    python benchmarks/tvm_decode.py [--model smollm2-135m] [--rounds 5] [--steps 48]

Builds one engine per target (-O1, timed; both run a GGUF's Q4_1/Q8_0 blocks as stored),
then measures decode steps (one token after a
`--context`-token prefill) in rounds that alternate the targets, so both see the same load on
a shared machine; prints the median tok/s per target, each round's figures, and the load
average before and after (a load above the core count means another process competed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build(model: str, target: str, out: Path, options: dict) -> dict:
    from arc.compiler import CompileOptions, compile_model
    from arc.presets import preset_spec

    opts = CompileOptions(target=target, spec=preset_spec("O1"), target_options=options)
    return compile_model(model, out, opts)


def decode_rate(steps, context: int, n: int) -> tuple[float, float]:
    """(decode tok/s of `n` steps, prefill tok/s of the `context`-token prompt before them)."""
    ids = [(97 * i + 13) % 5000 + 100 for i in range(context + n)]
    steps.reset()
    with torch.inference_mode():
        t0 = time.perf_counter()
        steps.prefill(ids[:context], 0)
        prefill = context / (time.perf_counter() - t0)
        steps.decode(ids[context], context)  # warm
        t0 = time.perf_counter()
        for i in range(1, n):
            steps.decode(ids[context + i], context + i)
    return (n - 1) / (time.perf_counter() - t0), prefill


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--context", type=int, default=150)
    p.add_argument("--targets", default="tvm,torch")
    a = p.parse_args()
    from arc.runtime.load import load_engine

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    targets = a.targets.split(",")
    engines = {}
    with tempfile.TemporaryDirectory() as tmp:
        for t in targets:
            options = {"mode": "aot"} if t == "torch" else {}
            s = build(a.model, t, Path(tmp) / f"{t}.arc", options)
            print(f"{t:6s} build {s['build_s']:6.1f} s (compile in all {s['compile_s']:.1f} s)")
            engines[t] = load_engine(Path(tmp) / f"{t}.arc").generator.steps
        rates: dict[str, list[tuple[float, float]]] = {t: [] for t in targets}
        for r in range(a.rounds):
            for t in targets:
                rates[t].append(decode_rate(engines[t], a.context, a.steps))
            print(f"round {r}: " + "  ".join(f"{t} {rates[t][-1][0]:.1f}" for t in targets))
    for t in targets:
        decode = statistics.median(d for d, _ in rates[t])
        prefill = statistics.median(p for _, p in rates[t])
        print(f"{t:6s} decode median {decode:.1f} tok/s  (prefill {prefill:.0f} tok/s)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
