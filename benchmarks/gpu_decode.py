"""CUDA check and figures for the torch target: a SmolLM2-shaped model (random weights, 30
layers, GQA) compiled -O1 for CUDA (AOTInductor), greedy ids and decode tok/s against Hugging
Face eager `generate` on the same GPU, side by side.

    python benchmarks/gpu_decode.py [--new-tokens 128] [--repeats 3]

Random weights because the real checkpoint cannot travel to a GPU machine here; the shapes,
and so the kernels and the timings, are SmolLM2-135M's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_model(out: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from arc.models.tiny import byte_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=1e5,
        tie_word_embeddings=True,
        initializer_range=0.05,
        eos_token_id=258,
        bos_token_id=None,
        pad_token_id=None,
    )
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from arc.compiler import CompileOptions, compile_model
    from arc.runtime.load import load_engine

    work = Path(tempfile.mkdtemp())
    model_dir = build_model(work / "smol-shaped")
    summary = compile_model(
        str(model_dir),
        work / "gpu.arc",
        CompileOptions(device="cuda", spec="kv-fusion", max_seq_len=1024),
    )
    print(f"compiled for {torch.cuda.get_device_name()} in {summary['compile_s']:.1f} s")
    eng = load_engine(work / "gpu.arc")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    prompt = eng.prompt_ids("Write a Python function that checks if a number is prime.")
    n = a.new_tokens
    ids = torch.tensor([prompt], device="cuda")

    def hf_run():
        with torch.inference_mode():

            def gen(k):
                torch.cuda.synchronize()
                t = time.perf_counter()
                out = hf.generate(ids, do_sample=False, max_new_tokens=k, min_new_tokens=k)
                torch.cuda.synchronize()
                return time.perf_counter() - t, out[0, len(prompt) :].tolist()

            t1, _ = gen(1)
            tn, toks = gen(n)
        return (n - 1) / (tn - t1), toks

    def arc_run():
        with torch.inference_mode():
            r = eng.generator.generate(prompt, max_new_tokens=n, ignore_eos=True)
        return r.tokens_per_s, r.token_ids

    speeds = {"HF eager generate (cuda)": [], "arc -O1 torch AOTInductor (cuda)": []}
    toks = {}
    for _ in range(a.repeats):
        for name, fn in zip(speeds, (hf_run, arc_run), strict=True):
            tps, toks[name] = fn()
            speeds[name].append(tps)
    names = list(speeds)
    ours, ref = toks[names[1]], toks[names[0]]
    cut = next((i for i, t in enumerate(ours) if t == 258), len(ours))
    base = statistics.median(speeds[names[0]])
    print(f"fp32, batch 1, greedy, {len(prompt)} prompt tokens, {n} new, median of {a.repeats}")
    for name in names:
        med = statistics.median(speeds[name])
        print(f"{name:<36} {med:8.1f} tok/s  {med / base:5.2f}x")
    print(f"same greedy ids (first {cut}): {'yes' if ours[:cut] == ref[:cut] else 'NO'}")


if __name__ == "__main__":
    main()
