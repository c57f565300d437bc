"""The IR prints, verifies, round-trips through JSON, and converts to networkx."""

from dataclasses import replace

import networkx as nx
import pytest

from arc.ir import Node, dumps, format_module, loads, to_dot, to_networkx
from arc.ops import Op
from arc.verify import VerifyError, verify


def test_prints_readable_text(traced):
    _, m = traced("tiny-llama")
    text = format_module(m)
    assert "func @prefill(%0 tokens: i64[1,T], %1 pos: i64[T], %2 slots: i64[L])" in text
    assert "func @decode(%0 tokens: i64[1,1]" in text
    assert "= linear(%4, w=layers.0.wq)  # f32[1,T,64]" in text
    assert "attention(" in text and "mask=causal" in text


def test_json_round_trip_is_exact(traced):
    for ref in ("tiny-llama", "tiny-qwen2", "tiny-mistral"):
        _, m = traced(ref)
        back = loads(dumps(m))
        assert dumps(back) == dumps(m)
        assert format_module(back) == format_module(m)
        verify(back)


def test_mistral_traces_sliding_window(traced):
    _, m = traced("tiny-mistral")
    attn = [n for n in m.functions["decode"].nodes if n.op is Op.ATTENTION]
    assert attn and all(n.attrs["mask"] == "sliding" and n.attrs["window"] == 24 for n in attn)


def test_networkx_graph_matches_nodes(traced):
    _, m = traced("tiny-llama")
    g = m.functions["decode"]
    dg = to_networkx(g)
    assert dg.number_of_nodes() == len(g.nodes)
    assert nx.is_directed_acyclic_graph(dg)
    assert dg.number_of_edges() == sum(len(n.inputs) for n in g.nodes)
    assert to_dot(g).startswith('digraph "decode"')


def _replace_node(m, fn, idx, node):
    g = m.functions[fn]
    nodes = list(g.nodes)
    nodes[idx] = node
    return m.with_functions({**m.functions, fn: replace(g, nodes=tuple(nodes))})


def test_verify_catches_wrong_shape(traced):
    _, m = traced("tiny-llama")
    g = m.functions["decode"]
    i, n = next((i, n) for i, n in enumerate(g.nodes) if n.op is Op.LINEAR)
    bad = _replace_node(m, "decode", i, replace(n, shape=(1, 1, 999)))
    with pytest.raises(VerifyError, match="recorded shape"):
        verify(bad)


def test_verify_catches_unknown_weight_and_dangling(traced):
    _, m = traced("tiny-llama")
    g = m.functions["decode"]
    i, n = next((i, n) for i, n in enumerate(g.nodes) if n.op is Op.RMSNORM)
    attrs = dict(n.attrs, w="nope")
    with pytest.raises(VerifyError, match="unknown weight"):
        verify(_replace_node(m, "decode", i, replace(n, attrs=attrs)))
    extra = Node(len(g.nodes), Op.SILU, (n.id,), {}, n.shape, n.dtype)
    dangling = m.with_functions({**m.functions, "decode": replace(g, nodes=g.nodes + (extra,))})
    with pytest.raises(VerifyError, match="dangling"):
        verify(dangling)


def test_verify_catches_kv_layer_without_declaration(traced):
    _, m = traced("tiny-llama")
    g = m.functions["decode"]
    i, n = next((i, n) for i, n in enumerate(g.nodes) if n.op is Op.KV_WRITE)
    with pytest.raises(VerifyError, match="no KV declaration"):
        verify(_replace_node(m, "decode", i, replace(n, attrs=dict(n.attrs, layer=7))))
