"""What a speculative verify costs: one forward over a T-node token tree, as a ratio to one
decode step, at context 200 and 1000 (the numbers that decide how big a tree can pay).

    python benchmarks/verify_cost.py [--model smollm2-135m] [--sizes 2,4,8,16,32] [--reps 15]
        [--format keep|f32|int8|int4|bf16]   # weight-format mode (keep: the GGUF's blocks)
    python benchmarks/verify_cost.py --engine model.arc [--threads 2]   # any target's engine

With --engine, a built speculative engine (`arc compile ... -O2 --target tvm`, say) is loaded
as `arc run` loads it and its own verify functions are timed (the sizes its tree ladder has),
the same way: a chain tree of T nodes after a prefill of the context.

Each verify size is its own `verify` function (spec-tree{budget=T-1}), compiled with the
torch target's CPU kernels (arc.lowering with gemv=True) by Inductor via torch.compile in this
process, the same code generator the AOT engine's packages come from. T=1 is the decode step.
Times are medians over --reps calls after warm-up; the tree is a chain (the mask's shape does
not change the work).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from arc.compiler import trace_model
from arc.lowering import lower, materialize
from arc.pipeline import PassManager
from arc.runtime.steps import Steps
from arc.runtime.tree import Tree


def _median_ms(fn, reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sizes", default="2,4,8,16,32")
    ap.add_argument("--contexts", default="200,1000")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--format", default="keep", help="weight-format mode")
    ap.add_argument("--engine", help="time this engine's decode and verify functions")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    contexts = [int(c) for c in a.contexts.split(",")]
    if a.engine:
        _engine(a, contexts)
        return
    # every verify size and slot count is its own graph of the same forward(): allow them all
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    sizes = [int(s) for s in a.sizes.split(",")]
    loaded, traced = trace_model(a.model, max(contexts) + max(sizes) + 64)
    rows = {c: {} for c in contexts}
    for t in sizes:
        spec = f"kv-fusion,weight-format{{mode={a.format}}},"
        spec += f"spec-tree{{budget={t - 1},depth={min(5, t - 1)}}}"
        module, _ = PassManager(spec).run(traced)
        weights = materialize(module, loaded.weights, loaded.blocks)
        fns, kv = lower(module, weights, gemv=True)
        calls = {k: torch.compile(f, dynamic=False) for k, f in fns.items() if k != "prefill"}
        steps = Steps(
            {**calls, "prefill": fns["prefill"]},
            max_seq_len=module.kv.max_seq_len,
            reset=kv.reset,
            move=kv.move,
        )
        tree = Tree(5)
        for i in range(t - 1):
            tree.add(i, 10 + i)
        with torch.inference_mode():
            for c in contexts:
                steps.reset()
                steps.prefill([100 + i % 1000 for i in range(c)], 0)
                ins = tree.inputs(c, t)
                if 1 not in rows[c]:
                    rows[c][1] = _median_ms(lambda s=steps, c=c: s.decode(5, c), a.reps)
                rows[c][t] = _median_ms(lambda s=steps, i=ins: s.verify(*i), a.reps)
        print(f"T={t}: " + ", ".join(f"ctx {c}: {rows[c][t]:.1f} ms" for c in contexts))
    print(f"\n{a.model}, weights {a.format}, {a.threads} threads; verify time / decode step time")
    _table(rows, contexts, sizes)


def _table(rows: dict, contexts: list[int], sizes: list[int]) -> None:
    print(f"{'T':>4}" + "".join(f"{'ctx ' + str(c):>18}" for c in contexts))
    for t in [1, *sizes]:
        cells = [f"{rows[c][t]:7.1f} ms {rows[c][t] / rows[c][1]:5.2f}x" for c in contexts]
        print(f"{t:>4}" + "".join(f"{x:>18}" for x in cells))


def _engine(a, contexts: list[int]) -> None:
    """Time a built engine's decode and verify_T functions (T: the engine's tree ladder)."""
    import os

    os.environ.setdefault("TVM_NUM_THREADS", str(a.threads))  # the tvm target's thread pool
    from arc.runtime.load import load_engine

    engine = load_engine(a.engine)
    steps = engine.generator.steps
    sizes = list(steps.verify_sizes)
    if not sizes:
        raise SystemExit(f"{a.engine}: no verify functions (compile it with -O2 or spec-tree)")
    limit = steps.max_seq_len - max(sizes) - 1
    contexts = [c for c in contexts if c <= limit] or [limit]
    rows = {c: {} for c in contexts}
    with torch.inference_mode():
        for c in contexts:
            steps.reset()
            steps.prefill([100 + i % 1000 for i in range(c)], 0)
            rows[c][1] = _median_ms(lambda c=c: steps.decode(5, c), a.reps)
            for t in sizes:
                tree = Tree(5)
                for i in range(t - 1):
                    tree.add(i, 10 + i)
                ins = tree.inputs(c, t)
                rows[c][t] = _median_ms(lambda i=ins: steps.verify(*i), a.reps)
    target = engine.manifest["target"]["name"]
    print(f"{a.engine} (target {target}), {a.threads} threads; verify time / decode step time")
    _table(rows, contexts, sizes)


if __name__ == "__main__":
    main()
