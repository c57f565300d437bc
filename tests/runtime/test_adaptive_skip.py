"""layer-skip{mode=adaptive}: the pass adds depth variants; per request the runtime probes
them on the prompt's tail and decodes with the deepest one that agrees with the full model,
else with all layers. On the 6-layer model whose layers 2 and 3 are near silent (conftest),
the variant skipping them is chosen and decodes (almost) what the full model does; a variant
that skips loud layers is rejected and the output is exactly the full model's."""

from __future__ import annotations

import pytest
import torch

from arc.errors import ArcError
from arc.lowering import lower
from arc.pipeline import PassContext, PassManager, registry
from arc.runtime.generate import Generator
from arc.runtime.steps import Steps

PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox"


def _run(quiet, spec: str, n: int = 40):
    loaded, module = quiet[256]
    ctx = PassContext(weights=loaded.weights, tokenizer=loaded.tokenizer)
    module, _ = PassManager(spec).run(module, ctx)
    fns, kv = lower(module, loaded.weights)
    steps = Steps(fns, max_seq_len=256, reset=kv.reset, move=kv.move)
    gen = Generator(steps, loaded.tokenizer, [258], meta=module.meta)
    plain = Generator(steps, loaded.tokenizer, [258])  # the same functions, all layers
    ids = loaded.tokenizer.encode(PROMPT)
    with torch.inference_mode():
        return module, gen.generate(ids, max_new_tokens=n), plain.generate(ids, max_new_tokens=n)


def test_variants_added_and_lossy(quiet):
    module, _, _ = _run(quiet, "kv-fusion,layer-skip{mode=adaptive,ratio=0.34,variants=2}", 4)
    facts = module.meta["layer_skip"]
    skips = [v["skipped"] for v in facts["variants"]]
    assert skips in ([[2], [2, 3]], [[3], [2, 3]])  # the near-silent layers, nested
    for v in facts["variants"]:
        g = module.functions[v["function"]]
        kv_layers = {n.attrs["layer"] for n in g.nodes if n.op.value == "kv_write"}
        assert kv_layers == set(range(6)) - set(v["skipped"])  # skipped: nothing written
    assert not registry()["layer-skip"].is_lossless({"mode": "adaptive"})


def test_quiet_layers_are_skipped(quiet):
    _, got, plain = _run(quiet, "kv-fusion,layer-skip{mode=adaptive,ratio=0.34,variants=2}")
    assert got.skipped_layers == [2, 3]
    same = sum(a == b for a, b in zip(got.token_ids, plain.token_ids, strict=True))
    assert same / len(plain.token_ids) > 0.9  # near-silent layers: nearly the same tokens
    assert plain.skipped_layers == []


def test_loud_layers_are_not_skipped(quiet):
    """A variant skipping layers 1..4 disagrees with the full model on the prompt's tail:
    the request runs with every layer, so its tokens are exactly the full model's."""
    spec = "kv-fusion,layer-skip{mode=adaptive,ratio=0.67,variants=1,agree=1.0}"
    module, got, plain = _run(quiet, spec)
    assert module.meta["layer_skip"]["variants"][0]["skipped"] == [1, 2, 3, 4]
    assert got.skipped_layers == []
    assert got.token_ids == plain.token_ids


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("layer-skip{mode=adaptive,variants=0}", "variants=0 must be 1..8"),
        ("layer-skip{mode=adaptive,agree=0}", "agree=0.0 must be in (0, 1]"),
        ("layer-skip{mode=adaptive,probe=0}", "probe=0 must be 1..64"),
        ("layer-skip{mode=adaptive,layers=2}", "give ratio=, not layers="),
        ("layer-skip{mode=adaptive},spec-tree", "cannot follow layer-skip{mode=adaptive}"),
    ],
)
def test_bad_options(quiet, spec, fragment):
    loaded, module = quiet[256]
    ctx = PassContext(weights=loaded.weights, tokenizer=loaded.tokenizer)
    with pytest.raises(ArcError) as e:
        PassManager(spec).run(module, ctx)
    assert fragment in str(e.value)
