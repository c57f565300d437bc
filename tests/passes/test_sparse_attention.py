"""sparse-attention{kind=sink-window}: the rewritten IR, dense equality while the sequence fits,
the ring's positions past the cache, option errors, targets that refuse it, and the CLI."""

from __future__ import annotations

import pytest
import torch

from arc.errors import ArcError, UnsupportedError
from arc.ir import dumps, loads, rebuild
from arc.lowering import lower
from arc.ops import Op
from arc.pipeline import PassManager, registry
from arc.presets import PRESETS
from arc.runtime.generate import Generator
from arc.runtime.steps import Steps, ring_of
from tests.e2e.cli import arc, arc_json, assert_clean_error

PROMPT = [5, 77, 120, 3, 250, 19, 64, 201, 9, 33]


def _steps(module, weights, **kw):
    fns, kv = lower(module, weights)
    ring = ring_of(module.meta)
    return Steps(fns, max_seq_len=module.kv.max_seq_len, reset=kv.reset, ring=ring, **kw), kv


def test_structure(traced):
    _, m = traced("tiny-llama", max_seq_len=64)
    out, _ = PassManager("sparse-attention{sink=4,window=28}").run(m)
    assert m.kv.max_seq_len == 64 and "sink_window" not in m.meta  # the input is untouched
    assert out.kv.max_seq_len == 32 and out.meta["sink_window"] == {"sink": 4, "window": 28}
    for name in ("prefill", "decode"):
        g = out.functions[name]
        t = 1 if name == "decode" else "T"
        ins = {n.attrs["name"]: (n.shape, n.dtype) for n in g.inputs()}
        assert list(ins) == ["tokens", "pos", "write", "kpos"]
        assert ins["write"] == ((t,), "i64") and ins["kpos"] == (("L",), "i64")
        ids = {n.attrs["name"]: n.id for n in g.inputs()}
        assert not any(n.op is Op.ROPE for n in g.nodes)  # rotation moved into attention
        writes = [n for n in g.nodes if n.op is Op.KV_WRITE]
        assert writes and all(n.inputs[2] == ids["write"] for n in writes)
        assert all(g.node(n.inputs[0]).op is Op.LINEAR for n in writes)  # k cached un-rotated
        attn = [n for n in g.nodes if n.op is Op.ATTENTION]
        assert len(attn) == m.kv.layers
        for n in attn:
            assert (n.attrs["mask"], n.attrs["sink"], n.attrs["window"]) == ("sink-window", 4, 28)
            assert n.attrs["w"] == "rope.inv_freq" and n.inputs[2:] == (ids["pos"], ids["kpos"])
            assert g.node(n.inputs[0]).op is Op.LINEAR  # q un-rotated
    dense = m.functions["decode"]
    assert sum(n.op is Op.ROPE for n in dense.nodes) == 2 * m.kv.layers
    assert dumps(loads(dumps(out))) == dumps(out)
    default, _ = PassManager("sparse-attention").run(m)  # window 0: the cache less the sinks
    assert default.meta["sink_window"] == {"sink": 4, "window": 60}
    assert default.kv.max_seq_len == 64


@pytest.mark.parametrize("ref", ["tiny-llama", "tiny-qwen2"])
def test_equals_dense_while_it_fits(ref, traced):
    """Until the ring wraps, cache position is absolute position: greedy ids are identical."""
    loaded, m = traced(ref, max_seq_len=64)
    out, _ = PassManager("sparse-attention{sink=4,window=60}").run(m)
    got = []
    for module in (m, out):
        steps, _ = _steps(module, loaded.weights)
        gen = Generator(steps, loaded.tokenizer, [], prefill_chunk=4)  # chunks: causal in ring
        with torch.inference_mode():
            got.append(gen.generate(PROMPT, max_new_tokens=50, ignore_eos=True).token_ids)
    assert len(got[0]) == 50 and got[0] == got[1]


