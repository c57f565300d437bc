"""sparse-attention{kind=block-topk} (Quest): the rewritten IR, dense equality when the top-k
blocks cover the cache, the block choice against a reference written here, the key summaries
kept at KV writes, option errors, what it refuses to combine with, the CLI, and AOT export."""

from __future__ import annotations

import pytest
import torch

from arc import block_topk
from arc.errors import ArcError
from arc.ir import KVDecl, dumps, loads
from arc.lowering import KVCache, lower
from arc.ops import Op
from arc.pipeline import PassManager
from arc.runtime.generate import Generator
from arc.runtime.steps import Steps
from tests.e2e.cli import arc, arc_json, assert_clean_error

PROMPT = [5, 77, 120, 3, 250, 19, 64, 201, 9, 33]


def _spec(block: int, topk: int) -> str:
    return f"sparse-attention{{kind=block-topk,block={block},topk={topk}}}"


def test_structure(traced):
    _, m = traced("tiny-llama", max_seq_len=64)
    out, _ = PassManager(_spec(8, 3)).run(m)
    assert "block_topk" not in m.meta  # the input is untouched
    assert out.meta["block_topk"] == {"block": 8, "topk": 3}
    assert out.kv == m.kv  # the cache itself is unchanged: the summaries live beside it
    for name in ("prefill", "decode"):
        before, after = m.functions[name], out.functions[name]
        assert [n.op for n in after.nodes] == [n.op for n in before.nodes]
        assert [n.inputs for n in after.nodes] == [n.inputs for n in before.nodes]
        for old, new in zip(before.nodes, after.nodes, strict=True):
            if new.op is Op.ATTENTION:
                assert old.attrs["mask"] == "causal"
                assert dict(new.attrs) == dict(old.attrs, mask="block-topk", block=8, topk=3)
            elif new.op is Op.KV_WRITE:
                assert dict(new.attrs) == dict(old.attrs, block=8)
            else:
                assert new.attrs == old.attrs
    assert dumps(loads(dumps(out))) == dumps(out)


def _decode_logits(module, loaded, max_seq_len: int, n: int, prefill_chunk: int = 0):
    """Greedy ids after PROMPT and the decode logits that chose each of them."""
    fns, kv = lower(module, loaded.weights)
    steps = Steps(fns, max_seq_len=max_seq_len, reset=kv.reset)
    kw = {"prefill_chunk": prefill_chunk} if prefill_chunk else {}
    gen = Generator(steps, loaded.tokenizer, [], **kw)
    with torch.inference_mode():
        ids = gen.generate(PROMPT, max_new_tokens=n, ignore_eos=True).token_ids
        steps.reset()
        steps.prefill(PROMPT, 0)
        logits = [steps.decode(t, len(PROMPT) + i) for i, t in enumerate(ids[:-1])]
    return ids, torch.stack(logits)


@pytest.mark.parametrize("ref", ["tiny-llama", "tiny-qwen2"])
def test_topk_covering_the_cache_is_dense(ref, traced):
    """topk * block >= the cache: every block is kept, the lowering is causal attention itself
    and the logits are identical to no pass."""
    loaded, m = traced(ref, max_seq_len=64)
    out, _ = PassManager(_spec(16, 4)).run(m)
    dense_ids, dense = _decode_logits(m, loaded, 64, 40)
    ids, logits = _decode_logits(out, loaded, 64, 40)
    assert len(ids) == 40 and ids == dense_ids
    assert torch.equal(logits, dense)


@pytest.mark.parametrize("ref", ["tiny-llama", "tiny-qwen2"])
def test_sparse_step_over_a_short_context_equals_dense(ref, traced):
    """The sparse kernel itself (topk < blocks in the cache) while the sequence has at most
    topk blocks: it keeps all of them, so it matches dense attention to rounding. Prefill in
    chunks exercises the summaries kept by prefill and by decode."""
    loaded, m = traced(ref, max_seq_len=128)
    out, _ = PassManager(_spec(8, 4)).run(m)
    n = 4 * 8 - len(PROMPT)  # the sequence fills exactly the 4 kept blocks
    dense_ids, dense = _decode_logits(m, loaded, 128, n)
    ids, logits = _decode_logits(out, loaded, 128, n, prefill_chunk=3)
    assert ids == dense_ids
    torch.testing.assert_close(logits, dense, rtol=1e-5, atol=1e-5)
    _, far = _decode_logits(out, loaded, 128, 80)  # past 4 blocks it attends to fewer tokens
    _, far_dense = _decode_logits(m, loaded, 128, 80)
    assert not torch.allclose(far, far_dense, atol=1e-3)


@pytest.mark.parametrize("kv", ["kv-dtype=int8", "share=1"])
def test_with_kv_fusion_over_a_short_context(kv, traced):
    """With an int8 cache (summaries of the dequantized keys) or a layer reading another's KV,
    the sparse step keeping every block so far decodes as the same cache without the pass."""
    loaded, m = traced("tiny-llama", max_seq_len=128)
    dense, _ = PassManager(f"kv-fusion{{{kv}}}").run(m)
    quest, _ = PassManager(f"kv-fusion{{{kv}}},{_spec(8, 4)}").run(m)
    n = 4 * 8 - len(PROMPT)
    want, want_logits = _decode_logits(dense, loaded, 128, n)
    ids, logits = _decode_logits(quest, loaded, 128, n, prefill_chunk=5)
    assert ids == want
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)


