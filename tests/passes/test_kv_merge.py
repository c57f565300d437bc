"""kv-fusion{share=N,merge=slerp}: MiniCache's merge of a layer pair's KV (structure, the merge
formula, the cache, numerics against a reference, refusals, an AOTInductor engine)."""

import math
import re

import pytest
import torch

from arc import targets
from arc.errors import ArcError, UnsupportedError
from arc.ir import KVDecl, dumps, format_module, loads
from arc.lowering import KVCache, lower, slerp_merge
from arc.ops import Op
from arc.pipeline import PassManager
from arc.verify import VerifyError, verify
from tests.e2e.cli import arc, assert_clean_error

TINY = ("tiny-llama", "tiny-qwen2", "tiny-mistral")
MERGE = "kv-fusion{share=1,merge=slerp}"


def _ops(g, op):
    return [n for n in g.nodes if n.op is op]


def test_structure(traced):
    _, m = traced("tiny-llama")
    out, rec = PassManager(MERGE).run(m)
    assert (out.kv.layers, out.kv.merged, m.kv.merged) == (1, 1, 0)
    for fn in ("prefill", "decode"):
        g = out.functions[fn]
        first, second = _ops(g, Op.KV_WRITE)
        assert (first.attrs["layer"], first.attrs["merge"], len(first.inputs)) == (0, 0, 3)
        assert (second.attrs["layer"], second.attrs["merge"]) == (0, 1)
        assert second.inputs[3] == first.id  # the later write merges the earlier one's rows
        a0, a1 = _ops(g, Op.ATTENTION)
        assert (a0.inputs[1], a0.attrs["merge"]) == (first.id, 0)
        assert (a1.inputs[1], a1.attrs["merge"]) == (second.id, 1)
    assert "layers.1.wq+wk+wv" in out.used_weights()  # both layers still project k and v
    facts = rec[0].facts
    assert facts["kv_merge"] == "slerp" and facts["shared_kv_layers"] == "0+1"
    # one layer of f32 directions (2 heads x 16 x 4 bytes, k and v) + 2 layers' k, v norms
    assert facts["kv_bytes_per_token_after"] == 2 * 2 * 16 * 4 + 2 * 2 * 2 * 4 == 288
    assert out.kv.bytes_per_token() == 288
    assert "(1 merged pairs + f32 norms)  (288 B/token)" in format_module(out)
    assert loads(dumps(out)).kv == out.kv
    assert '"merged"' not in dumps(m)  # an unmerged module's JSON is as before
    reuse, rec = PassManager("kv-fusion{share=1}").run(m)
    assert reuse.kv.merged == 0 and rec[0].facts["kv_merge"] == "reuse"


def test_verify_catches_a_broken_pair(traced):
    _, m = traced("tiny-llama")
    out, _ = PassManager(MERGE).run(m)
    g = out.functions["decode"]
    second = _ops(g, Op.KV_WRITE)[1]
    broken = tuple(
        n if n.id != second.id else type(n)(n.id, n.op, n.inputs[:3], n.attrs, n.shape, n.dtype)
        for n in g.nodes
    )
    bad = out.with_functions({**out.functions, "decode": type(g)(g.name, broken, g.outputs)})
    with pytest.raises(VerifyError, match="3 inputs, expected 4"):
        verify(bad)


def _slerp(x, y, t):
    """SLERP of unit vectors by its textbook formula (Shoemake 1985)."""
    w = torch.arccos((x * y).sum(-1, keepdim=True).clamp(-1, 1))
    return (torch.sin((1 - t) * w) * x + torch.sin(t * w) * y) / torch.sin(w)


