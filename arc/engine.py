"""The .arc engine file: a zip of manifest.json, weights (safetensors), artifacts, tokenizer.

The manifest records format and arc versions, model and config, target and device, pass
records, decode plan, the IR, and the SHA-256 and size of every payload; `manifest.sha256`
holds the digest of manifest.json itself, so a hand edit is caught. Reading checks all of that
before any native code (an AOTInductor .so, say) is loaded, and never unpickles anything.
Writing goes to a temporary file renamed into place: a failed compile leaves no half file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arc import __version__
from arc.cache import cache_dir
from arc.errors import EngineError

FORMAT = "arc-engine"
FORMAT_VERSION = 1
MANIFEST, MANIFEST_SHA = "manifest.json", "manifest.sha256"
WEIGHTS = "weights.safetensors"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_engine(out: Path, manifest: dict[str, Any], payloads: dict[str, Path]) -> Path:
    """Write `payloads` (name in the zip -> file) and `manifest` (hashes added) to `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION, arc_version=__version__)
    manifest["files"] = {
        name: {"sha256": _sha256_file(p), "size": p.stat().st_size} for name, p in payloads.items()
    }
    text = json.dumps(manifest, indent=1, sort_keys=True).encode()
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.writestr(MANIFEST, text)
            zf.writestr(MANIFEST_SHA, hashlib.sha256(text).hexdigest())
            for name, path in payloads.items():
                zf.write(path, name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; an engine is an ordinary file
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@dataclass
class Engine:
    path: Path
    manifest: dict[str, Any]
    root: Path  # where the verified payloads are unpacked

    def file(self, name: str) -> Path:
        return self.root / name


def read_manifest(path: Path) -> dict[str, Any]:
    """The checked manifest of engine `path` (format, version, self-digest); payloads unread."""
    with _open_zip(path) as zf:
        return _manifest(zf, path)


def open_engine(path: Path, progress: Callable[[int], object] = lambda n: None) -> Engine:
    """Check everything in engine `path`, unpack its payloads to the cache, return them.

    `progress(n)` is called with each n bytes checked (for a progress bar)."""
    path = Path(path)
    with _open_zip(path) as zf:
        manifest = _manifest(zf, path)
        digest = hashlib.sha256(zf.read(MANIFEST)).hexdigest()
        root = cache_dir("engines") / digest
        fresh = not (root / ".complete").exists()
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".unpack-")) if fresh else None
        try:
            for name, want in manifest["files"].items():
                _check_member(zf, path, name, want, tmp, progress)
            if fresh:
                (tmp / ".complete").write_text("ok")
                try:
                    tmp.rename(root)  # atomic: a reader sees all payloads or none
                except OSError:
                    pass  # another process unpacked the same engine first; keep theirs
        finally:
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return Engine(path, manifest, root)


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not Path(path).is_file():
        raise EngineError(f"{path}: no such engine file")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise EngineError(f"{path}: not an arc engine, or truncated ({e})") from None


def _manifest(zf: zipfile.ZipFile, path: Path) -> dict[str, Any]:
    names = set(zf.namelist())
    if MANIFEST not in names or MANIFEST_SHA not in names:
        raise EngineError(f"{path}: not an arc engine (no manifest)")
    try:
        text, want = zf.read(MANIFEST), zf.read(MANIFEST_SHA).decode().strip()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise EngineError(f"{path}: manifest unreadable, engine corrupt ({e})") from None
    if hashlib.sha256(text).hexdigest() != want:
        raise EngineError(f"{path}: manifest.json was modified (checksum mismatch); rebuild it")
    try:
        manifest = json.loads(text)
    except ValueError:
        raise EngineError(f"{path}: manifest.json is not valid JSON") from None
    if manifest.get("format") != FORMAT:
        raise EngineError(f"{path}: not an arc engine (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise EngineError(
            f"{path}: engine format {manifest.get('format_version')} but this arc reads "
            f"{FORMAT_VERSION}; rebuild it with arc {__version__}"
        )
    return manifest


def _check_member(zf, path: Path, name: str, want: dict, unpack_to: Path | None, progress) -> None:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise EngineError(f"{path}: payload {name} is missing") from None
    if info.file_size != want["size"]:
        raise EngineError(f"{path}: payload {name} has the wrong size (truncated or replaced)")
    h = hashlib.sha256()
    dst = None
    if unpack_to is not None:
        (unpack_to / name).parent.mkdir(parents=True, exist_ok=True)
        dst = open(unpack_to / name, "wb")
    try:
        with zf.open(info) as src:
            while chunk := src.read(1 << 22):
                h.update(chunk)
                progress(len(chunk))
                if dst:
                    dst.write(chunk)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise EngineError(f"{path}: payload {name} unreadable, engine corrupt ({e})") from None
    finally:
        if dst:
            dst.close()
    if h.hexdigest() != want["sha256"]:
        raise EngineError(f"{path}: payload {name} fails its SHA-256 check (corrupt or edited)")
