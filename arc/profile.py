"""`arc profile`: what each pass of a pipeline bought and cost, measured prefix by prefix.

For pipeline p1,...,pn it builds the engines for the prefixes (), (p1), (p1,p2), ..., (p1..pn)
of the same model, target and device, and measures every prefix on the same prompts in one
run:
- compile: the added pass's own wall time and IR nodes in/out, the backend build time;
- decode: tok/s (median over rounds), ms per token, prefill ms, tokens per forward and, for a
  speculative prefix, accepted tokens per tree verify;
- memory: KV-cache bytes per token (from the IR's cache declaration), weight bytes in the
  engine, weight bytes read per decoded token (weights x forwards / tokens: a forward reads
  every weight once), peak resident memory of the measuring process;
- quality: greedy agreement with the no-pass prefix on the prompts, and for a prefix with a
  lossy pass the perplexity change measured by `arc eval`'s code (arc/evaluate.py).

Method (as benchmarks/spec_speed.py and gpt-fast measure): every prefix runs in its own process
per round (one library's threads never slow another; a process per round also gives each its
own peak RSS), rounds are interleaved (prefix 0, 1, ..., n, 0, 1, ...), each worker warms up
first, and medians over rounds are reported. Prefix engines are cached by content under
$ARC_CACHE/profile (model, pipeline prefix, target, device, options, versions and a digest of
arc's own sources), so a second profile of the same pipeline rebuilds nothing. The target is
the one named, else the one `arc compile` picks (untimed `--target auto`) for the whole
pipeline, and every prefix is built for it: one profile never mixes targets.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from arc.errors import ArcError
from arc.ir import KVDecl

SOURCES = ("arc", "passes", "targets", "models")  # the code an engine is built by


def prefixes(spec: str) -> list[tuple[str, str | None]]:
    """[(prefix spec, the pass it adds)] for (), (p1), (p1, p2), ..."""
    from arc.pipeline import PassManager, format_spec

    items = PassManager(spec).items  # checks names, options and order
    out: list[tuple[str, str | None]] = [("", None)]
    for k in range(1, len(items) + 1):
        out.append((format_spec(items[:k]), format_spec(items[k - 1 : k])))
    return out


# switches a build reads from the environment (tvm kernels with or without AMX tiles or the
# 4-bit table lookup, a tile plan; targets/tvm.py): engines built under other values are other
# engines
BUILD_ENV = ("ARC_TVM_AMX", "ARC_TVM_LUT", "ARC_TVM_TILES")


def build_env() -> dict[str, str]:
    """The BUILD_ENV switches set in this process."""
    return {k: os.environ[k] for k in BUILD_ENV if k in os.environ}


def source_digest() -> str:
    """Digest of arc's own .py sources: a change to the compiler rebuilds the prefixes."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for top in SOURCES:
        for p in sorted((root / top).rglob("*.py")):
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def engine_key(model: str, spec: str, settings: dict[str, Any]) -> str:
    import torch

    import arc

    blob = json.dumps(
        {
            "model": model,
            "spec": spec,
            "settings": settings,
            "arc": arc.__version__,
            "torch": torch.__version__,
            "sources": source_digest(),
            "build_env": build_env(),
        },  # fmt: skip
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def build_prefix(model: str, spec: str, settings: dict[str, Any]) -> tuple[Path, bool]:
    """(engine path, whether it was cached) for pipeline `spec`."""
    from arc.cache import cache_dir
    from arc.compiler import CompileOptions, compile_model

    path = cache_dir("profile") / f"{engine_key(model, spec, settings)}.arc"
    if path.exists():
        return path, True
    opts = CompileOptions(
        target=settings["target"],
        device=settings["device"],
        spec=spec,
        max_seq_len=settings["max_seq_len"],
        target_options={k: v for k, v in settings["target_options"].items() if v},
    )
    compile_model(model, path, opts)  # writes a temp file and renames it into place
    return path, False


# ---------------------------------------------------------------- the measuring worker


def worker(engine: str, ids_file: str, n: int) -> dict[str, Any]:
    """One round of one prefix, in its own process: decode every prompt once."""
    import resource

    import torch

    from arc.runtime.load import load_engine

    eng = load_engine(engine)
    gen = eng.generator
    prompts = json.loads(Path(ids_file).read_text())
    rows = []
    with torch.inference_mode():
        gen.generate(prompts[0][:8], max_new_tokens=8)  # warm-up
        for ids in prompts:
            r = gen.generate(ids, max_new_tokens=n)
            rows.append(
                {
                    "ids": r.token_ids,
                    "produced": len(r.token_ids) - 1,
                    "decode_s": r.decode_ms / 1e3,
                    "prefill_ms": r.prefill_ms,
                    "forwards": r.forward_passes,
                    "verifies": r.verify_passes,
                }
            )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"prompts": rows, "peak_rss_bytes": rss}


