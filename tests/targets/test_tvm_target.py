"""The tvm target: greedy ids equal to the torch target's (eager) for the same -O2 pipeline,
what the engine records, and the refusals (an op or mask it cannot lower, an engine built by
another tvm or for CPU extensions this CPU lacks). One engine build per module."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("tvm", reason="target tvm needs the [tvm] extra (apache-tvm)")

from arc.errors import ArcError, EngineError, UnsupportedError  # noqa: E402
from arc.ops import Op  # noqa: E402

pytestmark = pytest.mark.extra

REF = "tiny-mistral"  # sliding window (24 tokens) and, at -O2, the tree mask
PROMPTS = ["a" * 70, "Write a Python function that checks if a number is prime."]
N = 40


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """target -> (engine path, compile summary) for REF at -O2 with 256 slots."""
    from arc.compiler import CompileOptions, compile_model
    from arc.presets import preset_spec

    out, spec = tmp_path_factory.mktemp("tvm"), preset_spec("O2")
    built = {}
    for target, options in (("tvm", {}), ("torch", {"mode": "eager"})):
        path = out / f"{target}.arc"
        opts = CompileOptions(target=target, spec=spec, max_seq_len=256, target_options=options)
        built[target] = (path, compile_model(REF, path, opts))
    return built


def _greedy(path, prompt: str):
    from arc.runtime.load import load_engine

    eng = load_engine(path)
    return eng.generator.generate(eng.prompt_ids(prompt), max_new_tokens=N, ignore_eos=True)


def test_greedy_ids_equal_torch_eager(engines):
    verifies = 0
    for prompt in PROMPTS:
        got, want = _greedy(engines["tvm"][0], prompt), _greedy(engines["torch"][0], prompt)
        assert got.token_ids == want.token_ids, prompt
        verifies += got.verify_passes
    assert verifies > 0  # the tree verify (tree mask, scratch slots) ran


def test_verify_logits_are_the_decode_steps_bit_for_bit(engines):
    """Each node of a verified chain gets the logits a decode step at its position gets, to
    the bit (projections and the softmax sum in the same order whatever the call's T): so
    spec-tree's output is plain decoding's, greedy or sampled, even where two tokens' logits
    are within rounding of each other."""
    import torch

    from arc.runtime.load import load_engine
    from arc.runtime.tree import Tree

    steps = load_engine(engines["tvm"][0]).generator.steps
    text = list(range(3, 3 + 70))  # token ids; the window (24) and the bucket (64) crossed
    with torch.inference_mode():
        for start in (5, 30, 57):
            steps.prefill(text[:start], 0)
            want = []
            for i in range(6):  # decode steps write slots start.. in order, as accepted nodes
                want.append(steps.decode(text[start + i], start + i).clone())
            for size in steps.verify_sizes:
                steps.prefill(text[:start], 0)
                tree = Tree(text[start])
                tree.add_path(text[start + 1 : start + min(size, 6)])
                got = steps.verify_tree(tree, start, size)
                for node in range(len(tree)):
                    assert torch.equal(got[node], want[node]), (start, size, node)


def test_engine_records_library_and_a_static_verify_per_size(engines):
    import tvm

    from arc.engine import read_manifest

    info = read_manifest(engines["tvm"][0])["target"]
    assert info["tvm_version"] == tvm.__version__ and info["library"] == "model.so"
    assert isinstance(info["cpu_flags"], list) and info["weights_run_as"] == ["f32"]
    verify = {k: v for k, v in info["functions"].items() if k.startswith("verify_")}
    # each verify_B is its own Relax function, B static (tvm_graph.STATIC_VERIFY); prefill
    # keeps a symbolic T, decode T = 1
    assert len(verify) > 1 and len(set(verify.values())) == len(verify)
    named = {info["functions"][k] for k in ("decode", "prefill")}
    assert len(named) == 2 and not named & set(verify.values())
    want = "avx512" if "avx512f" in info["cpu_flags"] else "avx2-native"  # a native build
    assert info["tiles"] == want
    assert info["inlane"] == (want == "avx2-native" and "avx2" in info["cpu_flags"])
    # its verify is the decode step bit for bit (the test above): no near-tie guard needed
    from arc.runtime.load import load_engine

    assert info["verify_exact"] is True
    assert load_engine(engines["tvm"][0]).generator.steps.verify_exact is True
    assert load_engine(engines["torch"][0]).generator.steps.verify_exact is False


def test_weights_pass_unchecked_by_the_vm_and_checked_by_each_kernel(engines):
    """The functions take the weights' tuple as an opaque object and declare each weight's
    shape (tvm_graph.Builder.add: no VM check of ~430 weights on every call); a weight of
    another shape or dtype, or a tuple short of one, is still refused, with an error, by the
    argument checks of the kernel that reads it."""
    import torch
    import tvm

    from arc.engine import read_manifest
    from arc.runtime.load import load_engine

    path = engines["tvm"][0]
    eng = load_engine(path)
    vm, params, _ = eng.generator.steps._keep_alive
    decode = vm[read_manifest(path)["target"]["functions"]["decode"]]
    kv = eng.module.kv
    cache = torch.zeros(2 * kv.layers, kv.kv_heads, kv.max_seq_len + 1, kv.head_dim)
    feeds = [torch.tensor([[5]]), torch.tensor([3]), torch.arange(3)]

    def run(weights):
        args = [tvm.runtime.from_dlpack(t) for t in (*feeds, cache)]
        return torch.from_dlpack(decode(*args, tvm.runtime.convert(weights))[0]).clone()

    good = list(params)
    assert torch.isfinite(run(good)).all()
    for i, weight in enumerate(good):  # every weight, a kernel's or a legalized op's
        t = torch.from_dlpack(weight)
        wrong = [torch.zeros((t.shape[0] + 16, *t.shape[1:]), dtype=t.dtype)]  # shape
        if i == 0:
            wrong.append(torch.zeros(t.shape, dtype=torch.float64))  # dtype
            wrong.append(torch.zeros(t.shape[1:], dtype=t.dtype))  # rank
        for bad in wrong:
            with pytest.raises((ValueError, TypeError)):
                run([*good[:i], tvm.runtime.from_dlpack(bad), *good[i + 1 :]])
    with pytest.raises(IndexError):
        run(good[:-1])


def test_functions_take_the_weights_as_one_opaque_object(traced):
    """Every model function's last parameter, the weights' tuple, is an opaque object, and
    each weight it reads is declared with its shape at its one getitem: a typed tuple made
    the VM check every weight on every call (1,280 of a decode step's 3,600 VM calls)."""
    from tvm import relax

    from arc.targets import tvm as target
    from arc.targets.tvm_graph import GET

    _, module = traced("tiny-llama")
    mod, functions, names = target._relax_module(module)
    for fn in functions.values():
        assert isinstance(mod[fn].params[-1].ty, relax.ObjectType), fn
        calls = _calls(mod[fn])
        gets = [c for c in calls if getattr(c.args[0], "global_symbol", "") == GET]
        assert gets and all(g.ty_args[0].shape is not None for g in gets), fn
        taken = [int(g.args[2].value) for g in gets]  # each weight's index, once
        assert len(set(taken)) == len(taken) and set(taken) <= set(range(len(names))), fn


def test_new_v_rows_are_read_in_place_not_sliced_out(traced):
    """Attention and the cache write read each layer's new V rows at their columns of the fused
    QKV output (as RoPE reads q and k): no model function copies a slice of it out (30
    strided_slice calls a decode step before); the one strided_slice left is a prefill's last
    row (axis 0)."""

    from arc.pipeline import PassManager
    from arc.targets import tvm as target

    _, module = traced("tiny-llama")
    module, _ = PassManager("kv-fusion,spec-tree").run(module)  # Q/K/V one projection
    mod, functions, _ = target._relax_module(module)
    assert {"decode", "verify_8"} <= set(functions), set(functions)
    for fn in functions.values():
        slices = [c for c in _calls(mod[fn]) if getattr(c.op, "name", "") == "relax.strided_slice"]
        assert [int(c.args[1][0].value) for c in slices] in ([], [0]), fn


def _calls(func) -> list:
    """The Relax calls bound in a function's body, in order."""
    from tvm import relax

    values = [b.value for block in func.body.blocks for b in block.bindings]
    return [v for v in values if isinstance(v, relax.Call)]


def test_tile_plan_follows_the_registers_and_where_the_code_runs(monkeypatch):
    """AVX-512 builds take its plan; AVX2 code built for this CPU one chain per token
    (tvm_kernels.TILES_AVX2_NATIVE), a portable x86-64-v3 build the 2-chain AVX2 plan."""
    from arc import cpu as arc_cpu
    from arc.targets import tvm as target
    from arc.targets import tvm_kernels

    cases = [  # (march, flags, plan, codes widened by vpshufb)
        ("native", {"avx2", "fma", "avx512f"}, "avx512", False),
        ("native", {"avx2", "fma"}, "avx2-native", True),
        ("native", {"asimd"}, "avx2-native", False),  # not x86: no x86 intrinsics
        ("x86-64-v3", {"avx2", "fma"}, "avx2", True),
        ("x86-64-v4", {"avx2", "fma", "avx512f"}, "avx512", False),
    ]
    for march, flags, plan, inlane in cases:
        pick = lambda cpu, m=march, f=flags: (m, frozenset(f))  # noqa: E731
        monkeypatch.setattr(arc_cpu, "build_target", pick)
        record = target._target(march)[1]
        assert (record["tiles"], record["inlane"]) == (plan, inlane), (march, flags)
        assert tvm_kernels.PLANS[plan]  # a plan the kernels know
    avx2 = lambda cpu: ("native", frozenset({"avx2", "fma"}))  # noqa: E731
    monkeypatch.setattr(arc_cpu, "build_target", avx2)
    monkeypatch.setenv("ARC_TVM_TILES", "avx2")  # another plan of the same registers
    assert target._target("native")[1]["tiles"] == "avx2"
    for bad in ("avx512", "nope"):  # not AVX2's, not a plan
        monkeypatch.setenv("ARC_TVM_TILES", bad)
        with pytest.raises(ArcError, match="ARC_TVM_TILES="):
            target._target("native")
    # one chain per token in every plan of a kind: a verify's rows sum as the step's
    for tiles in tvm_kernels.PLANS.values():
        assert len({tile[2] for tile in tiles}) == 1


def _info(engines) -> dict:
    from arc.engine import read_manifest

    return dict(read_manifest(engines["tvm"][0])["target"])


def test_check_engine_refuses_other_tvm_and_missing_cpu_flags(engines):
    from arc.targets import tvm as target

    target.check_engine(_info(engines))  # built here: accepted
    with pytest.raises(EngineError, match="built by tvm 0.0.1"):
        target.check_engine(_info(engines) | {"tvm_version": "0.0.1"})
    with pytest.raises(EngineError, match="amx_imaginary"):
        target.check_engine(_info(engines) | {"cpu_flags": ["avx2", "amx_imaginary"]})
    with pytest.raises(EngineError, match="rebuild"):
        target.check_engine({k: v for k, v in _info(engines).items() if k != "cpu_flags"})


def test_check_module_refuses_unknown_mask_and_op(traced, monkeypatch):
    from arc.targets import tvm as target
    from arc.targets import tvm_graph

    _, module = traced("tiny-llama")
    graph = module.functions["decode"]
    nodes = tuple(
        dataclasses.replace(n, attrs={**n.attrs, "mask": "block-sparse"})
        if n.op is Op.ATTENTION
        else n
        for n in graph.nodes
    )
    bad = module.with_functions({"decode": dataclasses.replace(graph, nodes=nodes)})
    with pytest.raises(UnsupportedError, match="target tvm cannot lower mask block-sparse"):
        target.check_module(bad)
    monkeypatch.setattr(tvm_graph, "OPS", tvm_graph.OPS - {Op.SILU})
    with pytest.raises(UnsupportedError, match="target tvm cannot lower op silu"):
        target.check_module(module)


def test_block_format_weights_run_as_stored(tmp_path):
    """int4 projections and an int8 head (weight-format's lossy modes, the same kernels as a
    GGUF's kept Q4_1/Q8_0 blocks) through the block kernels: the torch target's ids."""
    from arc.compiler import CompileOptions, compile_model
    from arc.engine import read_manifest

    spec, ids = "kv-fusion,weight-format{mode=int4}", []
    for target, options in (("tvm", {}), ("torch", {"mode": "eager"})):
        path = tmp_path / f"{target}.arc"
        opts = CompileOptions(target=target, spec=spec, max_seq_len=128, target_options=options)
        compile_model("tiny-qwen2", path, opts)  # qwen2: projection biases on block weights
        ids.append(_greedy(path, PROMPTS[1]).token_ids)
    assert ids[0] == ids[1]
    assert read_manifest(tmp_path / "tvm.arc")["target"]["weights_run_as"] == [
        "int4",
        "int8",
        "f32",
    ]


def test_logits_stats_kernel_serves_the_speculative_top_k(engines, tmp_path, monkeypatch):
    """A speculative engine whose vocabulary splits into top-k chunks gets the library's
    logits_stats function (built outside a dataflow block: tvm.compile's RewriteDataflowReshape
    refuses block-less kernels there), the runtime calls it on every verify's logits and on
    decode steps' (greedy argmax, Token Recycling's successors), and greedy ids stay the torch
    engine's; and its sample_rows draws sampled steps (below). The tiny vocabulary (320)
    splits into chunks of 32, so the chunk is made 32 here (smollm2's 49152 takes the real
    128)."""
    from arc.compiler import CompileOptions, compile_model
    from arc.engine import read_manifest
    from arc.presets import preset_spec
    from arc.runtime import topk
    from arc.runtime.load import load_engine

    monkeypatch.setattr(topk, "CHUNK", 32)
    path = tmp_path / "stats.arc"
    opts = CompileOptions(target="tvm", spec=preset_spec("O2"), max_seq_len=256)
    compile_model(REF, path, opts)
    want = {"function": "logits_stats", "chunk": 32, "k": 4, "outputs": ["best", "tokens", "probs"]}
    assert read_manifest(path)["target"]["stats"] == want
    eng = load_engine(path)
    stats, calls = eng.generator.steps.logit_stats, []

    def counted(x):
        calls.append(x.shape[0])
        return stats(x)

    counted.k = stats.k  # the top-k it computes
    eng.generator.steps.logit_stats = counted
    for prompt in PROMPTS:
        got = eng.generator.generate(eng.prompt_ids(prompt), max_new_tokens=N, ignore_eos=True)
        assert got.token_ids == _greedy(engines["torch"][0], prompt).token_ids, prompt
    assert 1 in calls and any(n > 1 for n in calls)
    _sample_kernel_serves_sampled_steps(path, eng)


def _sample_kernel_serves_sampled_steps(path, eng):
    """The same engine's sample_rows (recorded; chunk 32 of the 320-token vocabulary): the
    runtime draws every plain sampled step with it, plain and speculative, Token Recycling
    learns its top tokens (no logits_stats call), seeded runs repeat, and its draws from a
    prefill's logits follow filter_logits' distribution (chi-square, 6000 draws)."""
    import math

    import torch

    from arc.engine import read_manifest
    from arc.runtime.sampling import Sampler, SamplingParams, filter_logits

    outputs = ["token", "max", "cut", "mass", "total", "top_tokens", "top_probs"]
    settings = ["temperature", "top_p", "u", "top_k"]
    want = {
        "function": "sample_rows",
        "chunk": 32,
        "k": 4,
        "settings": settings,
        "outputs": outputs,
    }
    assert read_manifest(path)["target"]["sample"] == want
    gen = eng.generator
    kernel, calls = gen.steps.sample_rows, []

    def counted(*args):
        calls.append(args[0].shape)
        return kernel(*args)

    gen.steps.sample_rows = counted

    def unused(x):
        raise AssertionError("sampled teaching asked logits_stats, not the kernel's top tokens")

    unused.k = 4
    gen.steps.logit_stats = unused
    ids = eng.prompt_ids(PROMPTS[1])
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=3)
    # each position's token is drawn with its own uniform (sample-then-match): a seeded run
    # repeats, warm drafter or not, whatever trees the cost-aware loop chose, and speculative
    # decoding draws plain decoding's tokens
    got = []
    for spec in (False, True):
        calls.clear()
        a = gen.generate(ids, max_new_tokens=N, sampling=params, ignore_eos=True, speculative=spec)
        b = gen.generate(ids, max_new_tokens=N, sampling=params, ignore_eos=True, speculative=spec)
        assert a.token_ids == b.token_ids and len(a.token_ids) == N
        assert len(calls) >= 2 * (a.forward_passes - a.verify_passes) > 0  # every plain step
        got.append(a.token_ids)
    assert got[0] == got[1]
    with torch.inference_mode():
        gen.steps.reset()
        logits = gen.steps.prefill(ids, 0).reshape(-1)
    probs = filter_logits(logits.double(), params).softmax(-1)
    sampler, counts = Sampler(params, kernel=kernel), torch.zeros(len(probs))
    for _ in range(6000):
        counts[sampler.pick(logits)[0]] += 1
    support = (probs > 0).nonzero().flatten()
    assert counts.sum() == counts[support].sum()
    expected = probs[support] * 6000
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    df = max(len(support) - 1, 1)
    assert stat < df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3  # p ~ 0.001
