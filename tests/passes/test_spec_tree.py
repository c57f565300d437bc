"""spec-tree: the verify function's structure, and its logits against sequential decoding."""

from __future__ import annotations

import pytest
import torch

from arc.errors import ArcError
from arc.ir import dumps, loads
from arc.lowering import lower
from arc.ops import Op
from arc.pipeline import PassManager
from arc.runtime.steps import Steps
from arc.runtime.tree import Tree
from tests.conftest import TINY


def test_structure(traced):
    _, m = traced("tiny-llama")
    out, _ = PassManager("kv-fusion,spec-tree{budget=5,depth=3}").run(m)
    assert len(m.functions) == 2 and m.plan.kind == "plain"  # the input is untouched
    assert sorted(out.functions) == ["decode", "prefill", "verify_2", "verify_4", "verify_6"]
    g = out.functions["verify_6"]
    ins = {n.attrs["name"]: (n.shape, n.dtype) for n in g.inputs()}
    assert ins == {
        "tokens": ((1, 6), "i64"),
        "pos": ((6,), "i64"),
        "write": ((6,), "i64"),
        "visible": ((6, "L"), "bool"),
    }
    write = next(n.id for n in g.inputs() if n.attrs["name"] == "write")
    attn = [n for n in g.nodes if n.op is Op.ATTENTION]
    assert len(attn) == m.kv.layers and {n.attrs["mask"] for n in attn} == {"tree"}
    assert all(n.inputs[2] == write for n in g.nodes if n.op is Op.KV_WRITE)
    assert g.node(g.outputs[0]).shape == (1, 6, 320)  # logits for every node
    assert out.plan.kind == "speculative" and out.plan.options["verify_tokens"] == 6
    assert out.plan.options["verify_sizes"] == [2, 4, 6]
    assert dumps(loads(dumps(out))) == dumps(out)
    flat, _ = PassManager("spec-tree{budget=5,depth=3,ladder=false}").run(m)
    assert sorted(flat.functions) == ["decode", "prefill", "verify_6"]


@pytest.mark.parametrize(
    "ladder, target, sizes",
    [
        ("pow2", "tvm", [2, 4, 8, 10]),  # powers of two below the top
        ("true", "tvm", [2, 4, 8, 10]),  # the option's older boolean spelling
        ("dense", "torch", list(range(2, 11))),  # every size
        ("dense", "tvm", list(range(2, 11))),
        ("none", "tvm", [10]),
        ("false", "torch", [10]),
    ],
)
def test_ladder(ladder, target, sizes, traced):
    from arc.pipeline import PassContext

    _, m = traced("tiny-llama")
    out, _ = PassManager(f"spec-tree{{budget=9,ladder={ladder}}}").run(
        m, PassContext(target=target)
    )
    assert out.plan.options["verify_sizes"] == sizes
    assert sorted(int(k[7:]) for k in out.functions if k.startswith("verify_")) == sizes
    assert out.plan.options["ladder"] in ("pow2", "dense", "none")


def _tree() -> Tree:
    """root -> a -> b -> c, root -> d -> e, a -> f: branches at two depths."""
    t = Tree(17)
    t.add_path([40, 41, 42])
    t.add_path([50, 51])
    t.add_path([40, 60])
    return t


def _path_logits(steps: Steps, prefix: list[int], path: list[int]) -> torch.Tensor:
    """Logits after each token of prefix[-1:] + path, decoding one token at a time."""
    steps.reset()
    steps.prefill(prefix[:-1], 0)
    seq = prefix[-1:] + path
    return torch.stack([steps.decode(t, len(prefix) - 1 + i) for i, t in enumerate(seq)])


@pytest.mark.parametrize("ref", TINY)
@pytest.mark.parametrize("gemv", [False, True], ids=["linear", "small-t-reduction"])
def test_verify_logits_equal_sequential_decoding(ref, gemv, traced):
    loaded, m = traced(ref)
    out, _ = PassManager("kv-fusion,spec-tree{budget=9,depth=4}").run(m)
    fns, kv = lower(out, loaded.weights, gemv=gemv)
    steps = Steps(fns, max_seq_len=out.kv.max_seq_len, reset=kv.reset, move=kv.move)
    prefix = [5, 77, 120, 3, 250, 19, 64, 64, 201, 9, 33, 140, 2, 99, 180, 45, 7] * 2  # 34
    tree = _tree()
    tree.tokens[0] = prefix[-1]
    with torch.inference_mode():
        steps.reset()
        steps.prefill(prefix[:-1], 0)
        got = steps.verify(*tree.inputs(len(prefix) - 1, 10))[: len(tree)]
        for leaf in (3, 5, 6):
            nodes = tree.ancestors(leaf)[::-1]  # root .. leaf
            want = _path_logits(steps, prefix, [tree.tokens[i] for i in nodes[1:]])
            torch.testing.assert_close(got[nodes], want, rtol=1e-4, atol=1e-4)


