"""`arc compile`: load -> trace -> passes -> target build -> engine file.

This is the one place that wires models, passes and targets together; none of them import
each other.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from tqdm import tqdm

from arc import autotarget, cache, targets
from arc.corpus import self_instruct
from arc.engine import CORPUS, WEIGHTS, write_engine
from arc.errors import ArcError
from arc.ir import DecodePlan, module_to_json
from arc.lowering import materialize
from arc.pipeline import Instrument, PassContext, PassManager, format_spec, record_dicts
from arc.runtime.drafters.corpus import CorpusIndex
from arc.runtime.generate import Generator
from arc.trace import trace
from arc.tune import tune_tree

DEFAULT_MAX_SEQ_LEN = 2048
# The AOT build exports prefill with a 4-token, 7-slot example (T and L are dynamic dims bounded
# by the cache), so fewer than 7 slots fail deep in torch.export; 16 leaves margin for that
# example to change, and a smaller cache is of no use for decoding anyway.
MIN_SEQ_LEN = 16
PREFILL_CHUNK = 256  # prompt tokens per prefill call unless --prefill-chunk says (<= the cache)


@dataclass
class CompileOptions:
    target: str = "torch"
    device: str = "cpu"
    spec: str = ""
    max_seq_len: int | None = None  # None: min(DEFAULT_MAX_SEQ_LEN, the model's positions)
    prefill_chunk: int | None = None  # prompt tokens per prefill call; None: PREFILL_CHUNK
    target_options: dict[str, Any] = field(default_factory=dict)
    instruments: Sequence[Instrument] = ()
    time_targets: bool = False  # --target auto: time the candidates (-O3), not just prefer


def trace_model(ref: str, max_seq_len: int | None = None, *, weights: bool = True):
    """(loaded model, traced Module) for a model reference; `weights=False` skips reading
    the tensors (tracing needs only the config)."""
    from arc.models import loader

    loaded = loader.load(ref, weights=weights)
    limit = loaded.arch.max_positions
    seq = min(DEFAULT_MAX_SEQ_LEN, limit) if max_seq_len is None else max_seq_len
    if limit < MIN_SEQ_LEN:
        raise ArcError(f"the model has only {limit} positions; arc needs at least {MIN_SEQ_LEN}")
    if seq < MIN_SEQ_LEN or seq > limit:
        raise ArcError(
            f"--max-seq-len {seq} outside {MIN_SEQ_LEN}..{limit} "
            f"(at least {MIN_SEQ_LEN} KV slots; at most the model's positions)"
        )
    meta = {
        "family": loaded.family.FAMILY,
        "model_type": loaded.arch.model_type,
        "source": str(loaded.directory),
        "eos_ids": loader.eos_ids(loaded),
        # the formats a quantized checkpoint stores its weights in (weight-format{mode=keep})
        "checkpoint_formats": {k: fmt for k, (fmt, _) in sorted(loaded.blocks.items())},
    }
    module = trace(loaded.name, loaded.family, loaded.arch, max_seq_len=seq, meta=meta)
    return loaded, module


def auto_target(
    ref: str, spec: str, device: str, max_seq_len: int | None = None
) -> tuple[str, dict[str, Any]]:
    """What `--target auto` (untimed) would build for `ref` and pipeline `spec`, without
    building it: (target name, the record compile_model writes in the manifest). `arc
    profile` builds every prefix of a pipeline for the one target its whole pipeline gets."""
    dev = autotarget.resolve_device(device)
    _, chosen = autotarget.by_preference(dev)
    loaded, traced = trace_model(ref, max_seq_len)
    pm = PassManager(spec)

    def run(name: str) -> None:
        ctx = PassContext(dev, name, weights=loaded.weights, tokenizer=loaded.tokenizer)
        module, _ = pm.run(traced, ctx)
        targets.get(name).check_module(module)

    name, chosen, _ = autotarget.first_accepting(chosen, run)
    return name, chosen


def compile_model(
    ref: str, out: Path, opts: CompileOptions, stage: Callable[[str], None] = lambda s: None
) -> dict[str, Any]:
    """Build engine `out` for model `ref`; returns the `arc compile --json` summary."""
    t0 = time.perf_counter()
    check_output(out)  # before the minutes of tracing and building, not after
    if opts.prefill_chunk is not None and opts.prefill_chunk < 1:
        raise ArcError("--prefill-chunk must be at least 1")
    chosen: dict[str, Any] | None = None
    if opts.target == "auto":
        device = autotarget.resolve_device(opts.device)
        name, chosen = autotarget.by_preference(device)
        target = targets.get(name)
    else:
        target = targets.get(opts.target)
        device = targets.resolve_device(target, opts.device)
    stage("load + trace")
    loaded, traced = trace_model(ref, opts.max_seq_len)
    chunk = PREFILL_CHUNK if opts.prefill_chunk is None else opts.prefill_chunk
    if chunk > traced.kv.max_seq_len and opts.prefill_chunk is not None:  # asked, not default
        raise ArcError(
            f"--prefill-chunk {opts.prefill_chunk} exceeds the cache "
            f"({traced.kv.max_seq_len} tokens, --max-seq-len)"
        )
    stage("passes")
    pm = PassManager(opts.spec, instruments=opts.instruments)

    def run_passes(name: str, check: bool = False):
        ctx = PassContext(device, name, weights=loaded.weights, tokenizer=loaded.tokenizer)
        module, records = pm.run(traced, ctx)
        if check:
            targets.get(name).check_module(module)
        return module, records

    if chosen is None or opts.time_targets:
        module, records = run_passes(target.NAME)
    else:  # the first preferred target that takes this pipeline's module
        name, chosen, (module, records) = autotarget.first_accepting(
            chosen, lambda n: run_passes(n, check=True)
        )
        target = targets.get(name)
    with tempfile.TemporaryDirectory(prefix="arc-build-") as tmp:
        work = Path(tmp)
        weights = materialize(module, loaded.weights, loaded.blocks)
        tb = time.perf_counter()
        built = work / "artifacts"  # where the target built its artifacts
        if chosen and opts.time_targets and len(chosen["candidates"]) > 1:
            target, chosen, (info, artifacts) = _timed_choice(
                module, weights, device, work, opts, stage
            )
            built = work / "candidates" / target.NAME
        else:
            target.check_module(module)
            stage("build " + target.NAME)
            info, artifacts = target.build(
                module, weights, device, work / "artifacts", _options(target.NAME, opts)
            )
        build_s = time.perf_counter() - tb
        plan = {"kind": module.plan.kind, "options": dict(module.plan.options)}
        corpus = None
        spec = plan["options"] if plan["kind"] == "speculative" else {}
        if spec.get("corpus") or spec.get("tune"):  # both run the built engine: load it once
            steps = target.load(module, weights, built, info, device)
            eos = list(module.meta.get("eos_ids", []))
            if spec.get("corpus"):
                stage(f"write the drafting corpus ({spec['corpus']} questions)")
                with tqdm(
                    total=spec["corpus"], desc="corpus", unit="q", leave=False,
                    file=sys.stderr, disable=not sys.stderr.isatty(),
                ) as bar:  # fmt: skip
                    writer = Generator(steps, loaded.tokenizer, eos, plan=_writing_plan(plan))
                    corpus = self_instruct(writer, spec["corpus"], bar.update)  # +1 per question
                steps.corpus = CorpusIndex(corpus)  # tuning drafts with it, as runs will
            if spec.get("tune"):
                stage("tune the tree on this device")
                plan["options"] = tune_tree(steps, loaded.tokenizer, eos, plan["options"])
            del steps
            tuned = DecodePlan(plan["kind"], MappingProxyType(plan["options"]))
            module = module.with_functions(module.functions, plan=tuned)
        if chosen:
            info = {**info, "auto": chosen}
        stage("write engine")
        payloads = {WEIGHTS: _save_weights(weights, work / WEIGHTS)}
        payloads |= {f"artifacts/{k}": v for k, v in artifacts.items()}
        payloads |= _save_tokenizer(loaded.tokenizer, work / "tokenizer")
        if corpus is not None:
            payloads[CORPUS] = _save_corpus(corpus, work / CORPUS)
        compile_s = time.perf_counter() - t0
        manifest = {
            "model": {"name": loaded.name, "config": loaded.hf_config.to_dict(), **module.meta},
            "target": {"name": target.NAME, "device": device, **info},
            "device": device,
            "dtype": "f32",  # activations, KV cache and accumulation; weights: see "weights"
            "weights": weight_summary(module),
            "pipeline": format_spec(pm.items),
            "passes": record_dicts(records),
            "decode_plan": plan,
            "runtime": {"max_seq_len": module.kv.max_seq_len, "prefill_chunk": chunk},
            "tokenizer": {
                "dir": "tokenizer",
                "chat_template": bool(loaded.tokenizer.chat_template),
            },
            "ir": module_to_json(module),
            "compile_s": round(compile_s, 3),
            "build_s": round(build_s, 3),
        }
        write_engine(out, manifest, payloads)
    return {
        "engine": str(out),
        "model": loaded.name,
        "target": target.NAME,
        "device": device,
        "passes": [{"name": r.name, "options": r.options} for r in records],
        "pipeline": manifest["pipeline"],
        "compile_s": manifest["compile_s"],
        "build_s": manifest["build_s"],
        "size_bytes": out.stat().st_size,
    }


def _options(name: str, opts: CompileOptions) -> dict[str, Any]:
    if opts.target == "auto":
        return autotarget.options_for(name, opts.target_options)
    return opts.target_options


def _timed_choice(module, weights, device: str, work: Path, opts: CompileOptions, stage):
    """--target auto -O3: build every installed candidate, time its decode, keep the fastest."""

    def build(name: str, out: Path):
        t = targets.get(name)
        t.check_module(module)
        stage(f"build {name} (auto: timing candidates)")
        return t.build(module, weights, device, out, _options(name, opts))

    def load(name: str, info: dict, out: Path):
        return targets.get(name).load(module, weights, out, info, device)

    name, record, built = autotarget.by_timing(device, build, load, work / "candidates")
    return targets.get(name), record, built


def weight_summary(module) -> dict[str, Any]:
    """Per format: how many weights, their parameters and stored bytes (for `arc inspect`)."""
    from arc.formats import nbytes

    out: dict[str, dict[str, Any]] = {}
    for name in module.used_weights():
        d = module.weights[name]
        row = out.setdefault(d.format, {"tensors": 0, "params": 0, "bytes": 0})
        params = 1
        for x in d.shape:
            params *= int(x)
        row["tensors"] += 1
        row["params"] += params
        row["bytes"] += nbytes(d.format, d.shape, d.group)
    return out


def check_output(out: Path) -> None:
    """Refuse an engine path that cannot be written: an existing directory or non-file, a
    missing or unwritable directory (probed by creating a file there, which also holds for root
    and read-only mounts)."""
    out = Path(out)
    if out.is_dir():
        raise ArcError(f"-o {out} is a directory; name the engine file, e.g. {out / 'model.arc'}")
    if out.exists() and not out.is_file():
        raise ArcError(f"-o {out} exists and is not a regular file")
    parent = out.parent
    if not parent.is_dir():
        raise ArcError(f"-o {out}: directory {parent} does not exist")
    why = cache.unwritable(out)
    if why:
        raise ArcError(f"-o {out}: cannot write in {parent} ({why})")


def _save_weights(weights, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    return path


def _writing_plan(plan: dict) -> dict:
    """The plan the corpus is written with: the engine's own, speculative (lossless: the same
    tokens sooner), drafting with `auto` where the engine drafts from the corpus alone (there
    is none until the first answers are in)."""
    opts = dict(plan["options"])
    if opts.get("draft") == "corpus":
        opts["draft"] = "auto"
    return {"kind": plan["kind"], "options": opts}


def _save_corpus(tokens, path: Path) -> Path:
    """The `corpus` drafter's datastore: one int32 tensor `tokens` [T] (safetensors)."""
    from safetensors.numpy import save_file

    save_file({"tokens": tokens}, str(path))
    return path


def _save_tokenizer(tok, directory: Path) -> dict[str, Path]:
    tok.save_pretrained(directory)
    return {f"tokenizer/{p.name}": p for p in sorted(directory.iterdir()) if p.is_file()}