def test_slerp_merge_is_the_formula():
    a, b = torch.randn(1, 2, 7, 16, dtype=torch.float64), torch.randn(1, 2, 7, 16) * 3
    b = b.double()
    e, norms = slerp_merge(a, b)
    x, y = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(e, _slerp(x, y, 0.5))
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(1, 2, 7, dtype=torch.float64))
    assert torch.equal(
        norms, torch.cat([a.norm(dim=-1, keepdim=True), b.norm(dim=-1)[..., None]], -1)
    )
    # the merged direction bisects the angle: equally far from both
    torch.testing.assert_close((e * x).sum(-1), (e * y).sum(-1))


def test_cache_reads_parallel_rows_back_exactly():
    """Two layers whose rows point the same way (b = c * a, c > 0) lose nothing in the merge:
    each reads back its own rows; the norms are stored exactly."""
    decl = KVDecl(layers=2, kv_heads=2, head_dim=8, max_seq_len=16, merged=1)
    kv = KVCache(decl)
    assert not hasattr(kv, "km0") and kv.km1.shape == (1, 2, 17, 2)
    a, va = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    c = torch.rand(1, 2, 3, 1) * 4 + 0.1
    pos = torch.tensor([4, 5, 6])
    kv.write_merged(1, pos, (a, va), a * c, va / c)
    for part, (k, v) in enumerate([(a, va), (a * c, va / c)]):
        rk, rv = (x[:, :, 4:7] for x in kv.read(1, 7, part))
        torch.testing.assert_close(rk, k)
        torch.testing.assert_close(rv, v)
    assert torch.equal(kv.km1[:, :, 4:7, 0:1], a.norm(dim=-1, keepdim=True))
    assert not kv.k0.any()  # the plain layer untouched


def _logits(module, weights, tokens, patch=None):
    """Logits [1, n, vocab]: prefill of all but the last token, then one decode step."""
    fns, kv = lower(module, weights)
    if patch:
        patch(kv)
    n = len(tokens)
    pos = torch.arange(n)
    with torch.inference_mode():
        first = fns["prefill"](torch.tensor([tokens[:-1]]), pos[:-1], torch.arange(n - 1))
        last = fns["decode"](torch.tensor([[tokens[-1]]]), pos[-1:], torch.arange(n))
    return torch.cat([first, last], dim=1)


def _merged_reads(kv):
    """Patch a plain two-layer cache so that layer i reads MiniCache's reconstruction of the
    pair (0, 1), norm_i * SLERP(directions), with the rows the current call wrote exact."""
    own_read, own_write, written = kv.read, kv.write, {}

    def write(i, pos, k, v):
        written["pos"] = pos
        own_write(i, pos, k, v)

    def read(i, length):
        (ka, va), (kb, vb) = own_read(0, length), own_read(1, length)
        exact, pos = own_read(i, length), written["pos"]
        out = []
        for (x, y), own in zip(((ka, kb), (va, vb)), exact, strict=True):
            e, norms = slerp_merge(x, y)
            rebuilt = e * norms[..., i : i + 1]  # [1, KV, L, D]
            out.append(rebuilt.index_copy(2, pos, own.index_select(2, pos)))
        return tuple(out)

    kv.write, kv.read = write, read


def test_numerically_the_merge(traced):
    """Prefill attends only to its own exact rows, so it equals the unmerged model; the decode
    step reads the merged past and equals the reference that merges by the formula."""
    tokens = list(range(3, 60))
    for ref in TINY:
        loaded, m = traced(ref)
        merged, _ = PassManager(MERGE).run(m)
        plain = _logits(m, loaded.weights, tokens)
        got = _logits(merged, loaded.weights, tokens)
        assert torch.equal(got[:, :-1], plain[:, :-1]), ref
        want = _logits(m, loaded.weights, tokens, patch=_merged_reads)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got[:, -1] - plain[:, -1]).abs().max() > 1e-2  # the merge does change decode


