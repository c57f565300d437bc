"""The `arc` command: compile, run, eval, bench, profile, inspect, passes, targets, cache.

Exit codes: 0 success; 2 bad input (one line on stderr, no traceback); 1 a bug in arc;
130 / 143 interrupted by SIGINT / SIGTERM, after `with` blocks have cleaned up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

from arc.cpu import check_threads
from arc.errors import ArcError


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # arc reads local files only, never a hub
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _stage_bar(enabled: bool):
    """A tqdm bar over compile stages, on stderr when it is a terminal."""
    from tqdm import tqdm

    bar = tqdm(total=4, desc="compile", disable=not enabled, file=sys.stderr, leave=False)
    started = []

    def stage(name: str) -> None:  # a new stage: the one before it is done
        if started:
            bar.update(1)
        started.append(name)
        bar.set_description(name)

    return bar, stage


# ---------------------------------------------------------------- compile


def cmd_compile(a: argparse.Namespace) -> int:
    from arc.compiler import CompileOptions, compile_model
    from arc.pipeline import DumpDir, PrintAfter
    from arc.presets import preset_spec

    spec = a.passes if a.passes is not None else preset_spec(f"O{a.opt}")
    instruments = []
    if a.print_after:
        instruments.append(PrintAfter(a.print_after.split(","), write=_stderr))  # known names
        _check_in_pipeline(a.print_after.split(","), spec)
    if a.dump_ir:
        instruments.append(DumpDir(Path(a.dump_ir)))
    opts = CompileOptions(
        target=compile_target(a.target, a.torch_mode),
        device=a.device,
        spec=spec,
        max_seq_len=a.max_seq_len,
        prefill_chunk=a.prefill_chunk,
        target_options={"mode": a.torch_mode, "cpu": a.cpu},
        instruments=instruments,
        # --target auto named at -O3: build and time the candidates; the default auto prefers
        time_targets=a.target == "auto" and a.opt == "3" and a.passes is None,
    )
    bar, stage = _stage_bar(sys.stderr.isatty() and not a.json)
    try:
        summary = compile_model(a.model, Path(a.output), opts, stage)
    finally:
        bar.close()
    if a.json:
        print(json.dumps(summary))
    else:
        passes = summary["pipeline"] or "(none)"
        print(
            f"wrote {summary['engine']} ({summary['size_bytes'] / 1e6:.1f} MB): "
            f"{summary['model']} -> {summary['target']}/{summary['device']}, passes {passes}, "
            f"compiled in {summary['compile_s']:.1f} s (backend build {summary['build_s']:.1f} s)"
        )
    return 0


def compile_target(named: str | None, torch_mode: str | None) -> str:
    """The target `arc compile` builds: the one named; else torch where --torch-mode says how
    to build it; else `auto`, the device's first installed target that takes the pipeline (on
    a CPU with the tvm extra: tvm, which decoded SmolLM2 -O2 at 3.1x torch AOT's tok/s and
    built in a tenth of the time, README "Targets")."""
    if named:
        return named
    return "torch" if torch_mode else "auto"


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


def _check_in_pipeline(names: list[str], spec: str) -> None:
    """--print-after a pass this pipeline does not run would print nothing: say so instead."""
    from arc.pipeline import parse_spec

    running = [n for n, _ in parse_spec(spec)]
    for name in filter(None, (n.strip() for n in names)):
        if name not in running:
            have = ", ".join(running) or "no passes"
            raise ArcError(f"--print-after {name}: not in this pipeline ({have})")


# ---------------------------------------------------------------- run


def cmd_run(a: argparse.Namespace) -> int:
    import torch

    from arc.runtime import cuda_graph
    from arc.runtime.load import load_engine
    from arc.runtime.sampling import SamplingParams

    if a.max_new_tokens < 1:
        raise ArcError("--max-new-tokens must be at least 1")
    check_threads(a.threads)
    if a.draft_max is not None and a.draft_max < 0:
        raise ArcError("--draft-max must be 0 (plain decoding) or more")
    sampling = SamplingParams(a.temperature, a.top_k, a.top_p, a.seed).validate()
    trace = _trace_path(a.trace) if a.trace else None  # checked before the engine loads
    torch.set_num_threads(a.threads or torch.get_num_threads())
    eng = load_engine(a.engine, progress=sys.stderr.isatty() and not a.json)
    ids = eng.prompt_ids(a.prompt, chat=not a.no_chat_template, system=a.system)
    stream = (lambda s: print(s, end="", flush=True)) if a.stream and not a.json else None
    with torch.inference_mode():
        r = eng.generator.generate(
            ids,
            max_new_tokens=a.max_new_tokens,
            sampling=sampling,
            stop=a.stop or (),
            ignore_eos=a.ignore_eos,
            on_text=stream,
            trace=trace is not None,
            draft_max=a.draft_max,
        )
    if trace is not None:
        from arc.runtime.step_profile import write_trace

        head = r.to_json()
        head = {k: head[k] for k in _TRACE_HEAD} | {"engine": str(a.engine)}
        try:
            write_trace(trace, head, r.trace or [])
        except OSError as e:  # the disk filled or the directory went away while decoding
            raise ArcError(f"--trace {a.trace}: not written ({e.strerror or e})") from None
    graphs = cuda_graph.stats(eng.generator.steps.functions)
    if a.json:
        extra = {} if graphs is None else {"cuda_graph_replays": graphs["replays"]}
        extra |= {"cuda_graph_failures": graphs["failures"]} if graphs else {}
        print(json.dumps(r.to_json() | extra))
        return 0
    if graphs and graphs["failures"]:
        _stderr(f"[CUDA graph capture failed, ran without: {graphs['failures'][0]}]")
    print("" if stream else r.text)
    _stderr(
        f"[{len(r.prompt_ids)} prompt tokens, prefill {r.prefill_ms:.0f} ms; "
        f"{len(r.token_ids)} new tokens, decode {r.tokens_per_s:.1f} tok/s, "
        f"{r.forward_passes} forwards ({r.verify_passes} tree verifies, "
        f"{r.accepted_per_step:.2f} tokens each); stop: {r.stop_reason}]"
    )
    if r.verify_passes:
        from arc.runtime.step_profile import describe

        _stderr(f"[steps: {describe(r.steps)}]")
    return 0


# the trace file's first line: the request's totals (then one line per decode step)
_TRACE_HEAD = (
    "prompt_ids", "token_ids", "stop_reason", "prefill_ms", "decode_ms", "tokens_per_s",
    "forward_passes", "verify_passes", "accepted_per_step", "steps",
)  # fmt: skip


def _trace_path(text: str) -> Path:
    """`--trace FILE`: a file in an existing directory (checked before decoding, so a bad
    path costs no generation and leaves nothing behind)."""
    path = Path(text)
    if path.is_dir():
        raise ArcError(f"--trace {text}: is a directory (give a file name)")
    if not path.parent.is_dir():
        raise ArcError(f"--trace {text}: no directory {str(path.parent)!r}")
    if path.exists() and not path.is_file():
        raise ArcError(f"--trace {text}: exists and is not a regular file")
    from arc.cache import unwritable

    why = unwritable(path)
    if why:
        raise ArcError(f"--trace {text}: cannot write in {str(path.parent)!r} ({why})")
    return path


# ---------------------------------------------------------------- eval


def cmd_eval(a: argparse.Namespace) -> int:
    from arc.evaluate import DEFAULT_PROMPTS, evaluate, load_prompts
    from arc.presets import preset_spec

    spec = a.passes if a.passes is not None else preset_spec("O2")
    prompts = load_prompts(Path(a.prompts) if a.prompts else DEFAULT_PROMPTS)
    r = evaluate(
        a.model,
        spec,
        prompts,
        max_new_tokens=a.max_new_tokens,
        ppl_tokens=a.ppl_tokens,
        max_seq_len=a.max_seq_len,
        long_context=a.long_context,
        progress=sys.stderr.isatty() and not a.json,
    )
    if a.json:
        print(json.dumps(r))
        return 0
    g, p = r["greedy"], r["perplexity"]
    print(f"{r['model']}: passes {r['pipeline'] or '(none)'} against no passes")
    print(f"{'prompt':>6} {'tokens':>7} {'agree':>7} {'first diff':>10}")
    for row in g["per_prompt"]:
        print(
            f"{row['index']:>6} {row['compared']:>7} {row['agreement']:>7.3f} "
            f"{row['first_divergence']:>10}"
        )
    print(
        f"greedy      agreement {g['agreement']:.4f}, mean first divergence "
        f"{g['mean_first_divergence']:.1f} of {g['max_new_tokens']} new tokens"
    )
    print(
        f"perplexity  reference {p['reference']:.4f}, passes {p['passes']:.4f}, "
        f"delta {p['delta_pct']:+.4f} % ({p['tokens']} tokens of {p['corpus']})"
    )
    if "long_context" in r:
        lc = r["long_context"]
        print(
            f"long ctx    reference {lc['reference']:.4f}, passes {lc['passes']:.4f}, delta "
            f"{lc['delta_pct']:+.4f} % ({lc['tokens']} tokens streamed: {lc['prefix']} "
            f"prefilled, then one decode step each; caches {lc['cache']['reference']} / "
            f"{lc['cache']['passes']} slots)"
        )
    for line in _kv_facts(r.get("facts", {}).get("kv-fusion")):
        print(line.strip())
    _stderr(f"[eval in {r['wall_s']:.1f} s]")
    return 0


# ---------------------------------------------------------------- profile


def cmd_profile(a: argparse.Namespace) -> int:
    from arc.evaluate import DEFAULT_PROMPTS, load_prompts
    from arc.presets import preset_spec
    from arc.profile import profile
    from arc.profile_report import plot, print_table

    spec = a.passes if a.passes is not None else preset_spec(f"O{a.opt}")
    check_threads(a.threads)
    if a.plot and not a.plot.endswith(".png"):
        raise ArcError("--plot must name a .png file")
    if a.plot and not Path(a.plot).resolve().parent.is_dir():
        raise ArcError(f"--plot: directory of {a.plot} does not exist")
    if a.json_file and not Path(a.json_file).resolve().parent.is_dir():
        raise ArcError(f"--json-file: directory of {a.json_file} does not exist")
    prompts = load_prompts(Path(a.prompts) if a.prompts else DEFAULT_PROMPTS)[: a.num_prompts]
    show = sys.stderr.isatty() and not a.json
    r = profile(
        a.model,
        spec,
        prompts,
        target=compile_target(a.target, a.torch_mode),
        device=a.device,
        torch_mode=a.torch_mode,
        max_seq_len=a.max_seq_len,
        new_tokens=a.new_tokens,
        rounds=a.rounds,
        threads=a.threads,
        ppl=not a.no_ppl,
        ppl_tokens=a.ppl_tokens,
        per_layer=a.per_layer,
        stage=(lambda s: _stderr(f"[{s}]")) if show else (lambda s: None),
    )
    if a.plot:
        plot(r, Path(a.plot))
    if a.json_file:
        from arc.bench import write_atomic

        write_atomic(Path(a.json_file), json.dumps(r, indent=1))
    if a.json:
        print(json.dumps(r))
    else:
        print_table(r, fancy=sys.stdout.isatty())
    return 0


# ---------------------------------------------------------------- inspect, passes, targets


def cmd_inspect(a: argparse.Namespace) -> int:
    from arc.ir import format_module, to_dot

    if Path(a.thing).is_file() and not a.thing.endswith(".gguf"):
        from arc.engine import read_manifest
        from arc.manifest import module_of

        m = read_manifest(Path(a.thing))  # schema-checked: the summary's keys are all there
        module = module_of(m, a.thing)
        if not (a.ir or a.dot):
            print(_engine_summary(a.thing, m, module))
            return 0
    else:
        from arc.compiler import trace_model

        _, module = trace_model(a.thing, weights=False)
    if a.dot:
        if a.dot not in module.functions:
            raise ArcError(f"no function {a.dot!r}; have {', '.join(module.functions)}")
        print(to_dot(module.functions[a.dot]))
    else:
        print(format_module(module))
    return 0


WEIGHT_ROW = ("tensors", "params", "bytes")
# target record keys shown on their own line (cpu) or not at all (long lists)
TARGET_NOT_INLINE = {"name", "device", "march", "cpu_flags", "cpu_name", "inputs", "graphs", "auto"}


def _target_details(t: dict) -> str:
    """The target's own record (torch: mode, bind, torch version; onnx: onnxruntime version,
    opset, ...) as key=value, scalars and short lists only."""
    out = []
    for k, v in sorted(t.items()):
        if k in TARGET_NOT_INLINE:
            continue
        if isinstance(v, list) and all(isinstance(x, str) for x in v) and len(v) <= 8:
            v = ",".join(v)
        if isinstance(v, str | int | float | bool):
            out.append(f"{k}={str(v)[:40]}")
    return "  ".join(out)


def _engine_summary(path: str, m: dict, module) -> str:
    files = m["files"]
    lines = [
        f"engine    {path}  (format {m['format_version']}, arc {m['arc_version']})",
        f"model     {m['model']['name']}  ({m['model'].get('model_type')}, "
        f"family {m['model'].get('family')})",
        f"target    {m['target']['name']}  device={m['device']}  dtype={m['dtype']}  "
        + _target_details(m["target"]),
        f"cache     max_seq_len={m['runtime']['max_seq_len']}  "
        f"prefill_chunk={m['runtime']['prefill_chunk']}",
        f"plan      {m['decode_plan']['kind']}  "
        + " ".join(f"{k}={v}" for k, v in sorted(m["decode_plan"]["options"].items())),
        f"compile   {m['compile_s']:.1f} s (backend build {m['build_s']:.1f} s)",
        f"passes    {m['pipeline'] or '(none)'}",
    ]
    if "march" in m["target"]:
        flags = m["target"].get("cpu_flags")
        lines.insert(
            3,
            f"cpu       -march={m['target']['march']}  built on {m['target'].get('cpu_name')}"
            f"  needs {' '.join(flags) if isinstance(flags, list) else '?'}",
        )
    auto = m["target"].get("auto")
    if isinstance(auto, dict):
        lines.insert(3, f"auto      {str(auto.get('rule'))[:20]}: {str(auto.get('why'))[:200]}")
    skip = m["model"].get("layer_skip")
    if isinstance(skip, dict):
        keys = ("mode", "skipped", "dropped", "search", "acceptance", "agree", "probe")
        shown = "  ".join(f"{k}={str(skip[k])[:80]}" for k in keys if k in skip)
        if isinstance(skip.get("variants"), list):  # adaptive: the depth variants
            shown += "  variants=" + " ".join(
                f"{'+'.join(map(str, v.get('skipped', [])))}"
                for v in skip["variants"][:8]
                if isinstance(v, dict)
            )
        lines.append(f"layerskip {shown}")
    artifacts = [f["size"] for k, f in files.items() if k.startswith("artifacts/")]
    lines.insert(
        -2, f"artifacts {len(artifacts)} files, {sum(artifacts) / 1e6:.2f} MB (see files below)"
    )
    weights = m.get("weights")
    for fmt, row in sorted(weights.items() if isinstance(weights, dict) else []):
        if isinstance(row, dict) and all(isinstance(row.get(k), int) for k in WEIGHT_ROW):
            bits = 8 * row["bytes"] / max(row["params"], 1)
            lines.append(
                f"weights   {fmt:<5} {row['tensors']:4d} tensors {row['params'] / 1e6:8.2f}M "
                f"params {row['bytes'] / 1e6:8.2f} MB  {bits:5.2f} bits/weight"
            )
    for r in m["passes"]:
        lines.append(
            f"  {r['name']:<14} {r['wall_ms']:8.2f} ms  nodes {r['nodes_in']} -> {r['nodes_out']}"
            f"  {'changed' if r['changed'] else 'unchanged'}"
        )
        lines += _kv_facts(r.get("facts"))
    lines.append(
        "IR        " + ", ".join(f"@{k}: {len(g.nodes)} nodes" for k, g in module.functions.items())
    )
    lines.append("files")
    for name, f in sorted(files.items()):
        lines.append(f"  {name:<40} {f['size'] / 1e6:10.2f} MB  sha256 {f['sha256'][:12]}")
    return "\n".join(lines)


def _kv_facts(facts) -> list[str]:
    """A pass record's KV-cache figures (kv-fusion), as one line under the pass; [] if none."""
    keys = ("kv_bytes_per_token_before", "kv_bytes_per_token_after")
    if not isinstance(facts, dict) or not all(isinstance(facts.get(k), int) for k in keys):
        return []
    shared = str(facts.get("shared_kv_layers") or "none")[:80]
    merge = str(facts.get("kv_merge") or "none")[:8]  # how shared pairs share (reuse, slerp)
    return [
        f"  {'':14} kv cache {facts[keys[0]]} -> {facts[keys[1]]} bytes/token  "
        f"dtype={str(facts.get('kv_dtype'))[:8]}  layers {str(facts.get('kv_layers_before'))[:8]}"
        f" -> {str(facts.get('kv_layers_after'))[:8]}  shared={shared}"
        f"{'' if merge == 'none' else '  merge=' + merge}"
    ]


