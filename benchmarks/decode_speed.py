"""Decode tok/s of arc -O0 and -O1 (torch target, AOTInductor) against Hugging Face eager
`generate`, measured side by side in one process, printed as ratios.

    python benchmarks/decode_speed.py [--model smollm2-135m] [--new-tokens 128] [--repeats 3]

Decode tok/s excludes prefill for every row: for HF it is (N-1) / (time(N tokens) - time(1
token)); for arc it is the runtime's own decode timer (N-1 decode forwards). Rows run in turn,
`--repeats` rounds, and the median is reported, so machine noise hits all rows alike. Engines
are compiled once into --engines (reused when present; compile time is printed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine_cache  # noqa: E402

PROMPT = "Write a Python function that checks if a number is prime."


def hf_row(model_ref: str, prompt_ids: list[int], n: int):
    from transformers import AutoModelForCausalLM

    from arc.models import loader

    _, directory = loader.resolve(model_ref)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])

    def gen(k: int):
        t = time.perf_counter()
        out = model.generate(ids, do_sample=False, max_new_tokens=k, min_new_tokens=k)
        return time.perf_counter() - t, out[0, len(prompt_ids) :].tolist()

    def run():
        with torch.inference_mode():
            t1, _ = gen(1)
            tn, toks = gen(n)
        return (n - 1) / (tn - t1), toks

    return run


def arc_row(engine: Path, prompt_ids: list[int], n: int):
    from arc.runtime.load import load_engine

    gen = load_engine(engine).generator

    def run():
        with torch.inference_mode():
            r = gen.generate(prompt_ids, max_new_tokens=n, ignore_eos=True)
        return r.tokens_per_s, r.token_ids

    return run


def _same_until_eos(ours: list[int], hf: list[int], eos: set[int]) -> bool:
    """HF's min_new_tokens masks EOS where arc's ignore_eos takes it: compare up to the first."""
    cut = next((i for i, t in enumerate(ours) if t in eos), len(ours))
    return ours[:cut] == hf[:cut]


def ensure_engine(model: str, level: str, out: Path) -> float | None:
    from arc.compiler import CompileOptions, compile_model
    from arc.presets import preset_spec

    if engine_cache.fresh(out):  # built by today's code
        return None
    opts = CompileOptions(spec=preset_spec(level), max_seq_len=1024)
    seconds = compile_model(model, out, opts)["compile_s"]
    engine_cache.mark(out)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default="benchmarks/.engines")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    engines = Path(a.engines)
    engines.mkdir(parents=True, exist_ok=True)
    rows = {}
    for level in ("O0", "O1"):
        path = engines / f"{a.model}-{level}.arc"
        took = ensure_engine(a.model, level, path)
        if took is not None:
            print(f"compiled arc -{level} in {took:.1f} s -> {path}")
        rows[f"arc -{level} (torch, AOTInductor)"] = path

    from arc.runtime.load import load_engine

    first = load_engine(next(iter(rows.values())))
    prompt_ids = first.prompt_ids(PROMPT)
    eos = first.generator.eos
    del first
    runners = {"HF transformers eager generate": hf_row(a.model, prompt_ids, a.new_tokens)}
    runners |= {name: arc_row(path, prompt_ids, a.new_tokens) for name, path in rows.items()}

    speeds: dict[str, list[float]] = {k: [] for k in runners}
    ids: dict[str, list[int]] = {}
    for _ in range(a.repeats):
        for name, run in runners.items():
            tps, toks = run()
            speeds[name].append(tps)
            ids[name] = toks
    base_name = "HF transformers eager generate"
    base = statistics.median(speeds[base_name])
    print(
        f"\n{a.model}, fp32, batch 1, greedy, {a.threads} threads, {len(prompt_ids)} prompt "
        f"tokens, {a.new_tokens} new tokens, median of {a.repeats}"
    )
    print(f"{'path':<36} {'decode tok/s':>12} {'vs HF eager':>12}  same ids as HF")
    for name, vals in speeds.items():
        med = statistics.median(vals)
        same = "yes" if _same_until_eos(ids[name], ids[base_name], eos) else "NO"
        print(f"{name:<36} {med:12.1f} {med / base:11.2f}x  {same}")


if __name__ == "__main__":
    main()
