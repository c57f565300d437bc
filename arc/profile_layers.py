"""`arc profile --per-layer`: where a decode step's time goes, by IR op kind and by layer.

A compiled engine fuses the IR's nodes into a few kernels and gives no per-node times, so this
runs the final pipeline's Module through the eager lowering (arc/lowering.py, the reference the
compiled code must equal) and times every node of the decode graph with a wall clock, after a
prefill of the first prompt, over `steps` decode steps (the first dropped as warm-up). Absolute
times are the eager ones, larger than the engine's; the shares show what dominates a step (the
projections' weight reads, attention over the cache, the LM head).
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from typing import Any

LAYER = re.compile(r"^layers\.(\d+)\.")


def layer_of(nodes) -> dict[int, str]:
    """Node id -> "embed", "layer N" or "head": a node belongs to the layer of the last layer
    weight or `layer` attr seen at or before it; nodes before the first layer are "embed", and
    the final norm and LM head after the last are "head"."""
    out, current, seen_layer = {}, "embed", False
    for n in nodes:
        idx = n.attr("layer")
        for w in n.weights():
            m = LAYER.match(w)
            if m:
                idx = int(m.group(1))
            elif seen_layer and not w.startswith("rope"):
                current = "head"
        if idx is not None:
            current, seen_layer = f"layer {idx}", True
        out[n.id] = current
    return out


def per_layer(model: str, spec: str, prompt_ids: list[int], max_seq_len: int, steps: int = 9):
    """{"by_op": {op: ms per step}, "by_layer": {...}, "step_ms": total} for the eager decode."""
    import torch

    from arc.compiler import trace_model
    from arc.lowering import KERNELS, lower, materialize
    from arc.ops import Op
    from arc.pipeline import PassContext, PassManager

    loaded, module = trace_model(model, max_seq_len)
    ctx = PassContext("cpu", "torch", weights=loaded.weights, tokenizer=loaded.tokenizer)
    module, _ = PassManager(spec).run(module, ctx)
    weights = materialize(module, loaded.weights, loaded.blocks)
    fns, kv = lower(module, weights)
    decode = fns["decode"]
    where = layer_of(decode.graph.nodes)
    by_op: dict[str, float] = defaultdict(float)
    by_layer: dict[str, float] = defaultdict(float)
    positions = torch.arange(max_seq_len)
    ids = prompt_ids[: max_seq_len - steps - 1]
    with torch.inference_mode():
        kv.reset()
        logits = fns["prefill"](torch.tensor([ids]), positions[: len(ids)], positions[: len(ids)])
        token, pos = int(logits[0, -1].argmax()), len(ids)
        for step in range(steps):
            feeds = iter((torch.tensor([[token]]), positions[pos : pos + 1], positions[: pos + 1]))
            env: dict[int, Any] = {}
            for n in decode.graph.nodes:
                if n.op is Op.INPUT:
                    env[n.id] = next(feeds)
                    continue
                t = time.perf_counter()
                env[n.id] = KERNELS[n.op](decode, n, *[env[i] for i in n.inputs])
                ms = (time.perf_counter() - t) * 1e3
                if step:  # the first step warms up
                    by_op[n.op.value] += ms
                    by_layer[where[n.id]] += ms
            token, pos = int(env[decode.graph.outputs[0]][0, -1].argmax()), pos + 1
    k = steps - 1
    total = sum(by_op.values()) / k
    return {
        "method": "eager lowering, wall time per IR node of the decode graph",
        "steps": k,
        "step_ms": total,
        "by_op": {op: ms / k for op, ms in sorted(by_op.items(), key=lambda x: -x[1])},
        "by_layer": {name: ms / k for name, ms in by_layer.items()},
    }
