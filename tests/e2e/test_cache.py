"""arc's cache under concurrency, and `arc cache` / `arc cache prune`: sizes, last use, and
never an entry in use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from arc.cache import EntryGone, atomic_dir, cache_path, use_entry
from tests.e2e.cli import arc, assert_clean_error


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh ARC_CACHE, for this process and the `arc` processes it starts."""
    root = tmp_path / "cache"
    monkeypatch.setenv("ARC_CACHE", str(root))
    return root


def _listing(**kw) -> dict:
    done = arc("cache", "--json", *[f"--{k.replace('_', '-')}={v}" for k, v in kw.items()])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _entry(name: str, size: int = 1000, age_s: float = 0.0) -> Path:
    """A fake converted model `models/<name>` of `size` bytes, last used `age_s` ago."""
    d = cache_path("models", name)
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"x" * size)
    (d / ".last-used").touch()
    when = time.time() - age_s
    os.utime(d / ".last-used", (when, when))
    return d


def test_three_processes_first_using_one_catalog_model(cache):
    """All convert at once; the first rename wins and the others use its directory."""
    cmd = [sys.executable, "-m", "arc.cli", "inspect", "tiny-llama", "--ir"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in "abc"]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    for rc, out, err in results:
        assert rc == 0, err.decode()[-2000:]
        assert b"func @decode" in out
    assert sorted(p.name for p in (cache / "models").iterdir()) == ["tiny-llama"]
    assert (cache / "models" / "tiny-llama" / "config.json").is_file()


def test_the_loser_of_the_rename_keeps_the_winner(cache):
    out = cache_path("models", "m")
    atomic_dir(out, lambda tmp: (tmp / "who").write_text("first"))
    atomic_dir(out, lambda tmp: (tmp / "who").write_text("second"))
    assert (out / "who").read_text() == "first"
    assert [p.name for p in out.parent.iterdir()] == ["m"]  # the loser's build is gone


def test_list_shows_sizes_and_last_use(cache):
    _entry("old", size=5000, age_s=10 * 86400)
    _entry("new", size=2000)
    listed = _listing()
    assert listed["root"] == str(cache)
    rows = {Path(e["path"]).name: e for e in listed["entries"]}
    assert set(rows) == {"old", "new"}
    assert rows["old"]["size"] >= 5000 and rows["new"]["kind"] == "model"
    assert rows["new"]["last_used"] - rows["old"]["last_used"] > 9 * 86400
    text = arc("cache").stdout
    assert "models/old" in text and "2 entries" in text


def test_prune_older_than_frees_only_old_entries(cache):
    old, new = _entry("old", age_s=10 * 86400), _entry("new")
    done = arc("cache", "prune", "--older-than", "7d")
    assert done.returncode == 0 and "freed" in done.stdout and "in 1 entries" in done.stdout
    assert not old.exists() and new.exists()
    assert sorted(p.name for p in (cache / "models").iterdir()) == ["new"]


def test_prune_never_removes_an_entry_in_use(cache):
    busy, idle = _entry("busy"), _entry("idle")
    with use_entry(busy):  # this process holds it, as `arc run` or a compile would
        out = json.loads(arc("cache", "prune", "--json").stdout)
        assert [Path(e["path"]).name for e in out["in_use"]] == ["busy"]
        assert [Path(e["path"]).name for e in out["freed"]] == ["idle"]
        assert busy.is_dir() and not idle.exists()
        assert _listing()["entries"][0]["in_use"] is True
    arc("cache", "prune")
    assert not busy.exists()


def test_using_an_entry_records_its_use(cache):
    d = _entry("m", age_s=30 * 86400)
    before = os.stat(d / ".last-used").st_mtime
    with use_entry(d):
        pass
    assert os.stat(d / ".last-used").st_mtime > before + 29 * 86400


def test_an_entry_pruned_before_it_is_locked_is_reported(cache):
    d = cache_path("models", "gone")
    with pytest.raises(EntryGone):
        with use_entry(d):
            pass


def test_loader_marks_catalog_models_used(cache):
    from arc.models import loader

    loader.load("tiny-llama", weights=False)
    entry = cache / "models" / "tiny-llama"
    assert (entry / ".last-used").exists() and (entry / ".lock").exists()
    assert _listing()["entries"][0]["in_use"] is False


def test_prune_dry_run_and_bad_age(cache):
    d = _entry("m")
    out = json.loads(arc("cache", "prune", "--dry-run", "--json").stdout)
    assert out["dry_run"] and len(out["freed"]) == 1 and d.exists()
    assert_clean_error(arc("cache", "prune", "--older-than", "soon"), "--older-than 'soon'")
