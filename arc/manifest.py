"""The engine manifest's schema, checked once (by arc.engine on every read) so that `arc run`,
`arc inspect` and every target can index the manifest without guarding each key.

A manifest that passes has every key the readers use, with the right type and range; the IR
itself is checked where it is parsed (`arc.ir.module_from_json` then `arc.verify.verify`). A
failure is one EngineError line naming the key, e.g. `manifest runtime.prefill_chunk: 0 is
below 1`. The self-digest does not make this redundant: anyone can recompute it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from arc.errors import EngineError

# What a type name in the schemas below accepts. bool is not an int here (JSON true is not 1).
_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "number": (int, float),
    "bool": (bool,),
    "dict": (dict,),
    "list": (list,),
}
TOP: dict[str, str] = {
    "arc_version": "str",
    "files": "dict",
    "model": "dict",
    "target": "dict",
    "device": "str",
    "dtype": "str",
    "pipeline": "str",
    "passes": "list",
    "decode_plan": "dict",
    "runtime": "dict",
    "tokenizer": "dict",
    "ir": "dict",
    "compile_s": "number",
    "build_s": "number",
}
SECTIONS: dict[str, dict[str, str]] = {
    "model": {"name": "str"},
    "target": {"name": "str"},
    "decode_plan": {"kind": "str", "options": "dict"},
    "runtime": {"max_seq_len": "int", "prefill_chunk": "int"},
    "tokenizer": {"dir": "str", "chat_template": "bool"},
}
FILE_ENTRY = {"sha256": "str", "size": "int"}
PASS_RECORD = {"name": "str", "wall_ms": "number", "nodes_in": "int", "nodes_out": "int"}
PASS_RECORD |= {"changed": "bool"}
MINIMUM = {"runtime.max_seq_len": 2, "runtime.prefill_chunk": 1}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def validate(manifest: dict[str, Any], path: Path | str) -> None:
    """Raise EngineError (one line, naming `path` and the key) unless `manifest` is well formed."""
    try:
        _validate(manifest)
    except _SchemaError as e:
        raise EngineError(f"{path}: manifest {e}; engine corrupt or crafted") from None


class _SchemaError(Exception):
    pass


def _validate(m: dict[str, Any]) -> None:
    _keys(m, TOP, "")
    for section, schema in SECTIONS.items():
        _keys(m[section], schema, section + ".")
    for key, low in MINIMUM.items():
        section, name = key.split(".")
        if m[section][name] < low:
            raise _SchemaError(f"{key}: {m[section][name]} is below {low}")
    for i, record in enumerate(m["passes"]):
        _keys(_dict(record, f"passes[{i}]"), PASS_RECORD, f"passes[{i}].")
    _files(m["files"])
    _layout(m)


def _keys(d: dict[str, Any], schema: dict[str, str], where: str) -> None:
    for key, type_name in schema.items():
        if key not in d:
            raise _SchemaError(f"lacks {where}{key}")
        _typed(d[key], type_name, where + key)


def _typed(value: Any, type_name: str, where: str) -> None:
    ok = isinstance(value, _TYPES[type_name]) and (type_name == "bool") == isinstance(value, bool)
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if not ok:
        raise _SchemaError(f"{where}: {type(value).__name__} where {type_name} belongs")


def _dict(value: Any, where: str) -> dict[str, Any]:
    _typed(value, "dict", where)
    return value


def _files(files: dict[str, Any]) -> None:
    for name, entry in files.items():
        where = f"files[{name[:60]!r}]"
        _keys(_dict(entry, where), FILE_ENTRY, where + ".")
        if not _SHA256.fullmatch(entry["sha256"]):
            raise _SchemaError(f"{where}.sha256 is not a SHA-256 hex digest")
        if entry["size"] < 0:
            raise _SchemaError(f"{where}.size is negative")


def _layout(m: dict[str, Any]) -> None:
    """The payloads the readers open are listed: weights, the tokenizer (from the engine's own
    `tokenizer/` payloads, never a directory named elsewhere), an aot engine's artifacts."""
    from arc.engine import ARTIFACTS, CORPUS, TOKENIZER, WEIGHTS

    files, target = m["files"], m["target"]
    if WEIGHTS not in files:
        raise _SchemaError(f"files lacks {WEIGHTS}")
    if m["tokenizer"]["dir"] != TOKENIZER:
        raise _SchemaError(f"tokenizer.dir is {m['tokenizer']['dir'][:60]!r}, not {TOKENIZER!r}")
    if not any(name.startswith(TOKENIZER + "/") for name in files):
        raise _SchemaError(f"files lists no {TOKENIZER}/ payload")
    opts = m["decode_plan"].get("options") if isinstance(m.get("decode_plan"), dict) else None
    if isinstance(opts, dict) and opts.get("corpus") and CORPUS not in files:
        raise _SchemaError(f"decode_plan asks for a corpus but files lacks {CORPUS}")
    if target.get("mode") == "aot" and not any(name.startswith(ARTIFACTS + "/") for name in files):
        raise _SchemaError(f"target is aot but files lists no {ARTIFACTS}/ payload")
    if "device" in target and target["device"] != m["device"]:
        raise _SchemaError("target.device and device disagree")


def module_of(manifest: dict[str, Any], path: Path | str):
    """The manifest's IR as a verified arc.ir.Module, or one EngineError line.

    Parsing is broad on purpose: any shape of JSON may sit under `ir` in a crafted engine, and
    whatever it breaks in the parser (KeyError, TypeError, a bad enum value, ...) means the same
    thing to the user. The checks after it keep the runtime's own reads in range."""
    from arc.ir import module_from_json
    from arc.verify import verify

    try:
        module = module_from_json(manifest["ir"])
        verify(module)
    except Exception as e:  # noqa: BLE001 - see the docstring
        why = " ".join(f"{type(e).__name__}: {e}".split())[:160]
        raise EngineError(f"{path}: IR in manifest unreadable ({why})") from None
    if module.kv.max_seq_len != manifest["runtime"]["max_seq_len"]:
        raise EngineError(f"{path}: manifest runtime.max_seq_len disagrees with the IR's KV cache")
    eos = module.meta.get("eos_ids", [])
    if not isinstance(eos, list | tuple) or not all(_is_int(t) for t in eos):
        raise EngineError(f"{path}: IR meta eos_ids is not a list of token ids")
    return module


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
