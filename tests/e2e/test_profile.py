"""`arc profile`: prefix by prefix, every figure measured and consistent with the others; the
second profile of the same pipeline rebuilds nothing; chart, JSON file, bad options.

Eager engines on tiny-llama keep this fast (the AOT builds are what `arc compile` tests cover);
the figures' meaning does not depend on the torch mode."""

from __future__ import annotations

import json

import pytest

from tests.e2e.cli import arc, assert_clean_error

SPEC = "kv-fusion,weight-format{mode=int8},spec-tree{budget=3,depth=3}"
COMMON = ("--torch-mode", "eager", "--num-prompts", "2", "--new-tokens", "12", "--ppl-tokens", "64",
          "--max-seq-len", "256")  # fmt: skip


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("profile")
    env = {"ARC_CACHE": str(root / "cache")}
    out, png = root / "p.json", root / "p.png"
    args = ("profile", "tiny-llama", "--passes", SPEC, *COMMON, "--rounds", "2")
    done = arc(*args, "--json-file", str(out), "--plot", str(png), "--per-layer", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout, png, env


def test_prefixes_and_compile_records(profiled):
    r, shown, _, _ = profiled
    pre = r["prefixes"]
    assert [p["pipeline"] for p in pre] == [
        "",
        "kv-fusion",
        "kv-fusion,weight-format{mode=int8}",
        "kv-fusion,weight-format{mode=int8},spec-tree{budget=3,depth=3}",
    ]
    assert [p["added"] for p in pre][1:] == ["kv-fusion", "weight-format{mode=int8}",
                                             "spec-tree{budget=3,depth=3}"]  # fmt: skip
    assert pre[0]["compile"]["pass_ms"] is None
    for p in pre[1:]:
        c = p["compile"]
        assert c["pass_ms"] > 0 and c["nodes_in"] > 0 and c["nodes_out"] > 0
    assert pre[1]["compile"]["nodes_out"] > pre[1]["compile"]["nodes_in"]  # fused projections
    assert pre[3]["compile"]["nodes_out"] > 2 * pre[3]["compile"]["nodes_in"]  # + verify graphs
    assert "+ spec-tree{budget=3,depth=3}" in shown and "tok/s" in shown


def test_decode_figures_are_consistent(profiled):
    r, _, _, _ = profiled
    for p in r["prefixes"]:
        d = p["decode"]
        assert len(d["tok_s_rounds"]) == 2 and all(x > 0 for x in d["tok_s_rounds"])
        assert min(d["tok_s_rounds"]) <= d["tok_s"] <= max(d["tok_s_rounds"])
        assert d["ms_per_token"] == pytest.approx(1e3 / d["tok_s"])
        assert d["prefill_ms"] > 0 and d["forwards"] >= 1
        assert d["tokens_per_forward"] == pytest.approx(d["tokens"] / d["forwards"])
    plain, spec = r["prefixes"][2]["decode"], r["prefixes"][3]["decode"]
    assert plain["tokens_per_forward"] == 1.0 and plain["tokens_per_verify"] is None
    assert spec["tokens_per_verify"] >= 1.0  # a verify yields at least its bonus token


def test_memory_adds_up(profiled):
    r, _, _, _ = profiled
    from arc.compiler import trace_model

    _, module = trace_model("tiny-llama", 256, weights=False)
    kv = module.kv
    for p in r["prefixes"]:
        m, d = p["memory"], p["decode"]
        assert m["kv_bytes_per_token"] == kv.layers * 2 * kv.kv_heads * kv.head_dim * 4
        assert m["weight_bytes_per_token"] == pytest.approx(
            m["weight_bytes"] / d["tokens_per_forward"]
        )
        assert m["peak_rss_bytes"] > 50e6
    fp32, int8 = r["prefixes"][1]["memory"], r["prefixes"][2]["memory"]
    assert int8["weight_bytes"] < 0.5 * fp32["weight_bytes"]  # int8 codes + one scale per group


def test_quality(profiled):
    r, _, _, _ = profiled
    none, fused, int8, spec = r["prefixes"]
    for p in (none, fused):
        assert p["quality"] == {"lossless": True, "greedy_agreement": 1.0, "ppl": None}
    for p in (int8, spec):
        q = p["quality"]
        assert q["lossless"] is False and 0.0 <= q["greedy_agreement"] <= 1.0
        assert q["ppl"]["reference"] > 0 and q["ppl"]["passes"] > 0
        rel = 100 * (q["ppl"]["passes"] / q["ppl"]["reference"] - 1)
        assert q["ppl"]["delta_pct"] == pytest.approx(rel, abs=1e-3)
    # speculation is lossless on top of int8: the same greedy ids as the int8 prefix's
    assert spec["quality"]["greedy_agreement"] == int8["quality"]["greedy_agreement"]


def test_per_layer_and_chart(profiled):
    r, _, png, _ = profiled
    layers = r["per_layer"]
    assert set(layers["by_layer"]) == {"embed", "layer 0", "layer 1", "head"}
    assert sum(layers["by_op"].values()) == pytest.approx(layers["step_ms"])
    assert sum(layers["by_layer"].values()) == pytest.approx(layers["step_ms"])
    assert {"linear", "attention", "lm_head"} <= set(layers["by_op"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_profile_rebuilds_nothing(profiled):
    r, _, _, env = profiled
    done = arc("profile", "tiny-llama", "--passes", SPEC, *COMMON, "--rounds", "1", "--no-ppl",
               "--json", env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    again = json.loads(done.stdout)
    assert all(p["cached"] for p in again["prefixes"])
    assert [p["engine"] for p in again["prefixes"]] == [p["engine"] for p in r["prefixes"]]
    assert all(p["quality"]["ppl"] is None for p in again["prefixes"])  # --no-ppl


def test_bad_options(tmp_path):
    base = ("profile", "tiny-llama", "--torch-mode", "eager")
    assert_clean_error(arc(*base, "--plot", str(tmp_path / "p.txt")), "--plot must name a .png")
    assert_clean_error(arc(*base, "--rounds", "0"), "must be at least 1")
    assert_clean_error(arc(*base, "--passes", "warp-drive"), "unknown pass 'warp-drive'")
    assert not list(tmp_path.iterdir())
