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
    ],
    # -O2: -O1 plus lossless speculative decoding. The spec-tree pass has not landed yet, so
    # -O2 runs -O1's passes today; it gains speculation when that pass lands.
    "O2": ["kv-fusion"],
    # -O3: -O2 plus what is tuned per device (tree shape from measured verify cost); same today.
    "O3": ["kv-fusion"],
}


def preset_spec(level: str) -> str:
    key = level.upper().lstrip("-")
    if key not in PRESETS:
        raise ArcError(f"unknown optimization level {level!r}; use -O0, -O1, -O2 or -O3")
    return ",".join(PRESETS[key])
