"""The .arc engine file: a zip of manifest.json, weights (safetensors), artifacts, tokenizer.

The manifest records format and arc versions, model and config, target and device, pass
records, decode plan, the IR, and the SHA-256 and size of every payload; `manifest.sha256`
holds the digest of manifest.json itself, so a hand edit is caught. Reading checks all of that
before any native code (an AOTInductor .so, say) is loaded, and never unpickles anything.
Writing goes to a temporary file renamed into place: a failed compile leaves no half file.

Trust: the digests catch corruption, not tampering (anyone can recompute them), and an engine
holds native code; run only engines you trust, as with any executable. What reading does
guarantee, for any file at all: payload names come from one allowlist (`allowed_payload`) and
are all checked before anything is written, so nothing lands outside arc's cache; members must
be stored (not compressed: no zip bombs), unique, and listed in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
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
# 2: CPU ISA record, payload allowlist, speculative plans (verify_B); 3: tvm libraries write and
# move K/V rows in the cache themselves and their logits_stats returns argmax and top-k; 4: a
# tvm library may run AMX tiles (manifest `amx`), which the loader must first ask Linux for:
# an arc that reads only format 3 would die of SIGILL on one, so it must refuse it instead; 5:
# an engine may hold a drafting corpus (corpus.safetensors, spec-tree{corpus=N}), which an arc
# reading 3-4 would refuse as an unknown payload name, as if the file were tampered with
FORMAT_VERSION = 5
READS = (3, 4, 5)  # format 3 and 4 engines hold nothing this arc cannot run
MANIFEST, MANIFEST_SHA = "manifest.json", "manifest.sha256"
WEIGHTS = "weights.safetensors"
CORPUS = "corpus.safetensors"  # the `corpus` drafter's datastore (spec-tree{corpus=N})
ARTIFACTS, TOKENIZER = "artifacts", "tokenizer"
MAX_MANIFEST = 64 << 20  # the IR of a 70B model is a few MB; this is read into memory

# The payload names arc writes: top-level files, and one level of files in these directories.
# A new target that stores more adds its names here, and nowhere else.
PAYLOAD_FILES = frozenset({WEIGHTS, CORPUS})
PAYLOAD_DIRS = frozenset({ARTIFACTS, TOKENIZER})
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")  # no '/', '\\', NUL, leading dot
# zip errors that mean "damaged file" (zipfile raises all of these on crafted input)
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    OSError,
    EOFError,
    ValueError,
    NotImplementedError,
    RuntimeError,
    struct.error,
)


def allowed_payload(name: object) -> bool:
    """Whether `name` is a payload name arc writes: `weights.safetensors`, `artifacts/<file>`,
    `tokenizer/<file>`. Relative POSIX names only: no absolute path, `..`, backslash, empty or
    hidden part, so a name can never point outside the directory it is unpacked into."""
    if not isinstance(name, str):
        return False
    parts = name.split("/")
    if not all(_PART.fullmatch(p) for p in parts):
        return False
    if len(parts) == 1:
        return name in PAYLOAD_FILES
    return len(parts) == 2 and parts[0] in PAYLOAD_DIRS


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
    """The checked manifest of engine `path` (format, version, self-digest, schema, payload
    names, zip members); payloads unread."""
    with _open_zip(path) as zf:
        return _manifest(zf, path)


def open_engine(path: Path, progress: Callable[[int], object] = lambda n: None) -> Engine:
    """Check everything in engine `path`, unpack its payloads to the cache, return them.

    `progress(n)` is called with each n bytes checked (for a progress bar)."""
    path = Path(path)
    with _open_zip(path) as zf:
        manifest = _manifest(zf, path)  # every name checked here, before anything is written
        digest = hashlib.sha256(_read(zf, MANIFEST, path)).hexdigest()
        root = cache_dir("engines") / digest
        fresh = not (root / ".complete").exists()
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".unpack-")) if fresh else None
        try:
            for name, want in manifest["files"].items():
                _check_member(zf, path, name, want, tmp, progress)
            if fresh:
                (tmp / ".complete").write_text("ok")
                _place(tmp, root)
        finally:
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return Engine(path, manifest, root)


def _place(tmp: Path, root: Path) -> None:
    """Rename the verified unpack `tmp` to `root` (atomic: a reader sees all payloads or
    none). If another process unpacked the same engine first, keep theirs; a `root` left
    without `.complete` (a crash, or a hand-made directory) was never verified: replace it."""
    for _ in range(2):
        try:
            tmp.rename(root)
            return
        except OSError:
            if (root / ".complete").exists():
                return
            shutil.rmtree(root, ignore_errors=True)
    raise EngineError(f"cannot unpack the engine into {root}: an unverified directory is there")


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not Path(path).is_file():
        raise EngineError(f"{path}: no such engine file")
    try:
        return zipfile.ZipFile(path)
    except _ZIP_ERRORS as e:
        raise EngineError(f"{path}: not an arc engine, or truncated ({_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _read(zf: zipfile.ZipFile, name: str, path: Path) -> bytes:
    try:
        return zf.read(name)
    except _ZIP_ERRORS as e:
        raise EngineError(f"{path}: {name} unreadable, engine corrupt ({_one_line(e)})") from None


def _manifest(zf: zipfile.ZipFile, path: Path) -> dict[str, Any]:
    from arc.manifest import validate

    names = zf.namelist()
    if MANIFEST not in names or MANIFEST_SHA not in names:
        raise EngineError(f"{path}: not an arc engine (no manifest)")
    _check_members(zf, path)  # before reading any member: stored, unique, not encrypted
    if zf.getinfo(MANIFEST).file_size > MAX_MANIFEST:
        raise EngineError(f"{path}: manifest.json is over {MAX_MANIFEST >> 20} MiB; not arc's")
    text = _read(zf, MANIFEST, path)
    try:
        want = _read(zf, MANIFEST_SHA, path).decode("ascii").strip()
    except UnicodeDecodeError:
        raise EngineError(f"{path}: manifest.sha256 is not a digest, engine corrupt") from None
    if hashlib.sha256(text).hexdigest() != want:
        raise EngineError(f"{path}: manifest.json was modified (checksum mismatch); rebuild it")
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError):
        raise EngineError(f"{path}: manifest.json is not valid JSON") from None
    if not isinstance(manifest, dict):
        raise EngineError(f"{path}: manifest.json is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise EngineError(f"{path}: not an arc engine (format {_short(manifest.get('format'))})")
    if manifest.get("format_version") not in READS:
        raise EngineError(
            f"{path}: engine format {_short(manifest.get('format_version'))} but this arc reads "
            f"{READS[0]}-{READS[-1]}; rebuild it with arc {__version__}"
        )
    validate(manifest, path)
    _check_names(zf, manifest["files"], path)
    return manifest


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_members(zf: zipfile.ZipFile, path: Path) -> None:
    """Refuse what arc never writes: duplicate names (which one would be read?), compressed
    members (a small file could expand without bound), encrypted ones."""
    seen: set[str] = set()
    for info in zf.infolist():
        name = _short(info.filename)
        if info.filename in seen:
            raise EngineError(f"{path}: member {name} appears twice; engine corrupt or crafted")
        seen.add(info.filename)
        if info.compress_type != zipfile.ZIP_STORED:
            raise EngineError(f"{path}: member {name} is compressed; arc engines store members")
        if info.flag_bits & 0x1:
            raise EngineError(f"{path}: member {name} is encrypted; not an arc engine")


def _check_names(zf: zipfile.ZipFile, files: dict[str, Any], path: Path) -> None:
    """Every payload name from the allowlist; every zip member a payload or the manifest."""
    for name in files:
        if not allowed_payload(name):
            raise EngineError(
                f"{path}: payload name {_short(name)} is not one arc writes "
                f"({WEIGHTS}, {ARTIFACTS}/<file>, {TOKENIZER}/<file>); engine crafted or corrupt"
            )
    extra = set(zf.namelist()) - set(files) - {MANIFEST, MANIFEST_SHA}
    if extra:
        raise EngineError(f"{path}: member {_short(min(extra))} is not listed in the manifest")


def _inside(root: Path, name: str) -> Path:
    """`root / name`, checked to resolve inside `root` (names are allowlisted already; this
    also holds if a directory on the way is a symlink)."""
    dst = (root / name).resolve()
    if not dst.is_relative_to(root.resolve()):
        raise EngineError(f"payload {_short(name)} would be written outside {root}")
    return dst


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
        target = _inside(unpack_to, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        dst = open(target, "xb")  # x: never follow or reuse what is there
    try:
        with zf.open(info) as src:
            while chunk := src.read(1 << 22):
                h.update(chunk)
                progress(len(chunk))
                if dst:
                    dst.write(chunk)
    except _ZIP_ERRORS as e:
        raise EngineError(
            f"{path}: payload {name} unreadable, engine corrupt ({_one_line(e)})"
        ) from None
    finally:
        if dst:
            dst.close()
    if h.hexdigest() != want["sha256"]:
        raise EngineError(f"{path}: payload {name} fails its SHA-256 check (corrupt or edited)")