def _reference(q, keys, pos: int, block: int, topk: int):
    """Quest written out per KV head: (chosen blocks, attention output) for one query.

    q [H, D], keys [KV, P+1, D] (the rows 0..pos). Bound of block b for head h: sum_c
    max(q_c min_c, q_c max_c) over the block's keys; a KV head takes the max over its query
    heads; the current block is always kept, then the best others."""
    heads, kvh = q.shape[0], keys.shape[0]
    g = heads // kvh
    cur = pos // block
    chosen = []
    for j in range(kvh):
        bounds = []
        for b in range(cur):
            k = keys[j, b * block : (b + 1) * block]  # [B, D]
            lo, hi = k.min(0).values, k.max(0).values
            per_head = [torch.maximum(q[h] * lo, q[h] * hi).sum() for h in range(j * g, j * g + g)]
            bounds.append(max(float(x) for x in per_head))
        order = sorted(range(cur), key=lambda b: -bounds[b])
        chosen.append({cur, *order[: topk - 1]})
    return chosen


def test_block_choice_matches_a_reference():
    """Random q and keys: the summaries kept through prefill and decode writes, the bound and
    the top-k choice equal the written-out reference, and attention over the gathered rows
    equals softmax over exactly the chosen tokens."""
    torch.manual_seed(0)
    layers, kvh, heads, d, cache, block, topk = 1, 2, 6, 8, 100, 8, 3
    kv = KVCache(KVDecl(layers, kvh, d, cache), block=block)
    keys = torch.randn(1, kvh, 90, d)
    vals = torch.randn(1, kvh, 90, d)
    kv.write(0, torch.arange(50), keys[:, :, :50], vals[:, :, :50])  # a prefill chunk
    kv.summarize(0, torch.arange(50), one=False)
    for p in range(50, 90):  # decode steps, one row each
        at = torch.tensor([p])
        kv.write(0, at, keys[:, :, p : p + 1], vals[:, :, p : p + 1])
        kv.summarize(0, at, one=True)
        if p % 13 == 0 or p == 89:
            q = torch.randn(1, heads, 1, d)
            s = block_topk.scores(q, kv.kmin0, kv.kmax0, at, block)  # [1, KV, NB]
            rows = block_topk.select_rows(s, topk, block, cache)  # [1, KV, topk*block]
            got = [set((rows[0, j] // block).tolist()) for j in range(kvh)]
            assert got == _reference(q[0, :, 0], keys[0, :, : p + 1], p, block, topk)
            k, v = kv.gather(0, rows)
            mask = block_topk.visible(rows, at, heads)
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, enable_gqa=True
            )[0, :, 0]  # [H, D]
            for h in range(heads):
                j = h // (heads // kvh)
                toks = sorted(t for b in got[j] for t in range(b * block, (b + 1) * block))
                toks = [t for t in toks if t <= p]
                w = torch.softmax(keys[0, j, toks] @ q[0, h, 0] / d**0.5, dim=0)
                torch.testing.assert_close(out[h], w @ vals[0, j, toks], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "opts, fragment",
    [
        ("block=0", "block=0 must be > 0"),
        ("topk=0", "topk=0 must be > 0"),
        ("topk=-2", "topk=-2 must be > 0"),
        ("block=100", "block=100 is larger than the cache"),
    ],
)
def test_bad_options(opts, fragment, traced):
    _, m = traced("tiny-llama", max_seq_len=64)
    with pytest.raises(ArcError, match=fragment):
        PassManager(f"sparse-attention{{kind=block-topk,{opts}}}").run(m)


def test_refuses_what_it_cannot_combine(traced):
    _, m = traced("tiny-llama", max_seq_len=64)
    with pytest.raises(ArcError, match="block-topk cannot be combined with spec-tree"):
        PassManager(f"spec-tree{{budget=5,depth=3}},{_spec(8, 2)}").run(m)
    with pytest.raises(ArcError, match="spec-tree: cannot run after .*block-topk"):
        PassManager(f"{_spec(8, 2)},spec-tree{{budget=5,depth=3}}").run(m)
    drafted = m.with_functions({**m.functions, "draft": m.functions["decode"]})  # as layer-skip
    with pytest.raises(ArcError, match="block-topk rewrites prefill and decode only.*draft"):
        PassManager(_spec(8, 2)).run(drafted)
    _, mistral = traced("tiny-mistral", max_seq_len=64)
    with pytest.raises(ArcError, match="mask sliding; block-topk replaces causal"):
        PassManager(_spec(8, 2)).run(mistral)


def test_cli_option_errors(tmp_path):
    for opts, fragment in (("topk=0", "topk=0 must be > 0"), ("block=64", "larger than the")):
        out = tmp_path / "bad.arc"
        r = arc(
            "compile", "tiny-llama", "--passes", f"sparse-attention{{kind=block-topk,{opts}}}",
            "--max-seq-len", "32", "--torch-mode", "eager", "-o", str(out),
        )  # fmt: skip
        assert_clean_error(r, fragment)
        assert not out.exists()
    r = arc("compile", "tiny-llama", "--passes", "sparse-attention{kind=quest}", "-o", "x.arc")
    assert_clean_error(r, "unknown kind 'quest'")


def test_aot_engine_equals_eager(tmp_path):
    """The decode step with the sparse kernel exports through AOTInductor (dynamic T and L)
    and the compiled engine decodes exactly as the eager one."""
    spec = ("--passes", _spec(8, 2), "--max-seq-len", "64")
    run = ("--prompt", "hi", "--ignore-eos", "--max-new-tokens", "40")
    ids = []
    for mode in ("eager", "aot"):
        path = tmp_path / f"{mode}.arc"
        arc_json("compile", "tiny-llama", *spec, "--torch-mode", mode, "-o", str(path))
        ids.append(arc_json("run", str(path), *run)["token_ids"])
    assert len(ids[0]) > 30 and ids[0] == ids[1]
