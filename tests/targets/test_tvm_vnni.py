"""The tvm target's integer panel kernel (act=q8, targets/tvm_vnni.py) against NumPy, its rows
the same bits whatever the token count, and engines built with it: -O2's ids and verify logits
are -O1's (same act), the engine says it needs VNNI, a CPU or target without it is refused.
Needs a CPU with AVX-512 VNNI and VBMI (Intel Ice Lake / Sapphire Rapids, AMD Zen 4)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm", reason="target tvm needs the [tvm] extra (apache-tvm)")

from arc import cpu as arc_cpu  # noqa: E402
from arc.errors import ArcError, UnsupportedError  # noqa: E402
from arc.targets import tvm_amx_q8, tvm_vnni  # noqa: E402

pytestmark = pytest.mark.extra
vnni = pytest.mark.skipif(
    bool(arc_cpu.missing_flags(tvm_vnni.FLAGS)),
    reason="act=q8's kernel needs AVX-512 VNNI and VBMI, which this CPU lacks",
)

N, K, G = 48, 96, 32
KINDS = [("affine4", "float32"), ("affine4", "float16"), ("sym8", "float16")]


def _weight(kind: str, rng, scale: str, g: int = G):
    """(components as stored [N, ...], integer codes [N, K], d [N, K/g], m [N, K/g] or None)."""
    d = rng.standard_normal((N, K // g)).astype(scale).astype("float32")
    if kind == "sym8":
        codes = rng.integers(-127, 128, (N, K // g, g)).astype("int8")
        return [codes, d], codes.reshape(N, K).astype("float64"), d, None
    codes = rng.integers(0, 256, (N, K // g, g // 2)).astype("uint8")
    m = rng.standard_normal((N, K // g)).astype(scale).astype("float32")
    q = np.concatenate([codes & 15, codes >> 4], axis=-1).reshape(N, K).astype("float64")
    return [codes, d, m], q, d, m


def _reference(x, q, d, m, g: int = G):
    """float64 y of int8 activations (rounded as the kernel does, in fp32) x integer codes."""
    t = x.shape[0]
    xb = x.reshape(t, K // g, g)
    amax = np.abs(xb).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype("float32")
    xq = np.rint(xb * inv).astype("float64")  # [T, B, G]
    qb = q.reshape(N, K // g, g)
    y = np.einsum("tbg,nbg,nb,tb->tn", xq, qb, d.astype("float64"), amax[..., 0] / 127.0)
    if m is not None:
        y += np.einsum("tb,nb->tn", xb.sum(-1, dtype="float64"), m.astype("float64"))
    return y


@pytest.fixture(scope="module")
def built():
    import tvm

    target = tvm.target.Target(
        {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "mattr": tvm_vnni.MATTR}
    )
    out = {}
    for kind, scale in KINDS:
        f = tvm_vnni.panel_gemv_q8(kind, N, K, G, scale).with_attr("global_symbol", "main")
        out[kind, scale] = tvm.compile(tvm.IRModule({"main": f}), target=target)["main"]
    # a group that is not a power of two (int4's group=48): the block max and sum fold all lanes
    f = tvm_vnni.panel_gemv_q8("affine4", N, K, 48, "float32").with_attr("global_symbol", "main")
    out["affine4", "g48"] = tvm.compile(tvm.IRModule({"main": f}), target=target)["main"]
    return out


def _run(built, kind, scale, comps, x):
    import torch
    import tvm

    from arc.targets.tvm_kernels import to_panels

    panels = [to_panels(torch.from_numpy(c)).numpy() for c in comps]
    panels = [p.astype(scale) if p.dtype == np.float32 and scale != "g48" else p for p in panels]
    y = np.full((x.shape[0], N), np.nan, "float32")  # every output must be written
    args = [tvm.runtime.tensor(a) for a in (x, *panels, y)]
    built[kind, scale](*args)
    return args[-1].numpy()


@vnni
@pytest.mark.parametrize("kind, scale", KINDS)
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 6, 8, 17])
def test_q8_kernel_equals_numpy(built, kind, scale, tokens):
    rng = np.random.default_rng(tokens)
    comps, q, d, m = _weight(kind, rng, scale)
    x = rng.standard_normal((tokens, K)).astype("float32")
    x[0, G : 2 * G] = 0.0  # a block of zeros: scale 0, no 0/0
    got = _run(built, kind, scale, comps, x)
    ref = _reference(x, q, d, m)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    dense = (q * np.repeat(d, G, 1) + (np.repeat(m, G, 1) if m is not None else 0)).T
    assert np.abs(got - x.astype("float64") @ dense).max() > 1e-4 * np.abs(ref).max()


@vnni
def test_q8_kernel_folds_a_block_that_is_not_a_power_of_two(built):
    rng = np.random.default_rng(48)
    comps, q, d, m = _weight("affine4", rng, "float32", 48)
    x = rng.standard_normal((3, K)).astype("float32")
    got = _run(built, "affine4", "g48", comps, x)
    ref = _reference(x, q, d, m, 48)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@vnni
@pytest.mark.parametrize("kind, scale", KINDS)
def test_q8_rows_are_the_same_bits_whatever_the_token_count(built, kind, scale):
    """Integer sums are exact and each token's float sum runs over the blocks in one order in
    every tile (tvm_vnni.TILES): a verify's logits are the decode step's bit for bit."""
    rng = np.random.default_rng(7)
    comps, *_ = _weight(kind, rng, scale)
    x = rng.standard_normal((17, K)).astype("float32")
    one = np.concatenate([_run(built, kind, scale, comps, x[t : t + 1]) for t in range(17)])
    for tokens in (2, 3, 4, 5, 8, 9, 17):
        np.testing.assert_array_equal(_run(built, kind, scale, comps, x[:tokens]), one[:tokens])


def test_q8_kernel_refuses_what_it_cannot_take():
    assert not tvm_vnni.applies("f32", 0, 96) and not tvm_vnni.applies("affine4", 12, 96)
    with pytest.raises(ValueError, match="does not apply"):
        tvm_vnni.panel_gemv_q8("affine4", 40, K, G)  # rows not a multiple of 16


SPEC = "kv-fusion,weight-format{mode=int4,act=q8}"


@pytest.fixture(scope="module")
def q8_engines(tmp_path_factory):
    """'O1' / 'O2' -> tvm engine path of tiny-qwen2 (projection biases) with act=q8, and
    'eager' the torch target's eager engine of the -O2 pipeline."""
    from arc.compiler import CompileOptions, compile_model

    out, built = tmp_path_factory.mktemp("q8"), {}
    for name, spec, target in (
        ("O1", SPEC, "tvm"),
        ("O2", SPEC + ",spec-tree", "tvm"),
        ("eager", SPEC + ",spec-tree", "torch"),
    ):
        path = out / f"{name}.arc"
        opts = {"mode": "eager"} if target == "torch" else {}
        o = CompileOptions(target=target, spec=spec, max_seq_len=128, target_options=opts)
        compile_model("tiny-qwen2", path, o)
        built[name] = path
    return built


