"""`arc bench`: arc engines side by side with other decoding systems, measured in one run.

    arc bench [ENGINE ...] [--model M] [--baselines hf,hf-compile,hf-prompt-lookup,llama.cpp]
        [--prompts FILE] [--new-tokens 128] [--rounds 3] [--threads N] [--json]
        [--results FILE.md] [--temperature T [--top-p P] [--top-k K] [--seed S]]

Every system decodes the same prompts (benchmarks/prompts.json by default) from the same token
ids: arc's own, through the model's chat template (`arc.runtime.load.prompt_ids`), handed as
ids to every baseline, so no system tokenizes differently. Greedy, batch 1, up to --new-tokens
tokens, stopping at the model's EOS ids, the same thread count for all. `--temperature` samples
instead, every system with the same temperature, top-p and top-k (llama.cpp's min-p, typical-p
and repeat penalty off; transformers' defaults from the model's generation config replaced) and
prompt i seeded with S + i; the systems draw differently, so ids are not compared.

Method (side by side, as Spec-Bench and gpt-fast measure, and benchmarks/spec_speed.py here):
- each system runs in its own process, a fresh one per round (`python -m arc.bench --worker`),
  so one library's threads, allocator or compile caches never slow another;
- rounds are interleaved (A, B, C, A, B, C, ...), so a slow spell of the machine hits all;
- each worker loads, then warms up on one short prompt (for hf-compile that is where
  torch.compile runs: reported as warm-up s, never in the figures), then decodes every prompt;
- decode tok/s leaves prefill out for every system: the tokens after the first over the time
  after the first token is known. arc: the runtime's own decode timer
  (`GenerationResult.decode_ms`); Hugging Face: a streamer timestamps each token `generate`
  emits (prompt lookup may emit several at once: the tokens after the first emission over the
  time after it); llama.cpp: the first token its generator yields is timestamped;
- a round's tok/s is all its decode tokens over all its decode time; the report is the median
  over rounds, and every ratio ("x hf") divides two medians of this same run.

Baselines: `hf` is transformers' `generate` on the model's HF directory, fp32, eager;
`hf-compile` the same with a static cache and the decode step torch.compile'd (transformers'
own decode compilation, which it turns on by itself only on GPUs; prefill stays eager, so a new
prompt length recompiles nothing); `hf-prompt-lookup` is `generate` with
`prompt_lookup_num_tokens=10` (prompt lookup decoding); `llama.cpp` is llama-cpp-python on the
model's GGUF (4-bit for smollm2-135m, so its ids are not compared). A baseline whose package is
missing is skipped with a note.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arc.cpu import check_threads
from arc.errors import ArcError

# baseline name -> (module that must import, what to install)
BASELINES = {
    "hf": ("transformers", "transformers"),
    "hf-compile": ("transformers", "transformers"),
    "hf-prompt-lookup": ("transformers", "transformers"),
    "llama.cpp": ("llama_cpp", "llama-cpp-python"),
}
DEFAULT_BASELINES = "hf,llama.cpp"
DEFAULT_MODEL = "smollm2-135m"
WARMUP_PROMPT = "Say hello."
WARMUP_TOKENS = 16
PROMPT_LOOKUP_TOKENS = 10


@dataclass(frozen=True)
class System:
    name: str  # as shown in the table
    kind: str  # "arc" or a baseline name
    source: str  # engine file, HF model directory, or GGUF file


# ---------------------------------------------------------------- the command


def add_bench_parser(sub) -> None:
    """Register `arc bench` on the CLI's subparsers."""
    b = sub.add_parser("bench", help="arc engines against HF / llama.cpp, one run, same prompts")
    b.add_argument("engines", nargs="*", metavar="ENGINE", help=".arc engine files to measure")
    b.add_argument(
        "--model",
        help="model the baselines run and the prompts are tokenized for (default: the engines' "
        f"catalog model, else {DEFAULT_MODEL})",
    )
    b.add_argument(
        "--baselines",
        default=DEFAULT_BASELINES,
        help=f"comma list of {', '.join(BASELINES)} (default {DEFAULT_BASELINES}; '' for none)",
    )
    b.add_argument("--prompts", help="JSON list of prompts (default: benchmarks/prompts.json)")
    b.add_argument("--new-tokens", type=_positive, default=128, help="most new tokens per prompt")
    b.add_argument("--rounds", type=_positive, default=3, help="interleaved rounds (median)")
    b.add_argument("--threads", type=_positive, help="CPU threads for every system (torch's)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--results", metavar="FILE.md", help="also write the table as Markdown here")
    b.add_argument("--temperature", type=float, default=0.0, help="sample (default 0: greedy)")
    b.add_argument("--top-p", type=float, default=1.0, help="nucleus when sampling (1: off)")
    b.add_argument("--top-k", type=int, default=0, help="top-k when sampling (0: off)")
    b.add_argument("--seed", type=int, default=0, help="prompt i samples with seed S + i")
    b.set_defaults(fn=cmd_bench)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def cmd_bench(a: argparse.Namespace) -> int:
    engines = _engines(a.engines)
    baselines = _baseline_names(a.baselines)
    if not engines and not baselines:
        raise ArcError("nothing to measure: give ENGINE files or --baselines")
    if a.results and not Path(a.results).resolve().parent.is_dir():
        raise ArcError(f"--results: directory of {a.results} does not exist")
    _sampling(_sampling_of(a), 0)  # bad values: one line now, not in every worker
    check_threads(a.threads)
    model = a.model or _engines_model(engines) or DEFAULT_MODEL
    job, settings = _setup(model, a, threads=a.threads or _torch_threads())
    for path, manifest in engines:
        _check_fits(path, manifest, job)
    systems, skipped = _systems(engines, baselines, model, job["directory"])
    for row in skipped:
        print(f"arc: note: {row['system']} skipped: {row['reason']}", file=sys.stderr)
    raw, later = run_rounds(systems, job, a.rounds, progress=sys.stderr.isatty())
    report = summarize(raw, systems, skipped + later, settings, _command(a))
    if a.results:
        write_atomic(Path(a.results), markdown(report))
    if a.json:
        print(json.dumps(report))
    elif sys.stdout.isatty():
        print_rich(report)
    else:
        print(plain(report))
    return 0