def test_int8_and_merge_compose(traced):
    loaded, m = traced("tiny-mistral")
    both, rec = PassManager("kv-fusion{kv-dtype=int8,share=1,merge=slerp}").run(m)
    assert (both.kv.layers, both.kv.dtype, both.kv.merged) == (1, "int8", 1)
    assert rec[0].facts["kv_bytes_per_token_after"] == 2 * 2 * (16 + 4) + 2 * 2 * 2 * 4
    merged, _ = PassManager(MERGE).run(m)
    tokens = list(range(3, 60))
    a, b = _logits(both, loaded.weights, tokens), _logits(merged, loaded.weights, tokens)
    assert 0 < ((a - b).norm() / b.norm()).item() < 2e-2


def test_refusals(traced):
    _, m = traced("tiny-llama")
    with pytest.raises(ArcError, match=re.escape("merge='avg'; choose from reuse, slerp")):
        PassManager("kv-fusion{share=1,merge=avg}").run(m)
    with pytest.raises(ArcError, match="spec-tree: cannot verify merged KV layers"):
        PassManager(MERGE + ",spec-tree").run(m)
    with pytest.raises(ArcError, match="kind=sink-window cannot read merged KV layers"):
        PassManager(MERGE + ",sparse-attention{kind=sink-window,sink=4,window=32}").run(m)
    with pytest.raises(ArcError, match="merge=slerp cannot merge layers read with mask"):
        PassManager("sparse-attention{kind=block-topk,block=16,topk=2}," + MERGE).run(m)
    out, _ = PassManager(MERGE).run(m)
    for name in ("onnx", "tvm"):
        try:
            target = targets.get(name)
        except ArcError:
            continue  # the extra is not installed here
        with pytest.raises(UnsupportedError, match=f"target {name} cannot lower merged KV"):
            target.check_module(out)
    targets.get("torch").check_module(out)


@pytest.mark.parametrize("mode", ["jit", "aot"])
def test_compiled_engine(traced, tmp_path, mode):
    """torch.compile (jit) and AOTInductor (aot, exported with dynamic T and L) lower the
    merged pair: prefill then decode steps give eager's logits (f32 throughout; the compiled
    sums may differ in order only)."""
    from arc.compiler import CompileOptions, compile_model
    from arc.runtime.load import load_engine

    path = tmp_path / f"merge-{mode}.arc"
    opts = CompileOptions(spec=MERGE, max_seq_len=64, target_options={"mode": mode})
    compile_model("tiny-llama", path, opts)
    engine = load_engine(path)
    assert engine.manifest["target"]["mode"] == mode and engine.module.kv.merged == 1
    loaded, m = traced("tiny-llama", 64)
    passed, _ = PassManager(MERGE).run(m)
    tokens = list(range(5, 30))
    fns, _ = lower(passed, loaded.weights)
    n = len(tokens)
    with torch.inference_mode():
        fns["prefill"](torch.tensor([tokens[:-3]]), torch.arange(n - 3), torch.arange(n - 3))
        want = [
            fns["decode"](torch.tensor([[tokens[i]]]), torch.tensor([i]), torch.arange(i + 1))
            for i in range(n - 3, n)
        ]
    steps = engine.generator.steps
    steps.reset()
    steps.prefill(tokens[:-3], 0)
    got = [steps.decode(tokens[i], i) for i in range(n - 3, n)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.reshape(-1), w.reshape(-1), rtol=1e-4, atol=1e-4)
    assert math.isfinite(float(got[-1].sum()))
    shown = arc("inspect", str(path))
    assert shown.returncode == 0, shown.stderr
    assert "kv cache 512 -> 288 bytes/token  dtype=f32  layers 2 -> 1  shared=0+1  merge=slerp" in (
        shown.stdout
    )


def test_cli_refuses_a_rows_target(tmp_path):
    try:
        targets.get("onnx")
    except ArcError:
        pytest.skip("the onnx extra is not installed")
    out = str(tmp_path / "x.arc")
    done = arc("compile", "tiny-llama", "--target", "onnx", "--passes", MERGE, "-o", out)
    assert_clean_error(done, "target onnx cannot lower merged KV layers")
