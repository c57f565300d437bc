"""benchmarks/spec_ab.py: each arm's settings are in force for its own runs only, the
module's constants come back afterwards, output stays lossless, and a name the loop does not
define is refused."""

from __future__ import annotations

import pytest

from tests.e2e.bench_scripts import load


def test_arms_apply_their_settings_and_restore_them(tiny_engines):
    from arc.runtime import speculative

    mod = load("spec_ab")
    before = (speculative.MARGIN, speculative.PROBE_EVERY)
    never = "MARGIN=1000,PROBE_EVERY=1000"  # plain always wins, no probe within 24 tokens
    eager = "MARGIN=-0.99"  # any draft beats a plain step
    engine = str(next(iter(tiny_engines.values())))
    out = mod.run(engine, ["a b a b a b a b a b a b"], [never, eager], 24, 1, 1)
    ((_, per_fwd, same, verifies),) = out[(0, never)]
    assert same and verifies == 0 and per_fwd == 1.0
    ((_, _, same, verifies),) = out[(0, eager)]
    assert same and verifies > 0
    assert (speculative.MARGIN, speculative.PROBE_EVERY) == before
    assert isinstance(speculative.PROBE_EVERY, int)


def test_unknown_setting_is_refused():
    with pytest.raises(SystemExit, match="NOT_A_SETTING"):
        load("spec_ab").parse_arm("NOT_A_SETTING=1")


def test_dotted_settings_name_a_module_under_the_runtime():
    ab = load("spec_ab")
    from arc.runtime.drafters import ngram

    assert ab.parse_arm("drafters.ngram.COPY_LENGTH=0") == {"drafters.ngram.COPY_LENGTH": 0.0}
    assert ab.owner("drafters.ngram.COPY_LENGTH") == (ngram, "COPY_LENGTH")
    for bad in ("drafters.nope.X=1", "drafters.ngram.NOPE=1"):
        with pytest.raises(SystemExit, match="not a setting"):
            ab.parse_arm(bad)