def _torch_threads() -> int:
    import torch  # imported here, after the checks: bad input is answered at once

    return torch.get_num_threads()


def _engines(paths: list[str]) -> list[tuple[Path, dict]]:
    """(path, checked manifest) per ENGINE; a missing or corrupt file is bad input."""
    from arc.engine import read_manifest

    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ArcError(f"{p}: no such engine file")
        out.append((path, read_manifest(path)))  # EngineError (an ArcError) when corrupt
    return out


def _baseline_names(text: str) -> list[str]:
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    for n in names:
        if n not in BASELINES:
            raise ArcError(f"--baselines: unknown baseline {n!r}; have {', '.join(BASELINES)}")
    return names


def _engines_model(engines: list[tuple[Path, dict]]) -> str | None:
    """The catalog model all engines were compiled from, if there is one."""
    from arc.models import catalog

    names = {m["model"]["name"] for _, m in engines}
    name = names.pop() if len(names) == 1 else None
    return name if name in catalog.CATALOG else None


def _setup(model: str, a: argparse.Namespace, threads: int) -> tuple[dict, dict]:
    """The job every worker gets (prompt ids, EOS ids, budgets) and the settings reported."""
    from arc.evaluate import DEFAULT_PROMPTS, load_prompts
    from arc.models import loader
    from arc.runtime.load import prompt_ids

    prompts_file = Path(a.prompts) if a.prompts else DEFAULT_PROMPTS
    texts = load_prompts(prompts_file)
    loaded = loader.load(model, weights=False)  # config and tokenizer only
    tok = loaded.tokenizer
    ids = [prompt_ids(tok, t) for t in texts]
    warmup = prompt_ids(tok, WARMUP_PROMPT)
    longest = max(len(x) for x in [*ids, warmup])
    job = {
        "texts": texts,
        "prompts": ids,
        "warmup": warmup,
        "warmup_tokens": min(WARMUP_TOKENS, a.new_tokens),
        "eos": loader.eos_ids(loaded),
        "new_tokens": a.new_tokens,
        "threads": threads,
        "max_len": longest + a.new_tokens + 1,  # cache slots a baseline needs (llama.cpp n_ctx)
        "directory": str(loaded.directory),  # the HF baselines' model
        "sampling": _sampling_of(a),
    }
    settings = {
        "model": loaded.name,
        "prompts_file": str(prompts_file),
        "prompts": len(texts),
        "prompt_tokens": [len(x) for x in ids],
        "new_tokens": a.new_tokens,
        "rounds": a.rounds,
        "threads": threads,
        "greedy": a.temperature <= 0,
        "sampling": None if a.temperature <= 0 else job["sampling"],
        "chat_template": bool(getattr(tok, "chat_template", None)),
        "eos_ids": job["eos"],
    }
    return job, settings


