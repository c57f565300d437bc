"""Pass registry, pipeline specs, and the PassManager (after MLIR's and TVM's pass managers).

A pass is a pure function `(Module, PassContext, **options) -> Module`, registered with a name,
typed keyword-only options (read from its signature), and the passes it must run after. A
pipeline spec is text: `"kv-fusion,layer-skip{ratio=0.3},spec-tree{depth=5}"`. The PassManager
checks order (it never reorders), runs instruments around each pass, and keeps a PassRecord per
pass for the engine manifest.
"""

from __future__ import annotations

import importlib
import inspect
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from arc.errors import ArcError
from arc.ir import Module, dumps, format_module
from arc.verify import VerifyError, verify

PassFn = Callable[..., Module]


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: PassFn
    after: tuple[str, ...]
    lossless: bool | Callable[[Mapping[str, Any]], bool]  # a callable: depends on the options
    options: Mapping[str, tuple[type, Any]]  # option -> (type, default)

    def is_lossless(self, opts: Mapping[str, Any]) -> bool:
        return self.lossless(opts) if callable(self.lossless) else self.lossless

    @property
    def doc(self) -> str:
        first = (inspect.getdoc(inspect.getmodule(self.fn)) or "").split("\n")[0]
        return first.removeprefix(f"{self.name}: ")


@dataclass
class PassContext:
    """What a pass may know beyond the module: the target device, free-form facts, and for
    passes that measure the model at compile time (layer-skip's calibration) its fp32 weights
    by IR name and its tokenizer (None where the caller has none: such a pass must then be
    told what to do by its options, or refuse)."""

    device: str = "cpu"
    target: str = "torch"
    facts: dict[str, Any] = field(default_factory=dict)
    weights: Mapping[str, Any] | None = None  # IR weight name -> fp32 torch.Tensor
    tokenizer: Any = None


@dataclass(frozen=True)
class PassRecord:
    name: str
    options: dict[str, Any]
    wall_ms: float
    nodes_in: int
    nodes_out: int
    changed: bool
    facts: dict[str, Any] = field(default_factory=dict)  # what the pass put in ctx.facts[name]


REGISTRY: dict[str, PassInfo] = {}


