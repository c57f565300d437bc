"""layer-skip: structure before/after, logits against Hugging Face with the layers deleted, and
bad options (TVM test_transform style). The tiny catalog models have 2 layers, none of which
may go, so these tests build a 6-layer tiny Llama."""

from __future__ import annotations

import copy

import pytest
import torch

from arc.errors import ArcError
from arc.ir import dumps, loads
from arc.lowering import lower
from arc.ops import Op
from arc.pipeline import PassContext, PassManager, registry

LAYERS = 6


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """(loaded, traced Module, HF model) of a seeded 6-layer tiny Llama."""
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from arc.compiler import trace_model
    from arc.models import tiny

    out = tmp_path_factory.mktemp("tiny6")
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**tiny._COMMON, "num_hidden_layers": LAYERS}, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.generation_config = GenerationConfig(eos_token_id=258, bos_token_id=None)
    model.save_pretrained(out)
    tiny.byte_tokenizer().save_pretrained(out)
    loaded, module = trace_model(str(out), 256)
    return loaded, module, model


def _ctx(loaded) -> PassContext:
    return PassContext(weights=loaded.weights, tokenizer=loaded.tokenizer)


def _kv_layers(g) -> list[int]:
    return [n.attrs["layer"] for n in g.nodes if n.op is Op.KV_WRITE]


def _hf_without(model, drop):
    """The HF model with decoder layers `drop` deleted (layer_idx renumbered)."""
    m = copy.deepcopy(model)
    kept = [layer for i, layer in enumerate(m.model.layers) if i not in drop]
    for i, layer in enumerate(kept):
        layer.self_attn.layer_idx = i
    m.model.layers = torch.nn.ModuleList(kept)
    m.config.num_hidden_layers = len(kept)
    if getattr(m.config, "layer_types", None):
        m.config.layer_types = [t for i, t in enumerate(m.config.layer_types) if i not in drop]
    return m


def _hf_logits(model, tokens) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([tokens]), use_cache=False).logits[0]  # [T, vocab]


# ---------------------------------------------------------------- structure


def test_static_structure(deep):
    _, m, _ = deep
    fused, _ = PassManager("kv-fusion").run(m)
    out, rec = PassManager("layer-skip{layers=2+3}").run(fused)
    assert m.kv.layers == LAYERS and fused.kv.layers == LAYERS  # the input is untouched
    assert out.kv.layers == LAYERS - 2
    used = out.used_weights()
    assert not [w for w in used if w.startswith(("layers.2.", "layers.3."))]
    assert "layers.4.wq+wk+wv" in used and "layers.5.w_down" in used
    for fn in ("prefill", "decode"):
        g = out.functions[fn]
        assert _kv_layers(g) == [0, 1, 2, 3]  # dense: model layers 0, 1, 4, 5
        attn = [n.attrs["layer"] for n in g.nodes if n.op is Op.ATTENTION]
        assert attn == [0, 1, 2, 3]
        assert len(g.nodes) < len(fused.functions[fn].nodes)
    from arc.passes.layer_skip import blocks

    decode = out.functions["decode"]
    by_layer = {
        b.index: [
            decode.node(k).attrs["layer"] for k in b.nodes if decode.node(k).op is Op.KV_WRITE
        ]
        for b in blocks(decode)
    }
    assert by_layer == {0: [0], 1: [1], 4: [2], 5: [3]}  # model layer -> its KV layer now
    assert out.meta["layer_skip"]["dropped"] == [2, 3]
    assert rec[0].changed and dumps(loads(dumps(out))) == dumps(out)


def test_draft_structure(deep):
    _, m, _ = deep
    out, _ = PassManager("layer-skip{mode=draft,layers=2+4}").run(m)  # named: no calibration
    assert list(out.functions) == ["prefill", "decode", "draft"]
    assert out.kv.layers == LAYERS  # shares the full model's cache
    draft, decode = out.functions["draft"], out.functions["decode"]
    assert out.functions["decode"] is m.functions["decode"]
    ins = [(n.attrs["name"], n.shape, n.dtype) for n in draft.inputs()]
    assert ins == [(n.attrs["name"], n.shape, n.dtype) for n in decode.inputs()]
    assert _kv_layers(draft) == [0, 1, 3, 5]  # the model's own KV layers, not renumbered
    reads = {w for n in draft.nodes for w in n.weights()}
    assert not any(w.startswith(("layers.2.", "layers.4.")) for w in reads)
    assert draft.node(draft.outputs[0]).shape == decode.node(decode.outputs[0]).shape
    assert out.meta["layer_skip"] == {
        "mode": "draft",
        "skipped": [2, 4],
        "search": "named",
        "acceptance": None,
    }


def test_lossless_flag():
    info = registry()["layer-skip"]
    assert not info.is_lossless({}) and not info.is_lossless({"mode": "static"})
    assert info.is_lossless({"mode": "draft"})


# ---------------------------------------------------------------- calibration


def test_static_by_block_influence(deep):
    loaded, m, _ = deep
    ctx = _ctx(loaded)
    out, _ = PassManager("kv-fusion,layer-skip{ratio=0.5}").run(m, ctx)
    facts = ctx.facts["layer-skip"]
    assert facts == dict(out.meta["layer_skip"])
    assert facts["criterion"] == "block-influence" and facts["layers"] == list(range(LAYERS))
    scores = facts["scores"]
    inner = sorted(range(1, LAYERS - 1), key=lambda i: scores[i])
    assert facts["dropped"] == sorted(inner[:3]) and out.kv.layers == LAYERS - 3
    assert all(0.0 <= s <= 2.0 for s in scores)


