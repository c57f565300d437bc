"""-O0..-O3 as pipeline specs: the one place that says what each level runs (MLC-LLM style).

Every level here is lossless: greedy output is identical to -O0 and to Hugging Face. Lossy
passes are never in a preset; a user names them with --passes and gets their measured cost.
"""

from __future__ import annotations

from arc.errors import ArcError

PRESETS: dict[str, list[str]] = {
    # -O0: the model as traced; the reference every other level is checked against.
    "O0": [],
    # -O1: lossless graph rewrites that cut kernel launches and weight reads per step.
    "O1": [
        "kv-fusion",  # one QKV projection and one gate/up projection per layer
        "weight-format",  # a quantized checkpoint's blocks kept as stored (mode=keep)
    ],
    # -O2: -O1 plus lossless speculative decoding: a drafted token tree verified in one
    # forward (training-free drafters: prompt lookup + Token Recycling), greedy-identical.
    "O2": ["kv-fusion", "weight-format", "spec-tree"],
    # -O3: -O2 with trees up to 16 nodes, capped at compile time at the smallest cap within
    # 2% of the best tokens per second measured on this device (spec-tree's `tune`,
    # arc/tune.py); --target auto named also times every installed target and keeps the fastest.
    "O3": ["kv-fusion", "weight-format", "spec-tree{budget=15,tune=true}"],
}


def preset_spec(level: str) -> str:
    key = level.upper().lstrip("-")
    if key not in PRESETS:
        raise ArcError(f"unknown optimization level {level!r}; use -O0, -O1, -O2 or -O3")
    return ",".join(PRESETS[key])