def test_verify_tree_equals_verify_of_fresh_inputs(traced):
    """Steps.verify_tree (the loop's path: inputs written into buffers kept per tree size and
    mask width) gives exactly the logits of verify over freshly built inputs, also when its
    buffers were last filled for a longer prefix or another tree (no stale mask bits), and
    a decode step through the kept token buffer equals one through fresh tensors."""
    from arc.runtime.tree import build

    loaded, m = traced("tiny-qwen2")
    out, _ = PassManager("spec-tree{budget=9,depth=4}").run(m)
    fns, kv = lower(out, loaded.weights)
    steps = Steps(fns, max_seq_len=out.kv.max_seq_len, reset=kv.reset, move=kv.move)
    prefix = [5, 77, 120, 3, 250, 19, 64, 64, 201, 9, 33, 140, 2, 99, 180, 45, 7] * 2  # 34
    big = _tree()
    small = build(prefix[-1], [(50,), (50, 51)])
    big.tokens[0] = prefix[-1]
    with torch.inference_mode():
        # a longer prefix first, then shorter ones: the kept mask must forget the old cache
        for p, tree in ((33, big), (20, small), (20, big), (12, small), (33, small)):
            steps.reset()
            steps.prefill(prefix[:p], 0)
            tree.tokens[0] = prefix[p]
            got = steps.verify_tree(tree, p, 10)
            steps.reset()
            steps.prefill(prefix[:p], 0)
            want = steps.verify(*tree.inputs(p, 10))
            assert torch.equal(got, want), (p, len(tree))
        assert len(steps._verify_feeds) == 1  # one size, one bucket of slots: one buffer set
        steps.reset()
        steps.prefill(prefix[:20], 0)
        got = steps.decode(prefix[20], 20)
        slots = torch.arange(steps.mask_width(21))
        fresh = fns["decode"](torch.tensor([[prefix[20]]]), torch.tensor([20]), slots)[0, -1]
        assert torch.equal(got, fresh)


def test_moved_kv_equals_sequential_kv(traced):
    """After accepting a path that is not the first branch, the moved cache rows are what
    decoding that path token by token writes."""
    loaded, m = traced("tiny-qwen2")
    out, _ = PassManager("spec-tree{budget=9}").run(m)
    fns, kv = lower(out, loaded.weights)
    steps = Steps(fns, max_seq_len=out.kv.max_seq_len, reset=kv.reset, move=kv.move)
    prefix, tree = [5, 77, 120, 3, 250, 19], _tree()
    tree.tokens[0] = prefix[-1]
    p = len(prefix) - 1
    with torch.inference_mode():
        steps.reset()
        steps.prefill(prefix[:-1], 0)
        steps.verify(*tree.inputs(p, 10))
        steps.move([p + 4, p + 5], [p + 1, p + 2])  # accept root -> d -> e
        moved = [b[:, :, : p + 3].clone() for b in kv.buffers()]
        _path_logits(steps, prefix, [50, 51])
        want = [b[:, :, : p + 3] for b in kv.buffers()]
    for a, b in zip(moved, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("spec-tree{budget=0}", "budget=0"),
        ("spec-tree{budget=4,depth=5}", "depth=5"),
        ("spec-tree{depth=-1}", "depth=-1"),
        ("spec-tree{draft=magic}", "unknown drafter"),
        ("spec-tree{draft=self}", "draft=self needs a `draft` function"),
        ("spec-tree{shape=round}", "unknown tree shape"),
        ("spec-tree{ladder=fib}", "unknown ladder='fib'"),
    ],
)
def test_bad_options(spec, fragment, traced):
    _, m = traced("tiny-llama")
    with pytest.raises(ArcError, match=fragment.replace("{", r"\{")):
        PassManager(spec).run(m)


def test_tree_must_fit_cache_and_window(traced):
    _, small = traced("tiny-llama", max_seq_len=16)
    with pytest.raises(ArcError, match="cannot fit a cache"):
        PassManager("spec-tree{budget=8}").run(small)
    _, mistral = traced("tiny-mistral")  # sliding window 24
    with pytest.raises(ArcError, match="sliding"):
        PassManager("spec-tree{budget=24,depth=4}").run(mistral)


def test_depth_defaults_to_the_budget(traced):
    """A tree may be one chain of the whole budget (a copy that runs on) unless depth says
    otherwise; a small budget needs no depth of its own."""
    _, m = traced("tiny-llama")
    for spec, want in [("spec-tree", 7), ("spec-tree{budget=3}", 3), ("spec-tree{depth=2}", 2)]:
        out, _ = PassManager(spec).run(m)
        assert out.plan.options["depth"] == want, spec


@pytest.mark.parametrize(
    "edit, fragment",
    [
        ({"budgett": 3}, "unknown option 'budgett'"),  # a misspelt key is not ignored
        ({"cost_ratio": {"x": 1.5}}, "cost_ratio"),  # its keys are tree sizes
        ({"cost_ratio": {"-2": 1.5}}, "cost_ratio"),
    ],
)
def test_crafted_plan_options_are_refused(edit, fragment, traced):
    """What an engine's manifest says of its plan is checked key by key at load (anyone can
    edit a manifest); the pass's own options pass the same check."""
    from arc.runtime.speculative import check_plan

    _, m = traced("tiny-llama")
    out, _ = PassManager("kv-fusion,spec-tree").run(m)
    options = dict(out.plan.options)
    check_plan("speculative", options, out)  # the pass's own plan: accepted
    check_plan("speculative", {**options, "cost_ratio": {"2": 1.2, "8": 2.9}}, out)
    with pytest.raises(ArcError, match=fragment):
        check_plan("speculative", {**options, **edit}, out)
    check_plan("plain", {}, m)
    with pytest.raises(ArcError, match="takes no options"):
        check_plan("plain", {"draft": "ngram"}, m)