def _spawn(engine: Path, ids_file: Path, n: int, threads: int | None) -> dict[str, Any]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "arc.profile", "--worker", str(engine), str(ids_file), str(n)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate()
    except BaseException:  # Ctrl-C: no orphaned worker
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        tail = (err.strip().splitlines() or ["no output"])[-1][:300]
        raise ArcError(f"profile worker for {engine.name} failed: {tail}")
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------- the run


def profile(
    model: str,
    spec: str,
    prompts: Sequence[str],
    *,
    target: str = "torch",
    device: str = "cpu",
    torch_mode: str | None = None,
    max_seq_len: int = 1024,
    new_tokens: int = 64,
    rounds: int = 3,
    threads: int | None = None,
    ppl: bool = True,
    ppl_tokens: int = 512,
    per_layer: bool = False,
    stage: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """The `arc profile --json` object (see the module docstring)."""
    from arc.pipeline import registry

    if rounds < 1 or new_tokens < 2 or not prompts:
        raise ArcError("--rounds must be >= 1, --new-tokens >= 2, and prompts non-empty")
    t0 = time.perf_counter()
    steps = prefixes(spec)
    auto = None
    if target == "auto":  # one target for every prefix: the one the whole pipeline gets
        from arc.compiler import auto_target

        stage("choose target")
        target, auto = auto_target(model, steps[-1][0], device, max_seq_len)
    settings = {
        "target": target,
        "device": device,
        "max_seq_len": max_seq_len,
        "target_options": {"mode": torch_mode},
    }
    built = []
    for i, (pspec, _) in enumerate(steps):
        stage(f"build {i + 1}/{len(steps)}: {pspec or '(no passes)'}")
        built.append(build_prefix(model, pspec, settings))
    from arc.models import loader
    from arc.runtime.load import prompt_ids

    tok = loader.load(model, weights=False).tokenizer
    ids = [prompt_ids(tok, p) for p in prompts]
    runs: list[list[dict]] = [[] for _ in steps]
    with _ids_file(ids) as ids_file:
        for r in range(rounds):
            for i, (path, _) in enumerate(built):
                stage(f"round {r + 1}/{rounds}: prefix {i}")
                runs[i].append(_spawn(path, ids_file, new_tokens, threads))
    rows = []
    passes = registry()
    for i, ((pspec, added), (path, cached)) in enumerate(zip(steps, built, strict=True)):
        lossless = all(passes[n].is_lossless(o) for n, o in _items(pspec))
        row = _row(pspec, added, path, cached, runs[i], runs[0], lossless)
        if ppl and not lossless:
            stage(f"perplexity: prefix {i}")
            row["quality"]["ppl"] = _ppl(model, pspec, max_seq_len, ppl_tokens)
        rows.append(row)
    out = {
        "model": model,
        "pipeline": steps[-1][0],
        "target": target,
        "device": device,
        "settings": {
            "max_seq_len": max_seq_len,
            "new_tokens": new_tokens,
            "rounds": rounds,
            "prompts": len(prompts),
            "threads": threads,
            "torch_mode": torch_mode,
        },
        "machine": machine(),
        "prefixes": rows,
    }
    if auto is not None:
        out["auto"] = auto
    if per_layer:
        from arc.profile_layers import per_layer as layers

        stage("per-layer breakdown")
        out["per_layer"] = layers(model, steps[-1][0], ids[0], max_seq_len)
    out["wall_s"] = round(time.perf_counter() - t0, 3)
    return out


def _items(spec: str) -> list[tuple[str, dict]]:
    from arc.pipeline import parse_spec

    return parse_spec(spec) if spec else []


class _ids_file:
    """A temp JSON file of prompt ids, removed afterwards (also on Ctrl-C)."""

    def __init__(self, ids: list[list[int]]):
        import tempfile

        fd, name = tempfile.mkstemp(prefix="arc-profile-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(ids, f)
        self.path = Path(name)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def _row(spec, added, path, cached, rounds, base_rounds, lossless) -> dict[str, Any]:
    from arc.engine import read_manifest

    m = read_manifest(path)
    rec = m["passes"][-1] if added else None  # the record of the pass this prefix adds

    def per_round(f):
        return [f(rd["prompts"]) for rd in rounds]

    tps = per_round(lambda ps: sum(p["produced"] for p in ps) / sum(p["decode_s"] for p in ps))
    fw = per_round(lambda ps: sum(p["forwards"] for p in ps))
    made = per_round(lambda ps: sum(p["produced"] for p in ps))
    first = rounds[0]["prompts"]
    verifies = sum(p["verifies"] for p in first)
    plain_steps = sum(p["forwards"] for p in first) - verifies  # one token each
    from_verifies = sum(p["produced"] for p in first) - plain_steps
    prefill = per_round(lambda ps: statistics.mean(p["prefill_ms"] for p in ps))
    weights = sum(v["bytes"] for v in m.get("weights", {}).values() if isinstance(v, dict))
    kv_bytes = KVDecl(**m["ir"]["kv"]).bytes_per_token()  # K and V per token, int8 scales too
    tok_s = statistics.median(tps)
    # over all rounds (a speculative loop's choices follow measured timings, so rounds differ):
    # tokens / forwards is then the mean tokens over the mean forwards
    per_forward = sum(made) / max(sum(fw), 1)
    ours = [p["ids"] for p in rounds[0]["prompts"]]
    ref = [p["ids"] for p in base_rounds[0]["prompts"]]
    agree = _agreement(ref, ours)
    return {
        "pipeline": spec,
        "added": added,
        "cached": cached,
        "engine": str(path),
        "compile": {
            "pass_ms": rec["wall_ms"] if rec else None,
            "nodes_in": rec["nodes_in"] if rec else None,
            "nodes_out": rec["nodes_out"] if rec else None,
            "build_s": m.get("build_s"),
            "compile_s": m.get("compile_s"),
            "engine_bytes": path.stat().st_size,
        },
        "decode": {
            "tok_s": tok_s,
            "tok_s_rounds": tps,
            "ms_per_token": 1e3 / tok_s,
            "prefill_ms": statistics.median(prefill),
            "forwards": statistics.mean(fw),
            "tokens": statistics.mean(made),
            "tokens_per_forward": per_forward,
            "tokens_per_verify": from_verifies / verifies if verifies else None,
        },
        "memory": {
            "kv_bytes_per_token": kv_bytes,
            "weight_bytes": weights,
            "weight_bytes_per_token": weights / per_forward,
            "peak_rss_bytes": max(rd["peak_rss_bytes"] for rd in rounds),
        },
        "quality": {"lossless": lossless, "greedy_agreement": agree, "ppl": None},
    }


def _agreement(ref: list[list[int]], ours: list[list[int]]) -> float:
    """Position-wise identical greedy tokens over the reference's tokens, all prompts."""
    same = total = 0
    for r, o in zip(ref, ours, strict=True):
        total += len(r)
        same += sum(a == b for a, b in zip(r, o))  # noqa: B905 - o may be shorter or longer
    return same / max(total, 1)


def _ppl(model: str, spec: str, max_seq_len: int, ppl_tokens: int) -> dict[str, Any]:
    from arc.evaluate import evaluate

    r = evaluate(model, spec, ["Hello."], max_new_tokens=1, ppl_tokens=ppl_tokens,
                 max_seq_len=max_seq_len)  # fmt: skip
    return r["perplexity"]


def machine() -> dict[str, Any]:
    import torch

    from arc.bench import machine as bench_machine

    return bench_machine() | {"threads": torch.get_num_threads()}


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
