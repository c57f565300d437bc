"""The tvm target's 4-bit panel kernel (targets/tvm_kernels.panel_gemv) alone, per tile plan:
a decode step's projections (QKV, O, gate/up, down of every layer, each layer's weights
distinct so they stream from memory as in a real step) for T = 1, 2, 4, 8 tokens.

    python benchmarks/panel_kernel.py [--plans avx2,avx2-native] [--tokens 1,2,4,8] [--reps 9]

Plans: the names in tvm_kernels.PLANS (what `tile_plan` picks per CPU, or ARC_TVM_TILES); a
name with `+zx` widens the codes with LLVM's vpmovzxbd instead of the in-lane shuffles that
AVX2 plans use (tvm_kernels.INLANE_PLANS), to compare the two; `+lut` turns them into floats
by table lookup (AVX-512 VBMI); `q8` is the integer kernel (int8 activations by VNNI,
targets/tvm_vnni.py, what `weight-format{act=q8}` builds); `q8+amx` the same with calls of
12 or more tokens (tvm_amx_q8.MIN_TOKENS) on AMX int8 tiles (targets/tvm_amx_q8.py; needs a
CPU with AMX-INT8).
Calls of all plans are interleaved rep by rep in one process; the figures are medians in ms of
one step's projections (SmolLM2-135M's shapes by default, Q4_1 blocks with fp16 scales as a
GGUF holds them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def main() -> None:
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))  # as the engine's load
    import tvm

    from arc.targets import tvm_amx, tvm_amx_q8, tvm_kernels, tvm_vnni

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plans", default="avx2,avx2-native")
    ap.add_argument("--tokens", default="1,2,4,8")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--inter", type=int, default=1536)
    ap.add_argument("--qkv", type=int, default=960)
    ap.add_argument("--reps", type=int, default=9)
    a = ap.parse_args()
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    spec = {"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count() or 1}
    if any(name.endswith("+amx") for name in a.plans.split(",")):
        why = tvm_amx.request()
        if why:
            raise SystemExit(f"--plans q8+amx: {why}")
        spec["mattr"] = tvm_vnni.MATTR + tvm_amx_q8.MATTR
    target = tvm.target.Target(spec)
    shapes = [(a.qkv, a.hidden), (a.hidden, a.hidden), (2 * a.inter, a.hidden), (a.hidden, a.inter)]
    g, rng = 32, np.random.default_rng(0)
    plans = a.plans.split(",")
    fns = {}
    for name in plans:
        base, _, extra = name.partition("+")  # +zx: widen codes with vpmovzxbd; +lut: vpermb
        known = extra in ("", "amx") if base == "q8" else extra in ("", "zx", "lut")
        if (base not in tvm_kernels.PLANS and base != "q8") or not known:
            raise SystemExit(
                f"--plans: {name!r} is not q8, q8+amx, PLAN, PLAN+zx or PLAN+lut "
                f"({', '.join(tvm_kernels.PLANS)})"
            )
        inlane, lut = (False if extra == "zx" else None), extra == "lut"
        for n, k in shapes:
            if base == "q8":  # int8 activations x codes by VNNI (targets/tvm_vnni.py)
                f = tvm_vnni.panel_gemv_q8("affine4", n, k, g, "float16", amx=extra == "amx")
            else:
                f = tvm_kernels.panel_gemv(
                    "affine4", n, k, g, "float16", plan=base, lut=lut, inlane=inlane
                )
            mod = tvm.IRModule({"main": f.with_attr("global_symbol", "main")})
            fns[name, n, k] = tvm.compile(mod, target=target)["main"]
    weights = []  # [layer][shape] -> panel-layout components
    for _ in range(a.layers):
        layer = []
        for n, k in shapes:
            specs = tvm_kernels.panel_specs("affine4", n, k, g, "float16")
            comps = []
            for shape, dtype in specs.values():
                if dtype == "uint8":
                    comps.append(rng.integers(0, 256, shape).astype("uint8"))
                else:
                    comps.append((rng.standard_normal(shape) * 0.01).astype(dtype))
            layer.append([tvm.runtime.tensor(c) for c in comps])
        weights.append(layer)
    tokens = [int(t) for t in a.tokens.split(",")]
    xs = {
        (t, k): tvm.runtime.tensor(rng.standard_normal((t, k)).astype("float32"))
        for t in tokens
        for _, k in shapes
    }
    ys = {
        (t, n): tvm.runtime.tensor(np.zeros((t, n), "float32")) for t in tokens for n, _ in shapes
    }

    def step(name: str, t: int) -> float:
        start = time.perf_counter()
        for layer in weights:
            for (n, k), comps in zip(shapes, layer, strict=True):
                fns[name, n, k](xs[t, k], *comps, ys[t, n])
        return (time.perf_counter() - start) * 1e3

    times = {(name, t): [] for name in plans for t in tokens}
    for name in plans:
        for t in tokens:
            step(name, t)
    for _ in range(a.reps):
        for t in tokens:
            for name in plans:
                times[name, t].append(step(name, t))
    print(f"{a.layers} layers' projections, ms (median of {a.reps}); x = over T=1 of the plan")
    print("plan".ljust(20) + "".join(f"T={t}".rjust(16) for t in tokens))
    for name in plans:
        one = statistics.median(times[name, tokens[0]])
        cells = []
        for t in tokens:
            m = statistics.median(times[name, t])
            cells.append(f"{m:8.2f} ({m / one:4.2f}x)")
        print(name.ljust(20) + "".join(c.rjust(16) for c in cells))


if __name__ == "__main__":
    main()