def test_calibrates_in_fp32_under_a_lossy_format(deep):
    loaded, m, _ = deep
    out, _ = PassManager("kv-fusion,weight-format{mode=int8},layer-skip{ratio=0.3}").run(
        m, _ctx(loaded)
    )
    assert out.kv.layers == LAYERS - 2
    assert {out.weights[w].format for w in out.used_weights() if "w_down" in w} == {"int8"}


def test_draft_greedy_search(deep):
    loaded, m, _ = deep
    ctx = _ctx(loaded)
    out, _ = PassManager("layer-skip{mode=draft,ratio=0.5,calib=64}").run(m, ctx)
    facts = out.meta["layer_skip"]
    assert facts["search"] == "greedy" and len(facts["skipped"]) == 3
    assert 0 not in facts["skipped"] and LAYERS - 1 not in facts["skipped"]
    accs = [s["acceptance"] for s in facts["steps"]]
    assert facts["acceptance"] == accs[-1] and all(0.0 <= a <= 1.0 for a in accs)
    kept = [i for i in range(LAYERS) if i not in facts["skipped"]]
    assert _kv_layers(out.functions["draft"]) == kept


def test_calibration_full_model_accepts_everything(deep):
    from arc.passes.layer_skip import Calibration

    loaded, m, _ = deep
    cal = Calibration(m, _ctx(loaded), 48)
    assert cal.acceptance([]) == 1.0  # the tree probe reproduces the prefill's argmax
    seeded = cal.acceptance([3])  # starts from the prefill's hidden state entering layer 3
    cal._seed = lambda g, skip: None
    assert cal.acceptance([3]) == seeded


def test_eval_gives_the_pass_its_weights(deep):
    """arc eval hands the pass the fp32 weights and tokenizer, and reports what it chose."""
    from arc.evaluate import evaluate

    loaded, _, _ = deep
    spec = "layer-skip{ratio=0.3,calib=32}"
    r = evaluate(str(loaded.directory), spec, ["abc"], max_new_tokens=4, ppl_tokens=64)
    assert r["facts"]["layer-skip"]["criterion"] == "block-influence"
    assert len(r["facts"]["layer-skip"]["dropped"]) == 2
    assert r["greedy"]["agreement"] < 1.0 or r["perplexity"]["delta_pct"] != 0.0


# ---------------------------------------------------------------- numerics


def test_static_equals_hf_without_layers(deep):
    loaded, m, model = deep
    drop = [1, 3, 4]
    out, _ = PassManager("kv-fusion,layer-skip{layers=1+3+4}").run(m)
    fns, _ = lower(out, loaded.weights)
    tokens = list(range(3, 40))
    n = len(tokens)
    pos = torch.arange(n)
    with torch.inference_mode():
        first = fns["prefill"](torch.tensor([tokens[:-1]]), pos[:-1], pos[:-1])  # [1, 1, V]
        last = fns["decode"](torch.tensor([[tokens[-1]]]), pos[-1:], pos)
    ref = _hf_logits(_hf_without(model, drop), tokens)
    torch.testing.assert_close(first[0, -1], ref[-2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last[0, -1], ref[-1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ref[-1], _hf_logits(model, tokens)[-1], atol=1e-2)


def test_draft_equals_forward_through_kept_layers(deep):
    """Driven token by token from an empty cache, the draft is exactly the model with the
    skipped layers deleted; the skipped layers' cache is never written."""
    loaded, m, model = deep
    skip = [2, 3]
    out, _ = PassManager("kv-fusion,layer-skip{mode=draft,layers=2+3}").run(m)
    fns, kv = lower(out, loaded.weights)
    tokens = list(range(5, 25))
    got = []
    with torch.inference_mode():
        for t, tok in enumerate(tokens):
            logits = fns["draft"](torch.tensor([[tok]]), torch.tensor([t]), torch.arange(t + 1))
            got.append(logits[0, -1])
    ref = _hf_logits(_hf_without(model, skip), tokens)
    torch.testing.assert_close(torch.stack(got), ref, rtol=1e-4, atol=1e-4)
    for i in range(LAYERS):
        written = bool(kv.layer(i)[0].abs().sum() > 0)
        assert written == (i not in skip)
    full = fns["decode"](torch.tensor([[7]]), torch.tensor([len(tokens)]), torch.arange(21))
    assert full.shape == got[0][None, None].shape


# ---------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("layer-skip{ratio=0}", "ratio=0.0 must be between 0 and 1"),
        ("layer-skip{ratio=1.5}", "ratio=1.5 must be between 0 and 1"),
        ("layer-skip{ratio=0.9}", "at most 4 can go"),
        ("layer-skip{mode=magic}", "unknown mode 'magic'"),
        ("layer-skip{layers=9}", "layer 9 is out of range"),
        ("layer-skip{layers=0}", "first or last layer"),
        ("layer-skip{layers=2+5}", "first or last layer"),
        ("layer-skip{layers=2;3}", "layer numbers joined by +"),
        ("layer-skip{search=random}", "unknown search"),
        ("layer-skip{calib=2}", "calib=2"),
        ("layer-skip{ratio=0.5}", "needs the model's weights"),  # no weights in the context
    ],
)
def test_bad_options(spec, fragment, deep):
    _, m, _ = deep
    with pytest.raises(ArcError, match=fragment.replace("(", r"\(")):
        PassManager(spec).run(m)


def test_two_layer_model_refused(traced):
    _, m = traced("tiny-llama")
    with pytest.raises(ArcError, match="needs at least 3"):
        PassManager("layer-skip{mode=draft,ratio=0.5}").run(m)
