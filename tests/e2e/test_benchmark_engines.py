"""benchmarks/engine_cache.py: a benchmark reuses an engine only while the compiler sources
that built it are unchanged (a stale engine was once measured as today's)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location(
        "engine_cache", ROOT / "benchmarks/engine_cache.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_engine_is_fresh_only_when_marked_by_the_same_sources(tmp_path, monkeypatch):
    cache = _module()
    engine = tmp_path / "model.arc"
    assert not cache.fresh(engine)  # absent
    engine.write_bytes(b"engine")
    assert not cache.fresh(engine)  # built, but by unknown code (no stamp: an old build)
    cache.mark(engine)
    assert cache.fresh(engine)
    monkeypatch.setattr(cache, "source_digest", lambda: "0" * 64)  # the sources changed
    assert not cache.fresh(engine)


def test_digest_covers_the_compiler_sources():
    cache = _module()
    digest = cache.source_digest()
    assert len(digest) == 64 and {"arc", "passes", "targets"} <= set(cache.SOURCES)
    assert all((ROOT / top).is_dir() for top in cache.SOURCES)


def test_an_engine_built_under_other_build_switches_is_not_fresh(tmp_path, monkeypatch):
    cache = _module()
    engine = tmp_path / "model.arc"
    engine.write_bytes(b"engine")
    monkeypatch.delenv("ARC_TVM_LUT", raising=False)
    cache.mark(engine)
    assert cache.fresh(engine)
    monkeypatch.setenv("ARC_TVM_LUT", "0")  # the same sources, kernels without the lookup
    assert not cache.fresh(engine)
    cache.mark(engine)
    assert cache.fresh(engine)


def test_profile_prefix_engines_key_on_the_build_switches(monkeypatch):
    from arc.profile import engine_key

    monkeypatch.delenv("ARC_TVM_LUT", raising=False)
    plain = engine_key("smollm2-135m", "kv-fusion", {"target": "tvm"})
    monkeypatch.setenv("ARC_TVM_LUT", "0")
    assert engine_key("smollm2-135m", "kv-fusion", {"target": "tvm"}) != plain
