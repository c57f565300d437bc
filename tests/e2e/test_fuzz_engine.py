"""Fuzz the engine reader (issue 5, section 5): a few hundred engines damaged at random — byte
flips, truncations, manifest mutations with the self-digest recomputed (payload names
included), zip-level tricks — each must give exit 0 or 2 with no traceback and no signal, and
write nothing outside arc's cache. Most cases run through arc.cli.main in this process (a fresh
process per case would take minutes); every SUBPROCESS_EVERY-th runs the real CLI in a fresh
process. The seed is fixed, so a failure names a case that reproduces."""

from __future__ import annotations

import copy
import hashlib
import json
import random
import shutil
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.e2e.engine_tools import (
    MANIFEST,
    MANIFEST_SHA,
    file_entry,
    read_members,
    run_in_process,
    run_subprocess,
    tree,
    write_engine,
)

SEED = 20261123
COUNTS = {"flip": 60, "truncate": 25, "manifest": 110, "names": 45, "zip": 15}
SUBPROCESS_EVERY = 25
ODD_VALUES = [None, 0, -1, 1, 2**63, 1e308, -0.5, True, "", "x", "../x", [], [1], {}, {"a": 1}]
NAMES = [
    "../../../escaped",
    "ABSOLUTE",  # replaced by an absolute path inside the test's tmp dir
    "a\\b",
    "artifacts/../../../escaped",
    "tokenizer/../weights.safetensors",
    "",
    ".",
    "..",
    "tokenizer/",
    "artifacts//x",
    "artifacts/.hidden",
    "artifacts/a/b",
    "x\x00y",
    "weights.safetensors/",
    "\u00e9t\u00e9.json",
    "tokenizer/" + "n" * 300,
    "artifacts/decode.pt2",
    "artifacts/prefill.pt2",
    "tokenizer/vocab.json",
    "tokenizer/tokenizer.json",
    "extra.bin",
]


def test_fuzz_engine(eager_engine, tmp_path, record_property):
    rng = random.Random(SEED)
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    absolute = str(tmp_path / "abs" / "escaped")
    cases = list(_cases(rng, eager_engine, absolute))
    exits: Counter = Counter()
    t0 = time.perf_counter()
    for i, (label, data) in enumerate(cases):
        path = work / "case.arc"
        path.write_bytes(data)
        args = ("inspect", str(path)) if i % 5 == 4 else _run_args(path)
        before = tree(tmp_path, skip=cache)
        fresh = i % SUBPROCESS_EVERY == 0
        done = _run(args, cache, work, fresh, f"case {i} ({label})")
        _check(done, f"case {i} ({label}, {'subprocess' if fresh else 'in-process'})")
        assert tree(tmp_path, skip=cache) == before, f"case {i} ({label}) wrote outside the cache"
        exits[done.returncode] += 1
        shutil.rmtree(cache / "engines", ignore_errors=True)  # keep the cache small
    seconds = time.perf_counter() - t0
    print(f"\nfuzz: {len(cases)} damaged engines in {seconds:.1f} s, exit codes {dict(exits)}")
    record_property("fuzz_cases", len(cases))
    assert len(cases) == sum(COUNTS.values())
    assert exits[2] > len(cases) // 2 and exits[0] > 0  # both paths were exercised


def _run_args(path: Path) -> tuple[str, ...]:
    return ("run", str(path), "--prompt", "hi", "--max-new-tokens", "2", "--json")


def _run(args, cache: Path, work: Path, fresh: bool, label: str):
    if fresh:
        return run_subprocess(*args, cache=cache, cwd=work)
    try:
        return run_in_process(*args, cache=cache)
    except BaseException:  # a traceback the user would have seen: that is the failure
        raise AssertionError(f"{label}: exception escaped\n{traceback.format_exc()}") from None


def _check(done, label: str) -> None:
    assert done.returncode in (0, 2), f"{label}: exit {done.returncode}\n{done.stderr[-2000:]}"
    assert "Traceback" not in done.stderr, f"{label}:\n{done.stderr[-2000:]}"
    if done.returncode == 2:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("arc: error: "), f"{label}: {lines}"


# ---------------------------------------------------------------- the cases