@vnni
def test_q8_engines_o2_ids_are_o1_ids_and_the_eager_forms(q8_engines):
    from arc.engine import read_manifest
    from arc.runtime.load import load_engine
    from arc.runtime.sampling import SamplingParams

    prompt, ids, verifies = "Write a Python function that checks if a number is prime.", {}, 0
    for name, path in q8_engines.items():
        eng = load_engine(path)
        r = eng.generator.generate(eng.prompt_ids(prompt), max_new_tokens=40, ignore_eos=True)
        ids[name] = r.token_ids
        verifies += r.verify_passes if name == "O2" else 0
    assert ids["O2"] == ids["O1"] == ids["eager"]
    assert verifies > 0
    sampled = []  # seeded sampling: each position's own uniform, so -O2 draws what -O1 draws
    for name in ("O1", "O2"):
        eng = load_engine(q8_engines[name])
        how = SamplingParams(temperature=0.8, top_p=0.9, seed=3)
        r = eng.generator.generate(eng.prompt_ids(prompt), max_new_tokens=40, sampling=how)
        sampled.append(r.token_ids)
    assert sampled[0] == sampled[1] and sampled[0] != ids["O1"]
    info = read_manifest(q8_engines["O2"])["target"]
    assert info["activations"] == "q8" and tvm_vnni.FLAGS <= set(info["cpu_flags"])
    # on a CPU with AMX int8 the verifies ran on tiles (targets/tvm_amx_q8.py): same ids
    assert info["amx_q8"] == (not arc_cpu.missing_flags(tvm_amx_q8.FLAGS))


@vnni
def test_q8_verify_logits_are_the_decode_steps_bit_for_bit(q8_engines):
    import torch

    from arc.runtime.load import load_engine
    from arc.runtime.tree import Tree

    steps = load_engine(q8_engines["O2"]).generator.steps
    text = list(range(3, 3 + 40))
    with torch.inference_mode():
        steps.prefill(text[:9], 0)
        want = [steps.decode(text[9 + i], 9 + i).clone() for i in range(6)]
        for size in steps.verify_sizes:
            steps.prefill(text[:9], 0)
            tree = Tree(text[9])
            tree.add_path(text[10 : 9 + min(size, 6)])
            got = steps.verify_tree(tree, 9, size)
            for node in range(len(tree)):
                assert torch.equal(got[node], want[node]), (size, node)


def test_q8_refused_where_it_cannot_run(tmp_path):
    """A level without AVX-512 is one line; x86-64-v4 records VNNI and VBMI as needed (the
    engine is then refused on a CPU without them); onnx does not lower act=q8, torch only
    eagerly."""
    from arc.compiler import CompileOptions, compile_model
    from arc.targets import tvm as tvm_target

    with pytest.raises(UnsupportedError, match="act=q8.*VNNI.*x86-64-v3 lacks"):
        tvm_target._target("x86-64-v3", q8=True)
    _, info = tvm_target._target("x86-64-v4", q8=True)
    assert tvm_vnni.FLAGS <= set(info["cpu_flags"])
    _, plain = tvm_target._target("x86-64-v4")
    assert "avx512_vnni" not in plain["cpu_flags"]
    opts = CompileOptions(target="torch", spec=SPEC, max_seq_len=128)  # aot on a CPU
    with pytest.raises(ArcError, match="target torch runs weight-format.act=q8. only with"):
        compile_model("tiny-qwen2", tmp_path / "t.arc", opts)
    assert not (tmp_path / "t.arc").exists()
    pytest.importorskip("onnxruntime", reason="target onnx needs the [onnx] extra")
    opts = CompileOptions(target="onnx", spec=SPEC, max_seq_len=128)
    with pytest.raises(ArcError, match="target onnx.*act=q8"):
        compile_model("tiny-qwen2", tmp_path / "o.arc", opts)
    assert not (tmp_path / "o.arc").exists()