def test_runs_past_the_cache_at_constant_memory(traced):
    loaded, m = traced("tiny-llama", max_seq_len=64)
    out, _ = PassManager("sparse-attention{sink=4,window=28}").run(m)
    steps, kv = _steps(out, loaded.weights)
    sizes = [b.numel() for b in kv.buffers()]
    gen = Generator(steps, loaded.tokenizer, [])
    with torch.inference_mode():
        r = gen.generate(PROMPT, max_new_tokens=200, ignore_eos=True)
    assert len(r.token_ids) == 200 and r.stop_reason == "max_new_tokens"
    assert [b.numel() for b in kv.buffers()] == sizes and sizes[0] == 2 * 33 * 16  # ring + spare
    dense_steps, _ = _steps(m, loaded.weights)
    dense = Generator(dense_steps, loaded.tokenizer, [])
    with torch.inference_mode():
        full = dense.generate(PROMPT, max_new_tokens=200, ignore_eos=True)
    assert full.stop_reason == "cache_full" and len(full.token_ids) == 64 - len(PROMPT) + 1


def test_ring_positions_match_the_kept_tokens():
    """After the ring wraps, each slot's kpos is its token's rank among the kept tokens (sinks
    first, then the window by age) and the query sits at the last cache position."""
    sink, window = 3, 8
    cache = sink + window
    steps = Steps({}, max_seq_len=cache, ring=(sink, window))
    held = {}  # slot -> absolute position of the token in it
    for p in range(cache + 3 * window + 5):
        pos, write, kpos = steps._ring_feeds(p)
        held[int(write)] = p
        if p < cache:
            assert int(pos) == int(write) == p
            continue
        kept = sorted(held.values())
        assert kept[:sink] == list(range(sink)) and kept[sink:] == list(
            range(p - window + 1, p + 1)
        )
        rank = {a: i for i, a in enumerate(kept)}
        assert [int(x) for x in kpos] == [rank[held[s]] for s in range(cache)]
        assert int(pos) == cache - 1 == rank[p]


def test_sink_zero_is_dense_sliding_window_past_the_cache(traced):
    """With no sinks, attention over a ring rotated by cache position is exactly Mistral-style
    sliding-window attention over a big cache (RoPE depends on distance only): the same logits
    for every step, long after the ring has wrapped several times."""
    loaded, m = traced("tiny-llama", max_seq_len=128)
    window = 16
    ring, _ = PassManager(f"sparse-attention{{sink=0,window={window}}}").run(m)

    def sliding(b, n, ins):
        if n.op is Op.ATTENTION:
            return b.add(n.op, ins, **dict(n.attrs, mask="sliding", window=window))
        return None

    fns = {k: rebuild(g, m.weight_shapes(), sliding) for k, g in m.functions.items()}
    dense = m.with_functions(fns)
    seq = [(7 * i + 3) % 300 for i in range(90)]
    logits = []
    for module in (dense, ring):
        steps, _ = _steps(module, loaded.weights)
        with torch.inference_mode():
            steps.reset()
            steps.prefill(seq[:5], 0)
            logits.append(torch.stack([steps.decode(t, 5 + i) for i, t in enumerate(seq[5:])]))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


def test_compiled_mode_runs_past_the_cache(traced):
    """torch.compile (the jit mode) of the ring lowering: equal to eager past the cache."""
    loaded, m = traced("tiny-llama", max_seq_len=64)
    out, _ = PassManager("sparse-attention{sink=4,window=12}").run(m)
    ids = []
    for compiled in (False, True):
        fns, kv = lower(out, loaded.weights, gemv=compiled)
        if compiled:
            fns = {k: torch.compile(f, dynamic=True) for k, f in fns.items()}
        steps = Steps(fns, max_seq_len=16, reset=kv.reset, ring=ring_of(out.meta))
        with torch.inference_mode():
            r = Generator(steps, loaded.tokenizer, []).generate(
                PROMPT[:6], max_new_tokens=40, ignore_eos=True
            )
        ids.append(r.token_ids)
    assert len(ids[0]) == 40 and ids[0] == ids[1]


