"""sparse-attention{kind=block-topk} (Quest) against dense attention at a long context: decode
ms per step with `--context` tokens of Python's pydoc_data.topics already in the cache.

    python benchmarks/block_topk.py [--model smollm2-135m] [--context 4000] [--steps 64] \
        [--spec 'block=16,topk=32'] [--spec 'block=16,topk=64'] [--torch-mode eager]

One process, one traced Module, lowered as is (dense) and after each block-topk pipeline,
each with a cache of context + steps slots. Each is prefilled with the same context (in chunks
of 256, as `arc run` prefills a long prompt), then decodes the corpus's next tokens (teacher
forcing: every variant attends over the same text); the steps are interleaved, one step of
each variant in turn, so that load from other jobs on a shared machine falls on all alike.
Prints the median ms per step and tok/s. Perplexity at long context is `arc eval
--long-context N` (arc/long_context.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _steps(module, weights, mode: str):
    from arc.lowering import lower
    from arc.runtime.steps import Steps

    fns, kv = lower(module, weights, gemv=mode == "jit")
    if mode == "jit":
        fns = {k: torch.compile(f, dynamic=True) for k, f in fns.items()}
    return Steps(fns, max_seq_len=module.kv.max_seq_len, reset=kv.reset)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=int, default=4000)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--spec", action="append", help="block-topk options (repeatable)")
    p.add_argument("--torch-mode", default="eager", choices=("eager", "jit"))
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from arc.compiler import trace_model
    from arc.evaluate import corpus_ids
    from arc.pipeline import PassManager

    loaded, module = trace_model(a.model, a.context + a.steps + 1)
    ids = corpus_ids(loaded.tokenizer, a.context + a.steps + 1)
    variants = {"dense": module}
    for opts in a.spec or ["block=16,topk=32"]:
        spec = f"sparse-attention{{kind=block-topk,{opts}}}"
        variants[opts] = PassManager(spec).run(module)[0]
    steps = {name: _steps(m, loaded.weights, a.torch_mode) for name, m in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    with torch.inference_mode():
        t0 = time.perf_counter()
        for s in steps.values():
            s.reset()
            for start in range(0, a.context, 256):
                s.prefill(ids[start : min(start + 256, a.context)], start)
        print(f"prefilled {a.context} tokens x {len(steps)} in {time.perf_counter() - t0:.0f} s")
        for i in range(a.steps):
            pos = a.context + i
            for name, s in steps.items():
                t = time.perf_counter()
                s.decode(ids[pos], pos)
                times[name].append(time.perf_counter() - t)
    print(
        f"{a.model}, --torch-mode {a.torch_mode}, {a.threads} threads, decode at context "
        f"{a.context}..{a.context + a.steps - 1}, {a.steps} steps each, interleaved:"
    )
    base = statistics.median(times["dense"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"  {name:<20} {1e3 * med:8.1f} ms/step  {1 / med:6.1f} tok/s  "
            f"({base / med:.2f}x dense)"
        )


if __name__ == "__main__":
    main()
