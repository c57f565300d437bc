"""Weight formats side by side: arc fp32, keep (the GGUF's Q4_1/Q8_0 blocks), int8, int4 and
bf16, each plain (-O1 pipeline) and speculative (-O2 pipeline), and llama.cpp on the same GGUF.

    python benchmarks/weight_formats.py [--rounds 3] [--new-tokens 128] [--system NAME=SPEC]

The method is benchmarks/spec_speed.py's (which this reuses): every system in its own process,
interleaved rounds, warm-up, greedy, medians; ratios are against "fp32 -O1", and "=" marks ids
identical to it (keep must show "=" on every prompt: it is lossless). Engines are built once
into benchmarks/.engines (about 100 s per plain and 220 s per speculative engine here).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from spec_speed import main  # noqa: E402

MODES = {
    "fp32": "{mode=f32}",
    "keep": "",
    "int8": "{mode=int8}",
    "int4": "{mode=int4}",
    "bf16": "{mode=bf16}",
}


def systems() -> dict[str, str]:
    out = {}
    for plan, tail in (("-O1", ""), ("-O2", ",spec-tree")):
        for name, opts in MODES.items():
            out[f"{name} {plan}"] = f"kv-fusion,weight-format{opts}{tail}"
    return out


if __name__ == "__main__":
    main(systems(), __doc__)
