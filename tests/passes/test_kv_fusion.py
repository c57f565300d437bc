"""kv-fusion: a structural before/after test and a numerical test (TVM test_transform style)."""

import torch

from arc.lowering import lower
from arc.ops import Op
from arc.pipeline import PassManager


def _ops(g, op):
    return [n for n in g.nodes if n.op is op]


def test_structure_per_layer(traced):
    _, m = traced("tiny-qwen2")  # q/k/v carry biases: the fused bias is built too
    out, _ = PassManager("kv-fusion").run(m)
    for fn in ("prefill", "decode"):
        before, after = m.functions[fn], out.functions[fn]
        layers = m.kv.layers
        # per layer: q,k,v,o,gate,up,down = 7 linears -> qkv,o,gate+up,down = 4
        assert len(_ops(before, Op.LINEAR)) == 7 * layers
        assert len(_ops(after, Op.LINEAR)) == 4 * layers
        assert len(_ops(after, Op.SLICE)) == 5 * layers
    fused = out.weights["layers.0.wq+wk+wv"]
    assert fused.parts == ("layers.0.wq", "layers.0.wk", "layers.0.wv")
    assert fused.shape == (64 + 32 + 32, 64)
    assert out.weights["layers.0.bq+bk+bv"].shape == (128,)
    assert "layers.0.wq" not in out.used_weights()
    assert m.functions["decode"] is not out.functions["decode"]  # the input is untouched
    assert len(_ops(m.functions["decode"], Op.SLICE)) == 0


def test_options_select_groups(traced):
    _, m = traced("tiny-llama")
    attn_only, _ = PassManager("kv-fusion{mlp=false}").run(m)
    names = attn_only.used_weights()
    assert "layers.0.wq+wk+wv" in names and "layers.0.w_gate" in names
    mlp_only, _ = PassManager("kv-fusion{attention=false}").run(m)
    assert (
        "layers.0.w_gate+w_up" in mlp_only.used_weights()
        and "layers.0.wq" in mlp_only.used_weights()
    )
    none, records = PassManager("kv-fusion{attention=false,mlp=false}").run(m)
    assert none is m and not records[0].changed


def test_idempotent(traced):
    _, m = traced("tiny-llama")
    once, _ = PassManager("kv-fusion").run(m)
    twice, rec = PassManager("kv-fusion").run(once)
    assert not rec[0].changed


def _run(module, weights, tokens):
    fns, kv = lower(module, weights)
    n = len(tokens)
    pos = torch.arange(n)
    with torch.inference_mode():
        first = fns["prefill"](torch.tensor([tokens[:-1]]), pos[:-1], torch.arange(n - 1))
        last = fns["decode"](torch.tensor([[tokens[-1]]]), pos[-1:], torch.arange(n))
    return first, last


def test_numerically_equal(traced):
    for ref in ("tiny-llama", "tiny-qwen2", "tiny-mistral"):
        loaded, m = traced(ref)
        fused, _ = PassManager("kv-fusion").run(m)
        tokens = list(range(3, 40))
        a = _run(m, loaded.weights, tokens)
        b = _run(fused, loaded.weights, tokens)
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