def _cases(rng: random.Random, engine: Path, absolute: str) -> Iterator[tuple[str, bytes]]:
    data = engine.read_bytes()
    members = read_members(engine)
    manifest = json.loads(members.pop(MANIFEST))
    del members[MANIFEST_SHA]
    for _ in range(COUNTS["flip"]):
        yield _flip(rng, data)
    for _ in range(COUNTS["truncate"]):
        cut = rng.choice([rng.randrange(len(data)), len(data) - rng.randrange(1, 4096)])
        yield f"truncate to {cut}", data[:cut]
    for _ in range(COUNTS["manifest"]):
        m = copy.deepcopy(manifest)
        label = _mutate_tree(rng, m)
        yield f"manifest {label}", _zip(m, members)
    for _ in range(COUNTS["names"]):
        m, mem = copy.deepcopy(manifest), dict(members)
        label = _mutate_names(rng, m, mem, absolute)
        yield f"names {label}", _zip(m, mem)
    for _ in range(COUNTS["zip"]):
        yield _zip_trick(rng, manifest, members)


def _flip(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """Flip 1-8 bytes; half the time in the last 4 KiB, where the zip's directory is."""
    out = bytearray(data)
    offsets = []
    for _ in range(rng.choice([1, 1, 2, 3, 8])):
        tail = rng.random() < 0.5
        at = len(out) - 1 - rng.randrange(min(4096, len(out))) if tail else rng.randrange(len(out))
        out[at] ^= rng.randrange(1, 256)
        offsets.append(at)
    return f"flip {offsets}", bytes(out)


def _zip(manifest: Any, members: dict[str, bytes], **options: Any) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        return write_engine(Path(d) / "e.arc", manifest, members, **options).read_bytes()


def _walk(rng: random.Random, root: dict) -> tuple[Any, Any, str]:
    """A random (container, key) inside `root`: a top-level key first (so the huge `ir` is one
    choice among ~16), then deeper with probability 0.6 at each level."""
    container, key = root, rng.choice(sorted(root))
    path = key
    while isinstance(container[key], dict | list) and container[key] and rng.random() < 0.6:
        container = container[key]
        key = (
            rng.choice(sorted(container))
            if isinstance(container, dict)
            else rng.randrange(len(container))
        )
        path += f".{key}"
    return container, key, path


def _mutate_tree(rng: random.Random, m: dict) -> str:
    container, key, path = _walk(rng, m)
    action = rng.choice(["delete", "set", "set", "number"])
    if action == "delete" and isinstance(container, dict):
        del container[key]
        return f"delete {path}"
    if action == "number":
        value = rng.choice([0, 1, 2, -1, 7, 10**9, 0.5])
    else:
        value = copy.deepcopy(rng.choice(ODD_VALUES))
    container[key] = value
    return f"set {path} = {value!r}"


def _mutate_names(rng: random.Random, m: dict, members: dict[str, bytes], absolute: str) -> str:
    files = m["files"]
    name = rng.choice(NAMES)
    name = absolute if name == "ABSOLUTE" else name
    old = rng.choice(sorted(files))
    action = rng.choice(["rename", "rename-member-too", "add", "add-unlisted", "delete", "entry"])
    if action.startswith("rename"):
        files[name] = files.pop(old)
        if action == "rename-member-too":
            members[name] = members.pop(old)
    elif action == "add":
        payload = rng.randbytes(rng.choice([0, 5, 300]))
        files[name], members[name] = file_entry(payload), payload
    elif action == "add-unlisted":
        members[name] = b"unlisted"
    elif action == "delete":
        del files[old]
        if rng.random() < 0.5:
            del members[old]
    else:
        files[old] = rng.choice(
            [
                {"sha256": hashlib.sha256(b"").hexdigest(), "size": files[old]["size"]},
                {"sha256": files[old]["sha256"], "size": files[old]["size"] + 1},
                {"sha256": files[old]["sha256"]},
                rng.choice(ODD_VALUES),
            ]
        )
    return f"{action} {old!r} -> {name[:40]!r}"


def _zip_trick(rng: random.Random, manifest: dict, members: dict[str, bytes]) -> tuple[str, bytes]:
    name = rng.choice(sorted(members) + [MANIFEST])
    trick = rng.choice(["compress", "duplicate", "stale-digest"])
    if trick == "compress":
        return f"compress {name}", _zip(manifest, members, compress=(name,))
    if trick == "duplicate" and name != MANIFEST:
        return f"duplicate {name}", _zip(manifest, members, duplicate=(name,))
    m = copy.deepcopy(manifest)
    m["runtime"]["prefill_chunk"] = rng.randrange(1, 64)
    return "edited, digest not recomputed", _zip(m, members, digest=False, old_digest=b"0" * 64)
