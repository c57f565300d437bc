"""Decode speed on a CUDA GPU at batch 1: Hugging Face eager (fp32, bf16) against arc engines
(torch eager, AOTInductor with and without the CUDA-graph decode step, -O2 speculative), each
system in its own process, with greedy-identity checks against HF fp32.

    python benchmarks/gpu_speed.py [--model smollm2-135m] [--new-tokens 128] [--rounds 2]
        [--prompts 4] [--engines DIR] [--json FILE] [--budget-s 400]

Every worker loads its system, warms up on one prompt, then decodes each prompt greedily for
--new-tokens tokens (EOS ignored, so every system makes the same number). Decode tok/s excludes
prefill: for arc the runtime's decode timer; for HF (N-1) / (time(N tokens) - time(1 token)).
Rounds are interleaved (system A, B, ..., A, B, ...) and the median over rounds is reported.
"same" compares ids with HF fp32's (identical greedy ids: the lossless check), up to the first
EOS arc produced (HF's min_new_tokens masks EOS, arc's --ignore-eos takes it; marked *); for
HF bf16 it is the fraction of equal ids. Engines are compiled into --engines first (reused when
present; compile time printed); one that does not compile within --budget-s is reported and
skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
F32 = "kv-fusion,weight-format{mode=f32}"
ENGINES = {  # name -> (compile args, env at run time)
    "arc torch eager": (["--passes", F32, "--torch-mode", "eager"], {}),
    "arc torch eager, no CUDA graph": (
        ["--passes", F32, "--torch-mode", "eager"],
        {"ARC_CUDA_GRAPHS": "0"},
    ),
    "arc AOT": (["--passes", F32, "--torch-mode", "aot"], {}),
    "arc AOT, no CUDA graph": (["--passes", F32, "--torch-mode", "aot"], {"ARC_CUDA_GRAPHS": "0"}),
    "arc AOT -O2 (spec-tree)": (
        ["--passes", F32 + ",spec-tree{budget=15,ladder=false}", "--torch-mode", "aot"],
        {},
    ),
}


def worker_hf(directory: str, dtype: str, ids_file: str, n: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dt).to("cuda").eval()

    def gen(ids: list[int], k: int) -> tuple[float, list[int]]:
        x = torch.tensor([ids], device="cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(x, do_sample=False, max_new_tokens=k, min_new_tokens=k, pad_token_id=0)
        toks = out[0, len(ids) :].tolist()  # synchronizes
        return time.perf_counter() - t, toks

    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    out = []
    with torch.inference_mode():
        prompts = json.loads(Path(ids_file).read_text())
        gen(prompts[0], 8)  # warm-up
        for ids in prompts:
            t1, _ = gen(ids, 1)
            tn, toks = gen(ids, n)
            out.append({"ids": toks, "decode_s": tn - t1, "produced": n - 1, "eos": eos})
    return out


def worker_arc(engine: str, ids_file: str, n: int) -> list[dict]:
    import torch

    from arc.runtime import cuda_graph
    from arc.runtime.load import load_engine

    gen = load_engine(engine).generator
    out = []
    with torch.inference_mode():
        prompts = json.loads(Path(ids_file).read_text())
        gen.generate(prompts[0], max_new_tokens=8, ignore_eos=True)  # warm-up
        for ids in prompts:
            r = gen.generate(ids, max_new_tokens=n, ignore_eos=True)
            row = {"ids": r.token_ids, "decode_s": r.decode_ms / 1e3}
            out.append(row | {"produced": len(r.token_ids) - 1, "forwards": r.forward_passes})
    graphs = cuda_graph.stats(gen.steps.functions)
    if graphs:
        out[-1]["graphs"] = graphs
    return out


def _spawn(args: list[str], env: dict | None = None) -> list[dict] | str:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, __file__, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        return f"worker failed: {done.stderr.strip().splitlines()[-1][:300]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _compile(model: str, args: list[str], out: Path, budget_s: float) -> str | None:
    if out.exists():
        return None
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "arc.cli", "compile", model, "--device", "cuda", *args]
    try:
        done = subprocess.run(
            [*cmd, "--max-seq-len", "1024", "-o", str(out)],
            capture_output=True,
            text=True,
            timeout=budget_s,
        )
    except subprocess.TimeoutExpired:
        return f"not compiled within {budget_s:.0f} s"
    if done.returncode != 0:
        return f"compile failed: {done.stderr.strip()[-300:]}"
    print(f"compiled {out.name} ({' '.join(args)}) in {time.perf_counter() - t:.0f} s", flush=True)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--engines", default=str(HERE / ".engines-cuda"))
    ap.add_argument("--budget-s", type=float, default=400, help="compile time limit per engine")
    ap.add_argument("--system", action="append", help="only these systems (repeatable)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    import torch
    from transformers import AutoTokenizer

    from arc.models import loader

    _, directory = loader.resolve(a.model)
    tok = AutoTokenizer.from_pretrained(directory)
    texts = [p["prompt"] for p in json.loads((HERE / "prompts.json").read_text())][: a.prompts]
    prompt_ids = [
        tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
        for t in texts
    ]
    prompt_ids = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompt_ids]
    engines = Path(a.engines)
    engines.mkdir(parents=True, exist_ok=True)
    ids_file = engines / "prompt_ids.json"
    ids_file.write_text(json.dumps(prompt_ids))

    systems: dict[str, tuple[list[str], dict]] = {
        "HF eager fp32": (["--worker-hf", str(directory), "fp32"], {}),
        "HF eager bf16": (["--worker-hf", str(directory), "bf16"], {}),
    }
    skipped: dict[str, str] = {}
    for name, (args, env) in ENGINES.items():
        if a.system and name not in a.system:
            continue
        path = (
            engines
            / f"{a.model}-{'-'.join(''.join(c for c in x if c.isalnum()) for x in args)}.arc"
        )
        why = _compile(a.model, args, path, a.budget_s)
        if why:
            skipped[name] = why
            continue
        systems[name] = (["--worker-arc", str(path)], env)
    if a.system:
        systems = {k: v for k, v in systems.items() if k in a.system or k.startswith("HF")}

    runs: dict[str, list] = {name: [] for name in systems}
    common = [str(ids_file), str(a.new_tokens)]
    for r in range(a.rounds):
        for name, (args, env) in systems.items():
            got = _spawn([*args, *common], env)
            if isinstance(got, str):
                skipped[name] = got
            else:
                runs[name].append(got)
            print(f"round {r + 1}: {name} done", file=sys.stderr, flush=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "?"
    report({k: v for k, v in runs.items() if v}, skipped, gpu, a)


def report(runs: dict, skipped: dict, gpu: str, a) -> None:
    def tps(rounds) -> float:  # median over rounds of all tokens / all decode time
        return statistics.median(
            sum(x["produced"] for x in rnd) / sum(x["decode_s"] for x in rnd) for rnd in rounds
        )

    ref = runs.get("HF eager fp32")
    ref_ids = [x["ids"] for x in ref[0]] if ref else None
    base = {k: tps(runs[k]) for k in ("HF eager fp32", "HF eager bf16") if k in runs}
    print(f"\n{a.model} on {gpu}: batch 1, greedy, {a.new_tokens} new tokens x {a.prompts} "
          f"prompts, median of {a.rounds} rounds, each system in its own process")  # fmt: skip
    print(f"{'system':<26} {'tok/s':>8} {'x HF fp32':>10} {'x HF bf16':>10} {'same':>6}  notes")
    rows = {}
    for name, rounds in runs.items():
        t = tps(rounds)
        ids = [x["ids"] for x in rounds[0]]
        if ref_ids is None:
            same = "?"
        elif "bf16" in name:
            pairs = [pq for u, v in zip(ids, ref_ids, strict=True) for pq in zip(u, v)]  # noqa: B905
            same = f"{sum(p == q for p, q in pairs) / max(len(pairs), 1):.2f}"
        else:  # HF's min_new_tokens masks EOS where arc's ignore_eos takes it: up to EOS
            eos = set(ref[0][0].get("eos", []))
            cut = [next((i for i, t in enumerate(u) if t in eos), len(u)) for u in ids]
            ok = all(u[:c] == v[:c] for u, v, c in zip(ids, ref_ids, cut, strict=True))
            same = ("yes" if ok else "NO") + ("" if cut == [len(u) for u in ids] else "*")
        last = rounds[-1][-1]
        notes = []
        if "forwards" in last:
            fw = sum(x["forwards"] for x in rounds[-1])
            notes.append(f"{sum(x['produced'] for x in rounds[-1]) / max(fw, 1):.2f} tok/forward")
        if "graphs" in last:
            g = last["graphs"]
            notes.append(f"graph replays {g['replays']}")
            notes += [f"capture FAILED: {g['failures'][0]}"] if g["failures"] else []
        r32 = t / base["HF eager fp32"] if "HF eager fp32" in base else float("nan")
        r16 = t / base["HF eager bf16"] if "HF eager bf16" in base else float("nan")
        print(f"{name:<26} {t:8.1f} {r32:9.2f}x {r16:9.2f}x {same:>6}  {'; '.join(notes)}")
        rows[name] = {"tok_s": t, "x_hf_fp32": r32, "x_hf_bf16": r16, "same": same}
    for name, why in skipped.items():
        print(f"{name:<26} skipped: {why}")
    if any(str(r["same"]).endswith("*") for r in rows.values()):
        print("* compared up to the first EOS arc produced (HF's min_new_tokens masks EOS)")
    if a.json:
        Path(a.json).write_text(json.dumps({"gpu": gpu, "rows": rows, "skipped": skipped}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker-hf":
        print(json.dumps(worker_hf(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "--worker-arc":
        print(json.dumps(worker_arc(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    else:
        main()
