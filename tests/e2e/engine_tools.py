"""Craft damaged engines from a good one, as an attacker or a bad disk would, for the tests of
arc/engine.py and arc/manifest.py. The self-digest is recomputed unless asked not to: it is no
protection against anyone who edits on purpose, so the checks behind it must hold alone."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST, MANIFEST_SHA = "manifest.json", "manifest.sha256"


def read_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def manifest_of(path: Path) -> dict[str, Any]:
    return json.loads(read_members(path)[MANIFEST])


def file_entry(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def write_engine(
    dst: Path,
    manifest: dict[str, Any] | bytes,
    members: dict[str, bytes],
    *,
    compress: tuple[str, ...] = (),
    duplicate: tuple[str, ...] = (),
    digest: bool = True,
    old_digest: bytes = b"",
) -> Path:
    """Write an engine zip: manifest.json (with its digest recomputed, or `old_digest`), then
    `members` in order; names in `compress` deflated, names in `duplicate` written twice."""
    text = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    sha = hashlib.sha256(text).hexdigest().encode() if digest else old_digest
    entries = [(MANIFEST, text), (MANIFEST_SHA, sha)] + list(members.items())
    entries += [(name, members[name]) for name in duplicate]
    with warnings.catch_warnings(), zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zf:
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": that is the point
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED if name in compress else zipfile.ZIP_STORED
            zf.writestr(info, data)
    return dst


def craft(
    src: Path,
    dst: Path,
    edit: Callable[[dict[str, Any]], object] | None = None,
    extra: dict[str, bytes] | None = None,
    **options: Any,
) -> Path:
    """Copy engine `src` to `dst`: `edit(manifest)` changes the manifest in place; `extra` adds
    members, listed in the manifest with their true size and SHA-256. `options` go to
    write_engine (compress, duplicate, digest)."""
    members = read_members(src)
    old_digest = members.pop(MANIFEST_SHA)
    manifest = json.loads(members.pop(MANIFEST))
    for name, data in (extra or {}).items():
        manifest["files"][name] = file_entry(data)
        members[name] = data
    if edit:
        edit(manifest)
    return write_engine(dst, manifest, members, old_digest=old_digest, **options)


def tree(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    """Every file and directory under `root` (except under `skip`): path -> (size, mtime_ns)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if skip is not None and Path(dirpath) == skip:
            dirnames.clear()
            continue
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            if skip is not None and p == skip:
                continue
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def run_in_process(*args: str, cache: Path) -> subprocess.CompletedProcess:
    """`arc ARGS` through arc.cli.main in this process (fast: no torch import per call), with
    ARC_CACHE=cache; returns what a subprocess would. An exception escaping main propagates:
    that is the traceback a user would see."""
    from arc.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = os.environ.get("ARC_CACHE")
    os.environ["ARC_CACHE"] = str(cache)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(args))
    finally:
        if old is None:
            del os.environ["ARC_CACHE"]
        else:
            os.environ["ARC_CACHE"] = old
    return subprocess.CompletedProcess(["arc", *args], rc, out.getvalue(), err.getvalue())


def run_subprocess(*args: str, cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`arc ARGS` in a fresh process, run in `cwd` with ARC_CACHE=cache."""
    return subprocess.run(
        [sys.executable, "-m", "arc.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "ARC_CACHE": str(cache)},
    )


def shared_objects(engine: Path, out: Path) -> list[Path]:
    """The native libraries inside an engine's AOTInductor packages, written under `out`."""
    found = []
    with zipfile.ZipFile(engine) as zf:
        for name in zf.namelist():
            if not name.endswith(".pt2"):
                continue
            with zipfile.ZipFile(io.BytesIO(zf.read(name))) as pt2:
                for member in pt2.namelist():
                    if member.endswith(".so"):
                        dst = out / f"{len(found)}.so"
                        dst.write_bytes(pt2.read(member))
                        found.append(dst)
    return found
