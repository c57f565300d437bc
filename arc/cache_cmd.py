"""`arc cache`: what arc keeps in its cache (sizes, last use), and `arc cache prune` to free it.

Converted models and unpacked engines accumulate: every engine a user runs is unpacked once
under `engines/<digest>`. Prune never removes an entry in use: a user holds a shared lock on it
(arc.cache.use_entry) and prune takes the lock exclusively without waiting, skipping what it
cannot lock. A leftover build directory (a crash mid-conversion) is freed once it is a day old,
since a younger one may belong to a build still running.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from arc.cache import LAST_USED, LOCK, cache_root, last_used, lock_path, try_lock_exclusive
from arc.errors import ArcError

KINDS = {"models": "model", "gguf": "gguf", "engines": "engine", "downloads": "download"}
PARTIAL_GRACE_S = 24 * 3600
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass
class Entry:
    path: Path
    kind: str
    size: int
    last_used: float
    partial: bool  # the leftover of a build that did not finish
    in_use: bool = False

    def to_json(self) -> dict:
        return asdict(self) | {"path": str(self.path)}


def parse_age(text: str) -> float:
    """Seconds in `7d`, `12h`, `30m`, `45s`, `2w`; a bare number is days."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise ArcError(f"--older-than {text!r}: give an age like 7d, 12h, 30m (a number is days)")
    return float(m.group(1)) * _UNITS[m.group(2) or "d"]


def entries(root: Path | None = None) -> list[Entry]:
    """Every entry in the cache, oldest use first."""
    root = root or cache_root()
    found = []
    for sub, kind in KINDS.items():
        d = root / sub
        if d.is_dir():
            found += [e for p in sorted(d.iterdir()) if (e := _entry(p, kind))]
    return sorted(found, key=lambda e: e.last_used)


def _entry(p: Path, kind: str) -> Entry | None:
    hidden = p.name.startswith(".")
    if hidden and (p.name.endswith(LOCK) or p.name.endswith(LAST_USED)):
        return None  # bookkeeping beside a file entry
    partial = (hidden and p.is_dir()) or p.name.endswith(".part")
    return Entry(p, kind, _size(p), last_used(p), partial, _busy(p) if not partial else False)


def _size(p: Path) -> int:
    """Bytes in the entry; files that vanish meanwhile (a concurrent prune) count as 0."""
    paths = [p] if not p.is_dir() else [Path(t, f) for t, _, fs in os.walk(p) for f in fs]
    total = 0
    for f in paths:
        try:
            total += f.lstat().st_size
        except OSError:
            pass
    return total


def _busy(p: Path) -> bool:
    """Whether some process holds the entry (only asked when it has a lock file at all)."""
    if not lock_path(p).exists():
        return False
    try:
        fd = try_lock_exclusive(p)
    except OSError:
        return False
    if fd is None:
        return True
    os.close(fd)
    return False


def prune(older_than_s: float = 0.0, dry_run: bool = False) -> tuple[list[Entry], list[Entry]]:
    """(freed, skipped in use): entries unused for `older_than_s` seconds, never one in use."""
    now, freed, busy = time.time(), [], []
    for e in entries():
        age = now - e.last_used
        if age < (max(older_than_s, PARTIAL_GRACE_S) if e.partial else older_than_s):
            continue
        if e.partial:
            if not dry_run:
                _remove(e.path)
            freed.append(e)
            continue
        try:
            fd = try_lock_exclusive(e.path)
        except OSError:
            fd = None  # cannot even open its lock (a read-only cache): leave it
        if fd is None:
            busy.append(e)
            continue
        try:
            if not dry_run:
                _remove(e.path)
        finally:
            os.close(fd)
        freed.append(e)
    return freed, busy


def _remove(p: Path) -> None:
    """Rename out of the way first (atomic: no user finds half an entry), then delete."""
    if p.is_dir():
        trash = Path(tempfile.mkdtemp(dir=p.parent, prefix=f".trash-{p.name}-"))
        os.replace(p, trash / p.name)
        shutil.rmtree(trash, ignore_errors=True)
        return
    for f in (p, p.with_name(f".{p.name}{LAST_USED}"), lock_path(p)):
        f.unlink(missing_ok=True)


# ---------------------------------------------------------------- the command


def cache_command(action: str, older_than: str | None, dry_run: bool, as_json: bool) -> int:
    """`arc cache [list|prune] [--older-than AGE] [--dry-run] [--json]`."""
    age = parse_age(older_than) if older_than is not None else 0.0
    if action == "prune":
        freed, busy = prune(age, dry_run)
        _report_prune(freed, busy, dry_run, as_json)
        return 0
    now = time.time()
    listed = [e for e in entries() if now - e.last_used >= age]
    if as_json:
        print(json.dumps({"root": str(cache_root()), "entries": [e.to_json() for e in listed]}))
    else:
        print(_table(listed))
    return 0


def _table(listed: list[Entry]) -> str:
    root = cache_root()
    total = sum(e.size for e in listed)
    lines = [f"{root}: {len(listed)} entries, {_mb(total)}"]
    if listed:
        lines.append(f"{'kind':<9} {'size':>11}  {'last used':<16}  entry")
    for e in listed:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        note = "  (in use)" if e.in_use else "  (unfinished build)" if e.partial else ""
        rel = e.path.relative_to(root)
        lines.append(f"{e.kind:<9} {_mb(e.size):>11}  {when:<16}  {rel}{note}")
    return "\n".join(lines)


def _report_prune(freed: list[Entry], busy: list[Entry], dry_run: bool, as_json: bool) -> None:
    if as_json:
        out = {
            "dry_run": dry_run,
            "freed": [e.to_json() for e in freed],
            "in_use": [e.to_json() for e in busy],
            "freed_bytes": sum(e.size for e in freed),
        }
        print(json.dumps(out))
        return
    verb = "would free" if dry_run else "freed"
    size = _mb(sum(e.size for e in freed))
    print(f"{verb} {size} in {len(freed)} entries; kept {len(busy)} in use")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