def cmd_passes(a: argparse.Namespace) -> int:
    from arc.pipeline import registry
    from arc.presets import PRESETS

    for name, info in sorted(registry().items()):
        opts = ", ".join(f"{k}: {t.__name__} = {d}" for k, (t, d) in info.options.items())
        kind = (
            "lossless"
            if info.lossless is True
            else "LOSSY"
            if not info.lossless
            else "LOSSY in some modes"
        )
        after = f"  after: {', '.join(info.after)}" if info.after else ""
        print(f"{name:<14} [{kind}] {info.doc}\n{'':14} options: {opts or 'none'}{after}")
    print()
    for level, items in PRESETS.items():
        print(f"-{level}: {','.join(items) or '(no passes)'}")
    return 0


def cmd_cache(a: argparse.Namespace) -> int:
    from arc.cache_cmd import cache_command

    return cache_command(a.action, a.older_than, a.dry_run, a.json)


def cmd_targets(a: argparse.Namespace) -> int:
    from arc.targets import cuda_available, describe

    print(f"this machine: cpu{', cuda' if cuda_available() else ''}")
    for row in describe():
        devices = ",".join(row["devices"]) or "-"
        print(f"{row['name']:<10} devices: {devices:<10} {row['status']}")
    return 0


# ---------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"arc: error: {message} (see {self.prog} --help)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    from arc.bench import add_bench_parser

    p = _Parser(prog="arc", description="A compiler for autoregressive decoding.")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compile", help="trace MODEL, run passes, build for a target, write .arc")
    c.add_argument("model", help="catalog name, HF model directory, or .gguf file")
    c.add_argument(
        "--target",
        help="tvm | torch | onnx | tensorrt | auto (default: auto, the device's first installed "
        "target that takes the pipeline, without timing them; torch where --torch-mode is given)",
    )
    c.add_argument("-O", dest="opt", choices=["0", "1", "2", "3"], default="2")
    c.add_argument("--passes", help="pipeline spec, e.g. 'kv-fusion{mlp=false}' (overrides -O)")
    c.add_argument("-o", "--output", required=True, help="engine file to write (.arc)")
    c.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    c.add_argument("--max-seq-len", type=int, help="KV-cache slots (default min(2048, model))")
    c.add_argument("--prefill-chunk", type=int, help="prompt tokens per prefill call (default 256)")
    c.add_argument(
        "--torch-mode",
        choices=["aot", "jit", "eager"],
        help="torch target: AOTInductor package (aot, default on CPU), torch.compile at load "
        "(jit), or eager (the reference; default on CUDA)",
    )
    c.add_argument(
        "--cpu",
        choices=["native", "x86-64-v3", "x86-64-v4"],
        default="native",
        help="CPU the native code is built for: this one (native, default), or any x86-64-v3 "
        "(AVX2) / x86-64-v4 (AVX-512) CPU",
    )
    c.add_argument("--print-after", help="print the IR after these passes (comma list)")
    c.add_argument("--dump-ir", help="write the IR before and after each pass to this directory")
    c.add_argument("--json", action="store_true", help="print one JSON summary")
    c.set_defaults(fn=cmd_compile)

    r = sub.add_parser("run", help="decode from an engine")
    r.add_argument("engine")
    r.add_argument("--prompt", required=True)
    r.add_argument("--max-new-tokens", type=int, default=128)
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    r.add_argument("--top-k", type=int, default=0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int)
    r.add_argument("--stop", action="append", help="stop string (repeatable)")
    r.add_argument("--ignore-eos", action="store_true", help="keep going past EOS (benchmarks)")
    r.add_argument("--no-chat-template", action="store_true")
    r.add_argument("--system", help="system prompt for the chat template")
    r.add_argument("--stream", action="store_true", help="print tokens as they come")
    r.add_argument("--threads", type=int, help="CPU threads (default: torch's; at most 4x CPUs)")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.add_argument(
        "--trace", metavar="FILE", help="write each decode step (size, tokens, ms) as JSON lines"
    )
    r.add_argument(
        "--draft-max",
        type=int,
        metavar="N",
        help="most drafted tokens per tree verify of a speculative (-O2) engine; 0 decodes "
        "plainly (default: the engine's spec-tree budget)",
    )
    r.set_defaults(fn=cmd_run)

    e = sub.add_parser("eval", help="measure what a pass pipeline costs in output quality")
    e.add_argument("model", help="catalog name, HF model directory, or .gguf file")
    e.add_argument("--passes", help="pipeline spec to measure (default: the -O2 pipeline)")
    e.add_argument("--prompts", help="JSON list of prompts (default: benchmarks/prompts.json)")
    e.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens per prompt")
    e.add_argument(
        "--ppl-tokens", type=int, default=1024, help="tokens of pydoc_data.topics to score"
    )
    e.add_argument("--max-seq-len", type=int, help="KV cache slots (default: as compile)")
    e.add_argument(
        "--long-context",
        type=int,
        default=0,
        metavar="N",
        help="also stream N corpus tokens through decode, one per step (sparse attention's "
        "cost past its cache or over many blocks; 0: off)",
    )
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(fn=cmd_eval)
    add_bench_parser(sub)

    pr = sub.add_parser("profile", help="build and measure a pipeline prefix by prefix")
    pr.add_argument("model", help="catalog name, HF model directory, or .gguf file")
    pr.add_argument(
        "--target",
        help="tvm | torch | onnx | auto (default: auto, the target `arc compile` picks for the "
        "whole pipeline, every prefix built for it; torch where --torch-mode is given)",
    )
    pr.add_argument("--device", default="cpu", help="cpu | cuda")
    pr.add_argument("-O", dest="opt", choices=["0", "1", "2", "3"], default="2")
    pr.add_argument("--passes", help="pipeline spec (overrides -O)")
    pr.add_argument("--torch-mode", choices=["aot", "jit", "eager"], help="as for compile")
    pr.add_argument("--prompts", help="JSON list of prompts (default: benchmarks/prompts.json)")
    pr.add_argument("--num-prompts", type=_positive, default=4, help="first N prompts")
    pr.add_argument("--new-tokens", type=_positive, default=64, help="greedy tokens per prompt")
    pr.add_argument("--rounds", type=_positive, default=3, help="measuring rounds (median)")
    pr.add_argument("--threads", type=_positive, help="threads per measuring process")
    pr.add_argument("--max-seq-len", type=_positive, default=1024, help="KV-cache slots")
    pr.add_argument("--no-ppl", action="store_true", help="skip perplexity of lossy prefixes")
    pr.add_argument("--ppl-tokens", type=_positive, default=512, help="tokens scored for ppl")
    pr.add_argument("--per-layer", action="store_true", help="decode time by op kind and layer")
    pr.add_argument("--plot", help="write the chart to this .png (needs the plot extra)")
    pr.add_argument("--json", action="store_true", help="print one JSON object")
    pr.add_argument("--json-file", help="also write the JSON object to this file")
    pr.set_defaults(fn=cmd_profile)

    i = sub.add_parser("inspect", help="describe an engine, or print a model's traced IR")
    i.add_argument("thing", help="an .arc engine or a model reference")
    i.add_argument("--ir", action="store_true", help="print the IR as text")
    i.add_argument("--dot", metavar="FUNC", help="print FUNC's graph as Graphviz DOT")
    i.set_defaults(fn=cmd_inspect)

    sub.add_parser("passes", help="registered passes and -O presets").set_defaults(fn=cmd_passes)
    sub.add_parser("targets", help="targets, devices, installed").set_defaults(fn=cmd_targets)

    k = sub.add_parser("cache", help="list arc's cache (converted models, unpacked engines)")
    k.add_argument(
        "action",
        nargs="?",
        choices=["list", "prune"],
        default="list",
        help="list entries (default), or prune: free those no process is using",
    )
    k.add_argument(
        "--older-than",
        metavar="AGE",
        help="only entries unused for AGE (7d, 12h, 30m; a bare number is days)",
    )
    k.add_argument("--dry-run", action="store_true", help="prune: say what would be freed")
    k.add_argument("--json", action="store_true", help="print one JSON object")
    k.set_defaults(fn=cmd_cache)
    return p


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so `with` blocks clean up (temporary build dirs)."""


def _on_sigterm(signum, frame) -> NoReturn:
    raise _Terminated


def _on_unraisable(args) -> None:
    """sys.unraisablehook while the SIGTERM handler is installed. A signal that lands while
    Python runs a destructor (a `__del__`, a weakref callback) raises _Terminated there, and
    Python can only swallow it ("Exception ignored in ..."): `arc compile` then went on and
    wrote its engine, exit 0 (seen once in CI, inside regex's Group.__del__). So the signal is
    sent again from a helper thread a moment later (not at once: it would land in this hook,
    where Python swallows it too), to be handled outside the destructor, silently."""
    if isinstance(args.exc_value, _Terminated):
        threading.Thread(target=_terminate_again, daemon=True).start()
        return
    _PREVIOUS_UNRAISABLE[-1](args)


def _terminate_again(delay: float = 0.02) -> None:
    import time

    time.sleep(delay)  # the hook has long returned: the handler runs in the main thread's code
    os.kill(os.getpid(), signal.SIGTERM)


_PREVIOUS_UNRAISABLE = [sys.unraisablehook]


def _handle_sigterm():
    """Install the SIGTERM handler (main thread only) and the unraisable hook that backs it;
    returns what they replaced (for `_restore`), or None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    _PREVIOUS_UNRAISABLE.append(sys.unraisablehook)
    sys.unraisablehook = _on_unraisable
    return signal.signal(signal.SIGTERM, _on_sigterm)


def _restore(previous) -> None:
    """Put back the SIGTERM handler and unraisable hook `_handle_sigterm` replaced."""
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = _PREVIOUS_UNRAISABLE.pop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = _handle_sigterm()
    try:
        _quiet_libraries()
        return args.fn(args)
    except ArcError as e:
        print(f"arc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except _Terminated:
        return 128 + signal.SIGTERM
    except BrokenPipeError:  # `arc inspect ... | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0
    finally:
        _restore(previous)


def cli() -> NoReturn:
    """The `arc` command. `arc run` loads TVM's runtime library only, and leaves without the
    interpreter's teardown of every module (torch's, tvm's: ~0.45 s after the answer is
    printed): cyclic garbage is collected and the atexit handlers run as at any exit, the
    streams are flushed, and the kernel takes back the memory. Other commands exit as usual."""
    run = sys.argv[1:2] == ["run"]
    if run:  # an engine runs on TVM's runtime library alone: without its compiler (and the
        # Relax package it brings) `import tvm` takes ~1.3 s, not ~2.4 s. Only here, in the
        # `arc run` process: a process that loads an engine and then compiles (a test, `arc
        # profile`) needs the compiler, and tvm reads this once, at its import
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    rc = main()
    if not run:
        sys.exit(rc)
    import atexit
    import gc

    gc.collect()  # destructors of what is left (a loader's temporary files, say) run now
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that left, a stream main() closed
            pass
    os._exit(rc)


if __name__ == "__main__":
    cli()
