"""Speculative decoding against plain decoding: arc -O1 vs -O2 (spec-tree), and llama.cpp's
plain decoding of the same GGUF when llama-cpp-python is installed, on a shipped prompt set.

    python benchmarks/spec_speed.py [--model smollm2-135m] [--new-tokens 128] [--rounds 3]
        [--system NAME=SPEC[@TARGET] ...]  # more pipelines: o2-b3='kv-fusion,spec-tree{budget=3}'
        [--target torch|tvm|onnx]  # the target of every arc system without its own @TARGET
        [--paired N]  # also: each speculative engine against itself with speculation off
        [--temperature T [--top-p P] [--top-k K] [--seed S]]  # sampled instead of greedy
        [--prompts benchmarks/prompts_long.json --new-tokens 256]  # ~500-token inputs

Every system runs in its own process (one worker per system per round; threads and allocators
of one library never slow another), rounds are interleaved (O1, O2, llama.cpp, O1, ...), each
worker warms up on one prompt first, and the median over rounds is reported. Greedy, stop at
EOS or --new-tokens. Decode tok/s is tokens after the first over the decode time (prefill
excluded) for every system. "same" says whether a system's ids equal -O1's (lossless check);
llama.cpp runs the 4-bit GGUF, so its ids differ and only its speed is compared.

`--temperature` (with `--top-p`, `--top-k`) samples instead, every system with the same
settings (llama.cpp's other samplers off: min-p 0, typical-p 1, no repeat penalty) and a
seed per prompt. arc draws each position's token with that position's own uniform number
(sample-then-match), so a speculative engine emits the tokens plain decoding draws with the
same seed, and sampled ids are compared as greedy ones are.

`--prompts` takes another set: `prompts_long.json` holds 8 tasks over a given text of ~460-520
tokens (summaries of an article and an email, questions answered from a text, code edits that
rewrite a 60-line file, a code explanation, a rewrite of an email), the work of retrieval-
augmented and editing requests, where a draft can copy from the input; run it with
`--new-tokens 256` (the engines hold 1024 tokens).

`--paired N` adds a paired measurement for the per-prompt criterion (no prompt more than 5%
below -O1): on a shared machine the same decode function's speed moves by +-5-10% from one
process to the next, more than the criterion, so separate-process rounds cannot judge it per
prompt. Here one worker per speculative engine runs every prompt N times with speculation on
and N times with it off (`generate(speculative=False)`: the engine's own `decode` function,
the computation -O1 runs), alternating which goes first, and reports per prompt the median
of the N per-pair ratios. Both arms are the same arc engine in one process (no other library
loaded), so neither is slowed by the other's allocator or threads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPTS = HERE / "prompts.json"
sys.path.insert(0, str(HERE))

import engine_cache  # noqa: E402

# ---------------------------------------------------------------- workers (one process each)


def _sampling(spec: str, i: int):
    """arc's SamplingParams from the workers' JSON `spec`, seeded for prompt i."""
    from arc.runtime.sampling import SamplingParams

    d = json.loads(spec)
    seed = None if d["seed"] is None else d["seed"] + i
    return SamplingParams(d["temperature"], d["top_k"], d["top_p"], seed)


def worker_arc(engine: str, prompts: list[str], n: int, threads: int, spec: str) -> list[dict]:
    import torch

    from arc.runtime.load import load_engine

    torch.set_num_threads(threads)
    eng = load_engine(engine)
    gen = eng.generator
    out = []
    with torch.inference_mode():
        gen.generate(eng.prompt_ids("Say hello."), max_new_tokens=16)  # warm-up
        for i, p in enumerate(prompts):
            ids = eng.prompt_ids(p)
            r = gen.generate(ids, max_new_tokens=n, sampling=_sampling(spec, i))
            out.append(
                {
                    "prompt_ids": ids,
                    "ids": r.token_ids,
                    "produced": len(r.token_ids) - 1,
                    "decode_s": r.decode_ms / 1e3,
                    "forwards": r.forward_passes,
                    "verifies": r.verify_passes,
                }
            )
    return out


def worker_paired(
    engine: str, prompts: list[str], n: int, threads: int, reps: int, how: str
) -> list:
    """Per prompt, `reps` pairs of (speculative tok/s, plain tok/s, same ids). Each
    speculative run drafts cold (Generator.forget): the drafter's table would otherwise hold
    the previous rep's output of the same prompt and draft it back (a repeat's verifies
    measured 49 of 82 forwards against 16 of 118 for the first run of instruction 2)."""
    import torch

    from arc.runtime.load import load_engine

    torch.set_num_threads(threads)
    eng = load_engine(engine)
    gen = eng.generator
    out: list[list] = [[] for _ in prompts]
    with torch.inference_mode():
        gen.generate(eng.prompt_ids("Say hello."), max_new_tokens=16)  # warm-up
        for r in range(reps):
            for i, p in enumerate(prompts):
                ids, got = eng.prompt_ids(p), {}
                for spec in (True, False) if (r + i) % 2 == 0 else (False, True):
                    if spec:
                        gen.forget()
                    sampling = _sampling(how, i)
                    res = gen.generate(ids, max_new_tokens=n, speculative=spec, sampling=sampling)
                    got[spec] = ((len(res.token_ids) - 1) / (res.decode_ms / 1e3), res.token_ids)
                out[i].append((got[True][0], got[False][0], got[True][1] == got[False][1]))
    return out


def worker_llama(
    gguf: str, prompt_ids: list[list[int]], n: int, threads: int, spec: str
) -> list[dict]:
    from llama_cpp import Llama

    s = json.loads(spec)
    llm = Llama(model_path=gguf, n_ctx=1024, n_threads=threads, n_batch=512, verbose=False)
    eos = {llm.token_eos()}
    if s["temperature"] > 0:  # the same filters as arc's, llama.cpp's others off
        how = {"temp": s["temperature"], "top_k": s["top_k"], "top_p": s["top_p"], "min_p": 0.0}
        how |= {"typical_p": 1.0, "repeat_penalty": 1.0}
    else:
        how = {"temp": 0.0, "top_k": 1}

    def one(ids: list[int], limit: int, i: int = 0) -> dict:
        llm.reset()
        if s["seed"] is not None:
            llm.set_seed(s["seed"] + i)
        toks, first = [], None
        for tok in llm.generate(ids, reset=True, **how):
            if first is None:
                first = time.perf_counter()
            toks.append(tok)
            if tok in eos or len(toks) >= limit:
                break
        end = time.perf_counter()
        return {"ids": toks, "produced": len(toks) - 1, "decode_s": end - first, "forwards": 0}

    one(prompt_ids[0][:8], 16)  # warm-up
    return [one(ids, n, i) for i, ids in enumerate(prompt_ids)]


# ---------------------------------------------------------------- driver


def _spawn(args: list[str]) -> list[dict]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"worker {args[:2]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _compile(model: str, spec: str, target: str, out: Path) -> None:
    if engine_cache.fresh(out):  # built by today's code
        return
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "arc.cli", "compile", model, "--passes", spec, "--target", target]
    subprocess.run([*cmd, "--max-seq-len", "1024", "-o", str(out)], check=True)
    engine_cache.mark(out)
    print(f"compiled {out.name} ({spec or 'no passes'}) in {time.perf_counter() - t:.0f} s")


def _llama_gguf() -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama.cpp: llama-cpp-python is not installed; skipped (see STACK-NOTES to build)")
        return None
    from arc.models.catalog import _smollm2_gguf

    return str(_smollm2_gguf())


def main(defaults: dict[str, str] | None = None, doc: str = __doc__) -> None:
    """`defaults`: system name -> pipeline spec (the first is the baseline); -O1 and -O2
    when None."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default=str(HERE / ".engines"))
    ap.add_argument("--system", action="append", default=[], help="NAME=PIPELINE-SPEC")
    ap.add_argument("--target", default="torch", help="target of the arc systems")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--paired", type=int, default=0, metavar="N", help="paired runs per prompt")
    ap.add_argument("--temperature", type=float, default=0.0, help="sample (0: greedy)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="prompt i samples with seed S + i")
    ap.add_argument("--prompts", default=str(PROMPTS), help="prompt set (JSON: kind, prompt)")
    a = ap.parse_args()
    from arc.presets import preset_spec

    tag = "" if a.target == "torch" else f" {a.target}"
    systems = defaults or {f"arc{tag} -O1": preset_spec("O1"), f"arc{tag} -O2": preset_spec("O2")}
    systems |= dict(s.split("=", 1) for s in a.system)
    a.base = next(iter(systems))
    engines = Path(a.engines)
    engines.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, spec in systems.items():
        spec, _, target = spec.partition("@")
        target = target or a.target
        prefix = "" if target == "torch" else f"{target}-"  # torch engines keep their old names
        paths[name] = engines / f"{a.model}-{prefix}{_slug(spec)}.arc"
        _compile(a.model, spec, target, paths[name])
    prompts = [p["prompt"] for p in json.loads(Path(a.prompts).read_text())]
    gguf = None if a.no_llama or a.model != "smollm2-135m" else _llama_gguf()

    runs: dict[str, list[list[dict]]] = {name: [] for name in paths}
    if gguf:
        runs["llama.cpp (Q4_1 GGUF)"] = []
    a.sampling = {"temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p}
    a.sampling["seed"] = a.seed
    _sampling(json.dumps(a.sampling), 0).validate()
    sampling = json.dumps(a.sampling)
    common = [a.prompts, str(a.new_tokens), str(a.threads)]
    for r in range(a.rounds):
        for name, path in paths.items():
            runs[name].append(_spawn(["--worker-arc", str(path), *common, sampling]))
            print(f"round {r + 1}: {name} done", file=sys.stderr)
        if gguf:
            ids_file = engines / "prompt_ids.json"
            ids_file.write_text(json.dumps([x["prompt_ids"] for x in runs[a.base][0]]))
            runs["llama.cpp (Q4_1 GGUF)"].append(
                _spawn(["--worker-llama", gguf, str(ids_file), *common, sampling])
            )
    report(runs, prompts, a)
    if a.paired:
        for name, path in list(paths.items())[1:]:
            if "spec-tree" not in systems[name]:  # nothing to turn off: on and off are one run
                continue
            rows = _spawn(["--worker-paired", str(path), *common, str(a.paired), sampling])
            report_paired(name, rows, a)


def report_paired(name: str, rows: list, a) -> None:
    kinds = _kinds(a)
    print(
        f"\n{name}, paired in one process: speculation on vs off on the same engine, "
        f"{a.paired} pairs per prompt (median of per-pair ratios; spread = min..max)"
    )
    head = f"{'on tok/s':>9} {'off tok/s':>10} {'on/off':>7} {'spread':>12} ids"
    print(f"{'#':>2} {'kind':<12} {head}")
    ratios = []
    for i, (kind, pairs) in enumerate(zip(kinds, rows, strict=True)):
        r = [on / off for on, off, _ in pairs]
        on = statistics.median(x[0] for x in pairs)
        off = statistics.median(x[1] for x in pairs)
        same = "=" if all(x[2] for x in pairs) else "!"
        ratios.append(statistics.median(r))
        print(
            f"{i:>2} {kind:<12} {on:9.1f} {off:10.1f} {ratios[-1]:6.3f}x "
            f"{min(r):5.2f}..{max(r):4.2f}x  {same}"
        )
    worst = min(range(len(ratios)), key=ratios.__getitem__)
    geomean = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    print(
        f"   geomean {geomean:.3f}x; worst prompt {worst} ({kinds[worst]}): {ratios[worst]:.3f}x; "
        f"prompts below 0.95x: {sum(x < 0.95 for x in ratios)}/{len(ratios)}"
    )


def _kinds(a) -> list[str]:
    """The prompt set's kinds, in order (`--prompts`, the shipped set by default)."""
    return [p["kind"] for p in json.loads(Path(getattr(a, "prompts", PROMPTS)).read_text())]


def _slug(spec: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in spec).strip("-") or "O0"


def report(runs: dict, prompts: list[str], a) -> None:
    kinds = _kinds(a)
    base = runs[a.base]
    names = list(runs)

    def tps(rounds, i):  # median over rounds of prompt i's decode tok/s
        return statistics.median(x[i]["produced"] / x[i]["decode_s"] for x in rounds)

    def overall(rounds):  # median over rounds of all tokens / all decode time
        return statistics.median(
            sum(x["produced"] for x in rnd) / sum(x["decode_s"] for x in rnd) for rnd in rounds
        )

    how = (
        "greedy"
        if a.temperature <= 0
        else "sampled " + ", ".join(f"{k} {v}" for k, v in a.sampling.items() if k != "seed")
    )
    print(
        f"\n{a.model}, batch 1, {how}, {a.threads} threads, up to {a.new_tokens} new tokens, "
        f"median of {a.rounds} interleaved rounds, each system in its own process"
    )
    head = f"{'#':>2} {'kind':<12}" + "".join(f"{n[:22]:>24}" for n in names)
    print(head + f"   (tok/s; x = speedup over {a.base}; MAT = tokens per forward)")
    result = {"prompts": [], "overall": {}}
    for i, kind in enumerate(kinds):
        cells, row = [], {"kind": kind}
        for n in names:
            v = tps(runs[n], i)
            x = runs[n][0][i]
            mat = x["produced"] / x["forwards"] if x["forwards"] else float("nan")
            same = "" if n.startswith("llama") else ("=" if x["ids"] == base[0][i]["ids"] else "!")
            ratio = v / tps(base, i)
            cells.append(f"{v:6.1f} {ratio:4.2f}x {mat:4.2f}{same:1}")
            row[n] = {"tok_s": v, "x_O1": ratio, "mat": mat, "same_as_O1": same != "!"}
        print(f"{i:>2} {kind:<12}" + "".join(f"{c:>24}" for c in cells))
        result["prompts"].append(row)
    cells = []
    for n in names:
        v = overall(runs[n])
        cells.append(f"{v:6.1f} {v / overall(base):4.2f}x")
        result["overall"][n] = {"tok_s": v, "x_O1": v / overall(base)}
    print(f"{'':>2} {'overall':<12}" + "".join(f"{c:>24}" for c in cells))
    print(f"(= ids identical to {a.base}, ! different)")
    llama = next((n for n in names if n.startswith("llama")), None)
    print(
        f"\n{'system':<24} {'tok/s':>7} {'x ' + a.base:>14} {'x llama.cpp':>12} "
        f"{'tok/fwd':>8} {'ids = base':>11}"
    )
    for n in names:
        v = overall(runs[n])
        vs = f"{v / overall(runs[llama]):.2f}x" if llama else "-"
        rnd = runs[n][0]
        fwd = sum(x["forwards"] for x in rnd)
        mat = f"{sum(x['produced'] for x in rnd) / fwd:.2f}" if fwd else "-"
        agree = sum(x["ids"] == b["ids"] for x, b in zip(rnd, base[0], strict=True))
        same = "-" if n == llama else f"{agree}/{len(rnd)}"
        print(f"{n:<24} {v:7.1f} {v / overall(base):13.2f}x {vs:>12} {mat:>8} {same:>11}")
        result["overall"][n]["x_llama"] = v / overall(runs[llama]) if llama else None
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker-arc":
        _, _, engine, prompts_file, n, threads, spec = sys.argv
        prompts = [p["prompt"] for p in json.loads(Path(prompts_file).read_text())]
        print(json.dumps(worker_arc(engine, prompts, int(n), int(threads), spec)))
    elif len(sys.argv) > 1 and sys.argv[1] == "--worker-paired":
        _, _, engine, prompts_file, n, threads, reps, spec = sys.argv
        prompts = [p["prompt"] for p in json.loads(Path(prompts_file).read_text())]
        print(json.dumps(worker_paired(engine, prompts, int(n), int(threads), int(reps), spec)))
    elif len(sys.argv) > 1 and sys.argv[1] == "--worker-llama":
        _, _, gguf, ids_file, _prompts, n, threads, spec = sys.argv
        ids = json.loads(Path(ids_file).read_text())
        print(json.dumps(worker_llama(gguf, ids, int(n), int(threads), spec)))
    else:
        main()