def _check_fits(path: Path, manifest: dict, job: dict) -> None:
    slots = manifest["runtime"]["max_seq_len"]
    need = max(len(x) for x in job["prompts"]) + job["new_tokens"]
    if need > slots:
        raise ArcError(
            f"{path}: its KV cache holds {slots} tokens; the longest prompt plus --new-tokens "
            f"needs {need} (compile with a larger --max-seq-len, or lower --new-tokens)"
        )


def _systems(
    engines: list[tuple[Path, dict]], baselines: list[str], model: str, directory: str
) -> tuple[list[System], list[dict]]:
    """Engines first, then baselines; a baseline that cannot run here becomes a note."""
    from arc.models import loader

    systems, skipped, seen = [], [], set()
    for path, _ in engines:
        name = str(path) if path.name in seen or path.name in BASELINES else path.name
        seen.add(name)
        systems.append(System(name, "arc", str(path)))
    for b in baselines:
        module, package = BASELINES[b]
        if importlib.util.find_spec(module) is None:  # found is not enough: the worker imports
            skipped.append({"system": b, "reason": f"{package} is not installed"})
            continue
        if b == "llama.cpp":
            gguf = loader.gguf_source(model)
            if gguf is None:
                skipped.append({"system": b, "reason": f"{model} has no GGUF file"})
                continue
            systems.append(System(b, b, str(gguf)))
        else:
            systems.append(System(b, b, directory))
    return systems, skipped


def _command(a: argparse.Namespace) -> str:
    """The command line that reproduces this run."""
    args = ["arc", "bench", *a.engines]
    if a.model:
        args += ["--model", a.model]
    args += ["--baselines", a.baselines]
    if a.prompts:
        args += ["--prompts", a.prompts]
    args += ["--new-tokens", str(a.new_tokens), "--rounds", str(a.rounds)]
    if a.threads:
        args += ["--threads", str(a.threads)]
    if a.temperature > 0:
        args += ["--temperature", str(a.temperature), "--top-p", str(a.top_p)]
        args += ["--top-k", str(a.top_k), "--seed", str(a.seed)]
    return shlex.join(args)


