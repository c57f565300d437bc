"""Calling library code (transformers, tokenizers, safetensors) on a user's file.

A malformed file can fail anywhere inside those libraries, with any exception type, and the
tokenizers library can even panic: pyo3 raises PanicException, a BaseException (not an
Exception), and Rust's panic hook writes its message and backtrace straight to file descriptor 2,
past Python. `guarded` turns all of that into one ArcError line and keeps the native chatter
out of the terminal when the call fails.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from arc.errors import ArcError

T = TypeVar("T")


def is_panic(e: BaseException) -> bool:
    """A Rust panic surfaced by pyo3; matched by name, since pyo3_runtime is not importable."""
    return type(e).__name__ == "PanicException"


def first_line(e: BaseException) -> str:
    """The message's first line, with the next one when the first only introduces it."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    return " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def guarded(what: str, call: Callable[[], T]) -> T:
    """`call()`, or ArcError(f"{what}: <the library's first line>") when it fails."""
    try:
        with _native_stderr_held():
            return call()
    except ArcError:
        raise
    except BaseException as e:
        if not (isinstance(e, Exception) or is_panic(e)):
            raise  # KeyboardInterrupt, SystemExit: not the file's fault
        raise ArcError(f"{what}: {first_line(e)}") from None


@contextmanager
def _native_stderr_held() -> Iterator[None]:
    """Send fd 2 to a temp file during the call; pass it on when the call succeeds (library
    warnings stay visible), drop it when the call fails (the error line says what went wrong)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 at all (`2>&-`): nothing to keep quiet
        yield
        return
    ok = False
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
            ok = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if ok:
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))