def register_pass(name: str, *, after: Sequence[str] = (), lossless: bool | Callable = True):
    """Decorator: register `fn` as pass `name`; its keyword-only parameters are its options."""

    def deco(fn: PassFn) -> PassFn:
        sig = inspect.signature(fn)
        hints = inspect.get_annotations(fn, eval_str=True)
        opts = {
            p.name: (hints[p.name], p.default)
            for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        REGISTRY[name] = PassInfo(name, fn, tuple(after), lossless, opts)
        return fn

    return deco


def registry() -> dict[str, PassInfo]:
    importlib.import_module("arc.passes")  # each pass registers itself on import
    return REGISTRY


# ---------------------------------------------------------------- specs

_ITEM = re.compile(r"\s*([a-z0-9][a-z0-9-]*)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


def parse_spec(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """`"a,b{x=1,y=true}"` -> [("a", {}), ("b", {"x": 1, "y": True})], typed by each pass."""
    passes = registry()
    out, pos, spec = [], 0, spec.strip()
    while pos < len(spec):
        m = _ITEM.match(spec, pos)
        if not m or m.end() == pos:
            raise ArcError(f"bad pipeline spec near {spec[pos:]!r}")
        name, body = m.group(1), m.group(2)
        if name not in passes:
            raise ArcError(f"unknown pass {name!r}; known: {', '.join(sorted(passes))}")
        out.append((name, _parse_options(passes[name], body or "")))
        pos = m.end()
    return out


def _parse_options(info: PassInfo, body: str) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip().replace("-", "_")  # kv-dtype=int8 names option kv_dtype
        if not eq or key not in info.options:
            known = ", ".join(info.options) or "none"
            raise ArcError(f"pass {info.name}: bad option {item!r} (options: {known})")
        if key in opts:  # a second value would silently win; say which one was meant
            raise ArcError(f"pass {info.name}: option {key} given twice")
        opts[key] = _convert(info.name, key, info.options[key][0], raw.strip())
    return opts


def _convert(pname: str, key: str, typ: type, raw: str) -> Any:
    try:
        if typ is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        return typ(raw)
    except ValueError:
        kind = {int: "an integer", float: "a number", bool: "true or false"}.get(typ, typ.__name__)
        raise ArcError(f"pass {pname}: option {key}={raw!r} must be {kind}") from None


def format_spec(items: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    def one(name, opts):
        body = ",".join(
            f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in opts.items()
        )
        return f"{name}{{{body}}}" if opts else name

    return ",".join(one(n, o) for n, o in items)


# ---------------------------------------------------------------- instruments


class Instrument:
    """Hooks around each pass; the PassManager calls them in order."""

    def before(self, name: str, module: Module) -> None: ...

    def after(self, name: str, module: Module) -> None: ...


class VerifyInstrument(Instrument):
    def after(self, name: str, module: Module) -> None:
        try:
            verify(module)
        except VerifyError as e:
            raise PassError(f"pass {name} produced an invalid module: {e}") from None


class PrintAfter(Instrument):
    """Prints the IR after the named passes (all passes when none are named)."""

    def __init__(self, names: Sequence[str] = (), write=print):
        names = [n.strip() for n in names if n.strip()]
        known = registry()
        unknown = [n for n in names if n not in known]
        if unknown:  # a typo would otherwise print nothing, silently
            raise ArcError(
                f"--print-after: unknown pass {unknown[0]!r}; known: {', '.join(sorted(known))}"
            )
        self.names, self.write = set(names), write

    def after(self, name: str, module: Module) -> None:
        if not self.names or name in self.names:
            self.write(f"// ---- IR after {name}\n{format_module(module)}")


class DumpDir(Instrument):
    """Writes the IR (text and JSON) before the first pass and after each pass."""

    def __init__(self, directory: Path):
        self.dir, self.count = Path(directory), 0
        if self.dir.exists() and not self.dir.is_dir():
            raise ArcError(f"--dump-ir {self.dir} exists and is not a directory")

    def before(self, name: str, module: Module) -> None:
        if self.count == 0:
            self._dump("input", module)

    def after(self, name: str, module: Module) -> None:
        self._dump(name, module)

    def _dump(self, name: str, module: Module) -> None:
        stem = self.dir / f"{self.count:02d}-{name}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            stem.with_suffix(".ir").write_text(format_module(module))
            stem.with_suffix(".json").write_text(dumps(module))
        except OSError as e:
            raise ArcError(f"--dump-ir {self.dir}: cannot write ({e.strerror or e})") from None
        self.count += 1


# ---------------------------------------------------------------- running


class PassError(ArcError):
    pass


class PassManager:
    def __init__(self, spec: str | Sequence[tuple[str, Mapping[str, Any]]], instruments=()):
        self.items = parse_spec(spec) if isinstance(spec, str) else [(n, dict(o)) for n, o in spec]
        self.instruments = [VerifyInstrument(), *instruments]
        self._check_order()

    def _check_order(self) -> None:
        passes, names = registry(), [n for n, _ in self.items]
        for i, name in enumerate(names):
            for dep in passes[name].after:
                if dep in names[i + 1 :]:
                    raise ArcError(f"pass {name} must run after {dep}; reorder the pipeline")

    def run(
        self, module: Module, ctx: PassContext | None = None
    ) -> tuple[Module, list[PassRecord]]:
        ctx, records, done = ctx or PassContext(), [], []
        for name, opts in self.items:
            for ins in self.instruments:
                ins.before(name, module)
            t0, prev = time.perf_counter(), ctx.facts.get(name)
            try:
                out = registry()[name].fn(module, ctx, **opts)
            except ArcError:
                raise
            except Exception as e:
                before = ", ".join(done) or "none"
                raise PassError(f"pass {name} failed (after: {before}): {e!r}") from e
            ms = (time.perf_counter() - t0) * 1e3
            for ins in self.instruments:
                ins.after(name, out)
            changed = out is not module and dumps(out) != dumps(module)
            facts = ctx.facts.get(name)
            facts = dict(facts) if isinstance(facts, dict) and facts is not prev else {}
            records.append(
                PassRecord(
                    name, opts, round(ms, 3), module.node_count(), out.node_count(), changed, facts
                )
            )
            module = out
            done.append(name)
        return module, records


def record_dicts(records: Sequence[PassRecord]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]