@pytest.mark.parametrize(
    "opts, fragment",
    [
        ("window=100", "larger than the cache"),
        ("sink=8,window=60", "larger than the cache"),
        ("sink=-1", "sink=-1 must be >= 0"),
        ("window=-3", "window=-3 must be >= 0"),
        ("sink=8,window=8", "sink=8 must be smaller than window=8"),
        ("sink=20,window=10", "sink=20 must be smaller"),
        ("kind=magic", "unknown kind 'magic'"),
    ],
)
def test_bad_options(opts, fragment, traced):
    _, m = traced("tiny-llama", max_seq_len=64)
    with pytest.raises(ArcError, match=fragment):
        PassManager(f"sparse-attention{{{opts}}}").run(m)


def test_refuses_what_it_cannot_combine(traced):
    _, m = traced("tiny-llama", max_seq_len=64)
    with pytest.raises(ArcError, match="cannot be combined with spec-tree"):
        PassManager("spec-tree{budget=5,depth=3},sparse-attention").run(m)
    with pytest.raises(ArcError, match="spec-tree: cannot run after sparse-attention"):
        PassManager("sparse-attention,spec-tree{budget=5,depth=3}").run(m)
    drafted = m.with_functions({**m.functions, "draft": m.functions["decode"]})  # as layer-skip
    with pytest.raises(ArcError, match="also has draft"):
        PassManager("sparse-attention").run(drafted)
    _, mistral = traced("tiny-mistral", max_seq_len=64)
    with pytest.raises(ArcError, match="mask sliding; sink-window replaces causal"):
        PassManager("sparse-attention").run(mistral)


def test_lossy_and_in_no_preset():
    assert registry()["sparse-attention"].is_lossless({}) is False
    assert not any("sparse-attention" in spec for spec in PRESETS.values())


@pytest.mark.parametrize("target", ["onnx", "tvm"])
def test_other_targets_refuse_the_mask(target, traced):
    import importlib

    _, m = traced("tiny-llama", max_seq_len=64)
    out, _ = PassManager("sparse-attention").run(m)
    try:
        mod = importlib.import_module(f"arc.targets.{target}")
        mod.check_module(m)  # the dense module lowers
    except ImportError:
        pytest.skip(f"{target} not installed")
    with pytest.raises(UnsupportedError, match=f"target {target} cannot lower mask sink-window"):
        mod.check_module(out)


def test_cli_runs_past_the_cache(tmp_path):
    ring, dense = tmp_path / "ring.arc", tmp_path / "dense.arc"
    common = ("--torch-mode", "eager", "--max-seq-len", "32")
    arc_json(
        "compile", "tiny-llama", "--passes", "sparse-attention{sink=4}", *common, "-o", str(ring)
    )
    arc_json("compile", "tiny-llama", "-O0", *common, "-o", str(dense))
    run = ("--prompt", "hi", "--ignore-eos", "--max-new-tokens", "100")
    r = arc_json("run", str(ring), *run)
    assert len(r["token_ids"]) == 100 and r["stop_reason"] == "max_new_tokens"
    d = arc_json("run", str(dense), *run)
    assert d["stop_reason"] == "cache_full" and len(d["token_ids"]) < 32
    bad = arc(
        "compile",
        "tiny-llama",
        "--passes",
        "sparse-attention{window=40}",
        *common,
        "-o",
        str(tmp_path / "bad.arc"),
    )
    assert_clean_error(bad, "larger than the cache")
    assert not (tmp_path / "bad.arc").exists()


def test_aot_engine_equals_eager_past_the_cache(tmp_path):
    """The one AOT build here: the ring lowering exports (dynamic T and L) and the compiled
    engine generates past its cache exactly as the eager engine does."""
    spec = ("--passes", "sparse-attention{sink=4,window=28}", "--max-seq-len", "32")
    run = ("--prompt", "hi", "--ignore-eos", "--max-new-tokens", "80")
    ids = []
    for mode in ("eager", "aot"):
        path = tmp_path / f"{mode}.arc"
        arc_json("compile", "tiny-llama", *spec, "--torch-mode", mode, "-o", str(path))
        r = arc_json("run", str(path), *run)
        assert r["stop_reason"] == "max_new_tokens"
        ids.append(r["token_ids"])
    assert len(ids[0]) == 80 and ids[0] == ids[1]