def _sampling_of(a: argparse.Namespace) -> dict:
    return {"temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k, "seed": a.seed}


def _sampling(spec: dict, i: int):
    """arc's SamplingParams of the job's `sampling` for prompt i (seed + i), validated."""
    from arc.runtime.sampling import SamplingParams

    seed = spec["seed"] + i if spec["temperature"] > 0 else None
    return SamplingParams(spec["temperature"], spec["top_k"], spec["top_p"], seed).validate()


# ---------------------------------------------------------------- driving the workers


def run_rounds(
    systems: list[System], job: dict, rounds: int, *, progress: bool = False
) -> tuple[dict[str, list[dict]], list[dict]]:
    """Interleaved rounds, one worker process per system per round: ({name: [round result]},
    notes for systems whose worker found its package missing, which then run no more)."""
    from tqdm import tqdm

    raw: dict[str, list[dict]] = {s.name: [] for s in systems}
    live, skipped = list(systems), []
    bar = tqdm(total=rounds * len(live), disable=not progress, file=sys.stderr, leave=False)
    try:
        with tempfile.TemporaryDirectory(prefix="arc-bench-") as tmp:
            for r in range(rounds):
                for s in list(live):
                    bar.set_description(f"round {r + 1}/{rounds}: {s.name}")
                    out = _spawn(s, job, Path(tmp) / f"{r}-{systems.index(s)}")
                    bar.update(1)
                    if "skipped" in out:
                        print(f"arc: note: {s.name} skipped: {out['skipped']}", file=sys.stderr)
                        skipped.append({"system": s.name, "reason": out["skipped"]})
                        live.remove(s)
                        del raw[s.name]
                        bar.total -= rounds - r - 1
                        continue
                    raw[s.name].append(out)
    finally:
        bar.close()
    return raw, skipped


def _spawn(s: System, job: dict, stem: Path) -> dict:
    """Run one worker to the end; on Ctrl-C or SIGTERM kill it before passing the signal on."""
    out = stem.with_suffix(".out.json")
    job_file = stem.with_suffix(".job.json")
    job_file.write_text(json.dumps({**job, "kind": s.kind, "source": s.source, "out": str(out)}))
    n = str(job["threads"])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env |= {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
    proc = None
    try:
        with _signals_held():  # a Ctrl-C while the worker starts must still find `proc`
            proc = subprocess.Popen(
                [sys.executable, "-m", "arc.bench", "--worker", str(job_file)],
                stdout=subprocess.DEVNULL,  # libraries that print (llama.cpp) never reach --json
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                start_new_session=True,  # a terminal's Ctrl-C reaches the driver, which ends it
            )
        _, err = proc.communicate()
    except BaseException:
        if proc is not None:
            _kill_group(proc)
        raise
    if proc.returncode == 2:
        lines = [ln for ln in err.splitlines() if ln.startswith("arc: error: ")]
        raise ArcError(lines[-1].removeprefix("arc: error: ") if lines else err.strip()[-500:])
    if proc.returncode != 0:
        raise RuntimeError(f"{s.name}: worker exited with {proc.returncode}:\n{err[-4000:]}")
    return json.loads(out.read_text())


@contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM until the block is done, then deliver them. Starting a worker
    is a window: a Ctrl-C raised inside Popen, after the fork, left the new worker running
    with no handle to kill it (seen under load: the worker outlived `arc bench`)."""
    kinds = (signal.SIGINT, signal.SIGTERM)
    main = threading.current_thread() is threading.main_thread()
    if not main or any(signal.getsignal(k) is None for k in kinds):
        yield  # handlers run in the main thread only; one set outside Python cannot be restored
        return
    held: list[int] = []
    before = {k: signal.signal(k, lambda signum, frame: held.append(signum)) for k in kinds}
    try:
        yield
    finally:
        for k, handler in before.items():
            signal.signal(k, handler)
        for signum in held[:1]:  # raised here, as it would have been, with the handle kept
            signal.raise_signal(signum)


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the worker and what it started (torch.compile's compile workers): its session's
    process group, which is its own pid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# ---------------------------------------------------------------- figures


def round_figures(prompts: list[dict]) -> dict[str, float | None]:
    """One round's decode tok/s (all decode tokens / all decode time) and mean prefill ms."""
    tokens = sum(p["produced"] for p in prompts)
    seconds = sum(p["decode_ms"] for p in prompts) / 1e3
    return {
        "tok_s": tokens / seconds if tokens and seconds > 0 else None,
        "prefill_ms": statistics.fmean(p["prefill_ms"] for p in prompts),
    }


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(
    raw: dict[str, list[dict]],
    systems: list[System],
    skipped: list[dict],
    settings: dict,
    command: str,
) -> dict[str, Any]:
    """The report: raw per-round figures, medians over rounds, ratios, agreement with hf."""
    ran = [s for s in systems if s.name in raw]
    for rounds in raw.values():
        for rnd in rounds:
            rnd.update(round_figures(rnd["prompts"]))
    medians = {name: _medians(rounds) for name, rounds in raw.items()}
    bases = [s.name for s in ran if s.kind != "arc"]
    ratios = {
        name: {b: _ratio(medians[name]["tok_s"], medians[b]["tok_s"]) for b in bases}
        for name in raw
    }
    return {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine(),
        "settings": settings,
        "systems": [
            {
                "name": s.name,
                "kind": s.kind,
                "source": s.source,
                "versions": raw[s.name][0]["versions"],
            }
            for s in ran
        ],
        "skipped": skipped,
        "rounds": raw,
        "medians": medians,
        "tokens_per_forward": {name: _tokens_per_forward(r) for name, r in raw.items()},
        "same_ids_as_hf": _same_ids(raw, {s.name: s.kind for s in ran}, settings["greedy"]),
        "ratios": ratios,
    }


def _medians(rounds: list[dict]) -> dict[str, float | None]:
    tok_s = _median([r["tok_s"] for r in rounds])
    return {
        "tok_s": tok_s,
        "ms_per_token": 1e3 / tok_s if tok_s else None,
        "prefill_ms": _median([r["prefill_ms"] for r in rounds]),
        "warmup_s": _median([r["warmup_s"] for r in rounds]),
        "load_s": _median([r["load_s"] for r in rounds]),
    }


def _ratio(x: float | None, base: float | None) -> float | None:
    return x / base if x and base else None


def _tokens_per_forward(rounds: list[dict]) -> float | None:
    """Decode tokens per full-model forward after prefill, where the worker counted forwards."""
    rows = [p for r in rounds for p in r["prompts"]]
    if any(p["forwards"] is None for p in rows):
        return None
    forwards = sum(p["forwards"] for p in rows)
    return sum(p["produced"] for p in rows) / forwards if forwards else None


def _same_ids(
    raw: dict[str, list[dict]], kinds: dict[str, str], greedy: bool = True
) -> dict[str, float | None]:
    """Fraction of (round, prompt) runs whose greedy ids equal hf's first round; None when hf
    did not run, for llama.cpp (4-bit weights: different ids are expected), and for every
    system when sampling (each draws its own)."""
    if "hf" not in raw or not greedy:
        return {name: None for name in raw}
    ref = [p["ids"] for p in raw["hf"][0]["prompts"]]
    out = {}
    for name, rounds in raw.items():
        runs = [p["ids"] == want for r in rounds for p, want in zip(r["prompts"], ref, strict=True)]
        out[name] = None if kinds[name] == "llama.cpp" else sum(runs) / len(runs)
    return out


def machine() -> dict[str, Any]:
    """CPU model, logical cores, and the versions of the driver's libraries."""
    import platform

    import torch
    import transformers

    from arc.cpu import host_name

    return {
        "cpu": host_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# ---------------------------------------------------------------- output


def _fmt(v: float | None, spec: str, unit: str = "") -> str:
    return "-" if v is None else format(v, spec) + unit


def table(report: dict) -> tuple[list[str], list[list[str]]]:
    """(column names, rows of cells) for the plain, rich and Markdown tables."""
    names = [s["name"] for s in report["systems"]]
    kinds = {s["name"]: s["kind"] for s in report["systems"]}
    bases = [n for n in names if kinds[n] != "arc"]
    head = ["system", "tok/s", "ms/token", "prefill ms", "tok/forward", "same ids as hf"]
    head += ["warm-up s", *(f"x {b}" for b in bases)]
    rows = []
    for n in names:
        m, same = report["medians"][n], report["same_ids_as_hf"][n]
        hf_ran = "hf" in report["medians"]
        same_cell = "n/a (GGUF)" if kinds[n] == "llama.cpp" and hf_ran else _fmt(same, ".2f")
        rows.append(
            [
                n,
                _fmt(m["tok_s"], ".1f"),
                _fmt(m["ms_per_token"], ".2f"),
                _fmt(m["prefill_ms"], ".1f"),
                _fmt(report["tokens_per_forward"][n], ".2f"),
                same_cell,
                _fmt(m["warmup_s"], ".2f"),
                *(_fmt(report["ratios"][n][b], ".2f", "x") for b in bases),
            ]
        )
    return head, rows


def header(report: dict) -> list[str]:
    s, m = report["settings"], report["machine"]
    versions = [x["versions"].get("llama_cpp") for x in report["systems"]]
    llama = "".join(f", llama-cpp-python {v}" for v in versions if v)
    lines = [
        f"arc bench: {s['model']}, {s['prompts']} prompts ({Path(s['prompts_file']).name}), "
        f"{_how(s)}, batch 1, up to {s['new_tokens']} new tokens, threads {s['threads']}, median "
        f"of {s['rounds']} interleaved rounds, each system in its own process",
        f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, transformers "
        f"{m['transformers']}{llama}, python {m['python']}; {report['date']}",
    ]
    lines += [f"note: {r['system']} skipped: {r['reason']}" for r in report["skipped"]]
    return lines


def _how(settings: dict) -> str:
    x = settings.get("sampling")
    if not x:
        return "greedy"
    return f"sampled (temperature {x['temperature']}, top-p {x['top_p']}, top-k {x['top_k']})"


FOOTER = (
    "tok/s: decode tokens after the first / decode time (prefill excluded); tok/forward: "
    "tokens per full-model forward (where counted); x B: tok/s over B's, same run; llama.cpp "
    "runs the GGUF's quantized weights, so its ids are not compared (nor anyone's when sampling)"
)


def plain(report: dict) -> str:
    head, rows = table(report)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def fmt_row(cells: list[str]) -> str:
        pairs = zip(cells, widths, strict=True)
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(pairs))

    body = [fmt_row(head), *(fmt_row(r) for r in rows)]
    return "\n".join([*header(report), "", *body, "", FOOTER])


def print_rich(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    head, rows = table(report)
    lines = header(report)
    t = Table(title=lines[0], caption="\n".join([*lines[1:], FOOTER]), caption_justify="left")
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for r in rows:
        t.add_row(*r)
    Console().print(t)


def markdown(report: dict) -> str:
    """The table as Markdown with the machine, settings and date (benchmarks/RESULTS.md)."""
    head, rows = table(report)
    lines = header(report)
    out = [f"## arc bench, {report['date']}", "", *(f"{ln}  " for ln in lines), ""]
    out += [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---", *["---:"] * (len(head) - 1)]) + "|",
    ]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out += ["", FOOTER + ".", "", f"Reproduce: `{report['command']}`", ""]
    return "\n".join(out)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `path` whole or not at all: a temp file in the same directory, then a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; this is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------- workers (one process each)


class _Missing(Exception):
    """The worker's package does not import: the system is skipped with a note."""


def _row(ids: list[int], produced: int, prefill_s: float, decode_s: float, forwards, eos):
    return {
        "ids": ids,
        "produced": produced,  # decode tokens: those after the first emission
        "prefill_ms": prefill_s * 1e3,
        "decode_ms": decode_s * 1e3,
        "forwards": forwards,  # full-model forwards after prefill; None when not counted
        "stop_reason": "eos" if ids and ids[-1] in set(eos) else "max_new_tokens",
    }


def worker_arc(job: dict) -> dict:
    """An .arc engine through arc's runtime, timed by the runtime's own prefill/decode timers."""
    import torch

    import arc
    from arc.runtime.load import load_engine

    torch.set_num_threads(job["threads"])
    t = time.perf_counter()
    eng = load_engine(job["source"])
    load_s = time.perf_counter() - t
    for text, ids in zip(job["texts"], job["prompts"], strict=True):
        if eng.prompt_ids(text) != ids:
            raise ArcError(
                f"{job['source']}: its tokenizer gives other prompt ids than the model's "
                f"(built from {eng.manifest['model']['name']}; pass that as --model)"
            )
    gen, rows = eng.generator, []
    with torch.inference_mode():
        t = time.perf_counter()
        gen.generate(job["warmup"], max_new_tokens=job["warmup_tokens"])
        warmup_s = time.perf_counter() - t
        for i, ids in enumerate(job["prompts"]):
            sampling = _sampling(job["sampling"], i)
            r = gen.generate(ids, max_new_tokens=job["new_tokens"], sampling=sampling)
            times = (r.prefill_ms / 1e3, r.decode_ms / 1e3)
            row = _row(r.token_ids, len(r.token_ids) - 1, *times, r.forward_passes, job["eos"])
            rows.append(row | {"stop_reason": r.stop_reason})
    versions = {"arc": arc.__version__, "torch": torch.__version__}
    return {"load_s": load_s, "warmup_s": warmup_s, "versions": versions, "prompts": rows}


def worker_hf(job: dict) -> dict:
    """transformers' generate (hf, hf-compile, hf-prompt-lookup), fp32, greedy or sampled."""
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise _Missing(f"transformers does not import ({e})") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(job["threads"])
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["source"], dtype=torch.float32).eval()
    extra = _hf_mode(model, job)
    calls = [0]
    if job["kind"] != "hf-compile":  # a hook in a compiled graph would not count reliably
        model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    load_s = time.perf_counter() - t

    def one(ids: list[int], n: int, i: int = 0) -> dict:
        calls[0] = 0
        how = _hf_sampling(job["sampling"], i)
        row = _hf_generate(model, ids, n, job["eos"], extra | how)
        counted = job["kind"] != "hf-compile" and calls[0] > 0
        return row | {"forwards": calls[0] - 1 if counted else None}

    t = time.perf_counter()
    one(job["warmup"], job["warmup_tokens"])  # hf-compile: torch.compile runs here
    warmup_s = time.perf_counter() - t
    rows = [one(ids, job["new_tokens"], i) for i, ids in enumerate(job["prompts"])]
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    return {"load_s": load_s, "warmup_s": warmup_s, "versions": versions, "prompts": rows}


def _hf_sampling(spec: dict, i: int) -> dict:
    """generate's sampling arguments for prompt i, its generator seeded with seed + i."""
    import torch

    if spec["temperature"] <= 0:
        return {"do_sample": False}
    torch.manual_seed(spec["seed"] + i)
    how = {"do_sample": True, "temperature": spec["temperature"], "top_p": spec["top_p"]}
    return how | {"top_k": spec["top_k"]}  # 0 turns off the generation config's top-k


def _hf_mode(model, job: dict) -> dict:
    """Set the model up for its baseline; returns generate's extra keyword arguments."""
    if job["kind"] == "hf-prompt-lookup":
        return {"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS}
    if job["kind"] == "hf-compile":
        from transformers import CompileConfig

        gc = model.generation_config
        gc.cache_implementation = "static"
        gc.max_cache_len = job["max_len"]  # one cache shape for every prompt: one compile
        cc = CompileConfig(fullgraph=True, mode="default")  # CUDA graphs do not apply on CPU
        cc._compile_all_devices = True  # transformers compiles the decode step on GPUs only
        gc.compile_config = cc
    return {}


def _hf_generate(model, ids: list[int], n: int, eos: list[int], extra: dict) -> dict:
    """One generate (greedy unless `extra` samples); a streamer timestamps every emission (the
    first is the prompt)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.puts: list[tuple[float, int]] = []

        def put(self, value):
            self.puts.append((time.perf_counter(), int(value.numel())))

        def end(self):
            pass

    clock, x = Clock(), torch.tensor([ids])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            eos_token_id=eos or None,
            pad_token_id=eos[0] if eos else 0,
            streamer=clock,
            **extra,
        )
    new = out[0, len(ids) :].tolist()
    (t1, k1), (tn, _) = clock.puts[1], clock.puts[-1]  # puts[0] is the prompt itself
    return _row(new, len(new) - k1, t1 - t0, tn - t1, None, eos)


def worker_llama(job: dict) -> dict:
    """llama-cpp-python on the GGUF; the first token its generator yields ends prefill."""
    try:
        import llama_cpp
        from llama_cpp import Llama
    except ImportError as e:
        raise _Missing(f"llama-cpp-python is not installed ({e})") from None
    n = job["threads"]
    t = time.perf_counter()
    llm = Llama(
        model_path=job["source"],
        n_ctx=job["max_len"],
        n_threads=n,
        n_threads_batch=n,
        n_batch=512,
        verbose=False,
    )
    load_s = time.perf_counter() - t
    eos = set(job["eos"]) | {llm.token_eos()}
    spec = job["sampling"]
    if spec["temperature"] > 0:  # arc's filters, llama.cpp's others off
        how = {"temp": spec["temperature"], "top_p": spec["top_p"], "top_k": spec["top_k"]}
        how |= {"min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0}
    else:
        how = {"temp": 0.0, "top_k": 1}

    def one(ids: list[int], limit: int, i: int = 0) -> dict:
        llm.reset()
        llm.set_seed(spec["seed"] + i)
        toks: list[int] = []
        t0 = time.perf_counter()
        first = t0
        for tok in llm.generate(ids, reset=True, **how):
            if not toks:
                first = time.perf_counter()
            toks.append(int(tok))
            if tok in eos or len(toks) >= limit:
                break
        end = time.perf_counter()
        return _row(toks, len(toks) - 1, first - t0, end - first, None, eos)

    t = time.perf_counter()
    one(job["warmup"], job["warmup_tokens"])
    warmup_s = time.perf_counter() - t
    rows = [one(ids, job["new_tokens"], i) for i, ids in enumerate(job["prompts"])]
    versions = {"llama_cpp": getattr(llama_cpp, "__version__", "?")}
    return {"load_s": load_s, "warmup_s": warmup_s, "versions": versions, "prompts": rows}


WORKERS = {
    "arc": worker_arc,
    "hf": worker_hf,
    "hf-compile": worker_hf,
    "hf-prompt-lookup": worker_hf,
    "llama.cpp": worker_llama,
}


def worker_main(job_file: str) -> int:
    """`python -m arc.bench --worker JOB`: run one system on the job, write its result file;
    exit 2 with one `arc: error:` line on bad input (a corrupt engine payload, say)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    job = json.loads(Path(job_file).read_text())
    try:
        out = WORKERS[job["kind"]](job)
    except _Missing as e:
        out = {"skipped": str(e)}
    except ArcError as e:
        print(f"arc: error: {e}", file=sys.stderr)
        return 2
    Path(job["out"]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2]))
    sys.exit("usage: python -m arc.bench --worker JOB.json (use `arc bench` instead)")
