"""Benchmark engines reused across runs only while the code that built them is unchanged.

The benchmark scripts keep their engines in benchmarks/.engines, by name. A name says which
model and passes, not which code: an engine built before a kernel or pass changed was reused
and measured as if it were today's (it happened: a session's speed runs timed engines of the
previous format). `fresh(path)` is true only when the engine exists and the digest of arc's
sources (arc.profile.source_digest: arc/, passes/, targets/, models/) written beside it when
it was built equals today's; `mark` writes that digest after a build. Deleting .engines
rebuilds everything, as before.
"""

from __future__ import annotations

from pathlib import Path

from arc.profile import SOURCES, build_env, source_digest  # arc profile's prefix cache too

__all__ = ["SOURCES", "fresh", "mark", "source_digest"]


def _key() -> str:
    """The sources' digest, and the build switches (arc.profile.BUILD_ENV) set now: an engine
    built under other values of them is not today's either."""
    env = ",".join(f"{k}={v}" for k, v in build_env().items())
    return source_digest() + (f" {env}" if env else "")


def _stamp(engine: Path) -> Path:
    return engine.with_name(engine.name + ".src")


def fresh(engine: Path) -> bool:
    """The engine exists and was built by the current sources."""
    stamp = _stamp(engine)
    return engine.exists() and stamp.exists() and stamp.read_text().strip() == _key()


def mark(engine: Path) -> None:
    """Record that `engine` was just built by the current sources."""
    _stamp(engine).write_text(_key() + "\n")
