"""The tvm target's sampling kernel (targets/tvm_sample.py) against the runtime's torch path,
on one engine in one process: plain and speculative sampled decoding, the kernel on and off
(`steps.sample_rows = None`: torch's `dists`, and Token Recycling's successors from
`logits_stats`), arms interleaved prompt by prompt, the same seeds. Both arms are the same
engine and process, so the ratio is what the kernel buys; sampled texts differ between arms,
so their lengths do too (each arm's tok/s is over all its tokens).

    python benchmarks/sample_kernel.py ENGINE.arc --temperature 0.7 [--top-p 0.9] [--top-k 40]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")

import torch  # noqa: E402

from arc.runtime.load import load_engine  # noqa: E402
from arc.runtime.sampling import SamplingParams  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "engine", help="a tvm engine built with sample_rows (speculative for both modes)"
    )
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    a = ap.parse_args()
    eng = load_engine(a.engine)
    gen = eng.generator
    kernel = gen.steps.sample_rows
    if kernel is None:
        raise SystemExit("the engine has no sample_rows kernel (tvm target, built 2026-12-06 on)")
    modes = ("plain", "spec") if gen.speculative else ("plain",)
    arms = [(mode, on) for mode in modes for on in (True, False)]
    tot = {arm: [0.0, 0] for arm in arms}  # decode ms, tokens
    prompts = json.loads((HERE / "prompts.json").read_text())
    with torch.inference_mode():
        gen.generate(eng.prompt_ids("Say hello."), max_new_tokens=16)  # first calls
        for r in range(a.reps):
            for i, pr in enumerate(prompts):
                ids = eng.prompt_ids(pr["prompt"])
                for mode, on in arms if (r + i) % 2 == 0 else arms[::-1]:
                    gen.steps.sample_rows = kernel if on else None
                    gen.forget()  # cold drafter tables: each run starts alike
                    params = SamplingParams(a.temperature, a.top_k, a.top_p, seed=1000 * i + r)
                    res = gen.generate(
                        ids,
                        max_new_tokens=a.new_tokens,
                        sampling=params,
                        speculative=mode == "spec",
                    )
                    tot[mode, on][0] += res.decode_ms
                    tot[mode, on][1] += max(len(res.token_ids) - 1, 1)
    print(
        f"temperature {a.temperature}, top-k {a.top_k}, top-p {a.top_p}, {len(prompts)} x {a.reps}"
    )
    for (mode, on), (ms, n) in tot.items():
        print(f"{mode:5s} {'kernel' if on else 'torch ':6s} {1e3 * n / ms:7.1f} tok/s ({n} tokens)")
    for mode in modes:
        (ms_on, n_on), (ms_off, n_off) = tot[mode, True], tot[mode, False]
        print(f"{mode}: kernel / torch = {(n_on / ms_on) / (n_off / ms_off):.3f}x")


if __name__ == "__main__":
    main()
