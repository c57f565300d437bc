"""Where arc keeps what it derives (converted checkpoints, unpacked engines): $ARC_CACHE or
~/.cache/arc.

An entry is a directory (or a downloaded file) one level below a kind directory:
`models/<name>`, `gguf/<stem>-<key>`, `engines/<digest>`, `downloads/<file>`. Entries are
built aside and renamed into place (atomic_dir), so a reader sees a whole entry or none.
A process using an entry holds a shared lock on it (use_entry) and touches `.last-used`, so
`arc cache prune` can free old entries and never one in use (it takes the lock exclusively).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from arc.errors import ArcError

LAST_USED, LOCK = ".last-used", ".lock"


class EntryGone(ArcError):
    """The entry was pruned between finding it and locking it; resolving it again rebuilds it."""


def cache_root() -> Path:
    return Path(os.environ.get("ARC_CACHE") or Path.home() / ".cache" / "arc")


def cache_dir(*parts: str) -> Path:
    """Directory `parts` under the cache root, created if missing."""
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_path(*parts: str) -> Path:
    """Path `parts` under the cache root; only its parent is created, so a failed build leaves
    no empty placeholder behind (atomic_dir renames the finished entry into place)."""
    path = cache_root().joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def atomic_dir(out: Path, make: Callable[[Path], object]) -> Path:
    """Build directory `out` with `make(tmp)` in a sibling temp dir, then rename it into place,
    so a crash or a failed build never leaves half of it. When another process published `out`
    first, its directory wins and this build is dropped: both are built from the same input."""
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        make(tmp)
        _publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _publish(tmp: Path, out: Path) -> None:
    """rename(2) replaces a missing or empty `out` atomically and fails on a full one."""
    try:
        os.rename(tmp, out)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not _has_content(out):
            raise


def unwritable(path: Path) -> str | None:
    """Why no file can be created beside `path` (None: one can), probed by creating one:
    os.access says yes to root, even in /proc or on a read-only mount."""
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            return None
    except OSError as e:
        return str(e.strerror or e)


def _has_content(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


# ---------------------------------------------------------------- use and last use


def in_cache(path: Path) -> bool:
    """Whether `path` is an entry of arc's cache (a user's own model directory is not)."""
    try:
        return Path(path).resolve().parent.parent == cache_root().resolve()
    except OSError:
        return False


def _marker(entry: Path, name: str) -> Path:
    """A bookkeeping file of the entry: inside a directory entry, beside a file entry."""
    entry = Path(entry)
    return entry / name if entry.is_dir() else entry.with_name(f".{entry.name}{name}")


def lock_path(entry: Path) -> Path:
    return _marker(entry, LOCK)


def touch_entry(path: Path) -> None:
    """Record that cache entry `path` was used now (for `arc cache` and prune --older-than)."""
    if not in_cache(path):
        return
    try:
        marker = _marker(path, LAST_USED)
        marker.touch()  # updates the mtime of an existing marker too
    except OSError:
        pass  # a read-only cache: last use falls back to the entry's own mtime


class EntryLock:
    """A shared lock on a cache entry, held until release(): prune skips the entry meanwhile."""

    def __init__(self, entry: Path):
        self.entry, self.fd = Path(entry), None
        if not in_cache(self.entry):
            return
        if not self.entry.exists():
            raise EntryGone(f"cache entry {self.entry} was removed while opening it")
        path = lock_path(self.entry)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:
            raise EntryGone(f"cache entry {self.entry} was removed while opening it") from None
        except OSError:
            return  # a read-only cache cannot be pruned by this user either
        fcntl.flock(self.fd, fcntl.LOCK_SH)
        if not _same_file(self.fd, path):  # pruned while we waited for the lock
            self.release()
            raise EntryGone(f"cache entry {self.entry} was pruned while opening it")
        touch_entry(self.entry)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


@contextmanager
def use_entry(path: Path) -> Iterator[Path]:
    """`with use_entry(p):` holds cache entry p against prune and records its use; a no-op for
    paths outside the cache. Raises EntryGone when p was pruned before the lock was taken."""
    lock = EntryLock(path)
    try:
        yield Path(path)
    finally:
        lock.release()


def try_lock_exclusive(entry: Path) -> int | None:
    """An fd holding entry's lock exclusively, or None when some process uses the entry."""
    fd = os.open(lock_path(entry), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def last_used(entry: Path) -> float:
    """When the entry was last used: its `.last-used` marker, else its own mtime."""
    for p in (_marker(entry, LAST_USED), entry):
        try:
            return p.stat().st_mtime
        except OSError:
            continue
    return time.time()
