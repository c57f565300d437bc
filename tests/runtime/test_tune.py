"""-O3's tree tuning (arc/tune.py): the compile measures verify cost and tokens per second per
tree size on this device and records them in the plan; the engine decodes what -O1 decodes;
a crafted cost table is refused."""

from __future__ import annotations

import pytest

from arc.errors import ArcError


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    from arc.compiler import CompileOptions, compile_model
    from arc.engine import read_manifest
    from arc.presets import preset_spec

    out = tmp_path_factory.mktemp("tune")
    paths = {}
    for level in ("O1", "O3"):
        paths[level] = out / f"{level}.arc"
        opts = CompileOptions(
            target="torch",
            spec=preset_spec(level),
            max_seq_len=512,
            target_options={"mode": "eager"},
        )
        compile_model("tiny-llama", paths[level], opts)
    return paths, read_manifest(paths["O3"])["decode_plan"]


def test_plan_records_measured_costs_and_choice(tuned):
    _, plan = tuned
    opts = plan["options"]
    record = opts["tune"]
    assert set(opts["cost_ratio"]) == {"2", "4", "8", "16"}
    assert all(v > 0 for v in opts["cost_ratio"].values())
    rates = record["tok_s_by_largest_tree"]
    assert set(rates) == {"1", "2", "4", "8", "16"} and all(v > 0 for v in rates.values())
    chosen = record["chosen"]
    assert opts["verify_tokens"] == chosen == max(opts["verify_sizes"])
    assert opts["budget"] == chosen - 1
    from arc.tune import TIE, choose_cap

    assert chosen == max(2, choose_cap({int(c): v for c, v in rates.items()}))
    assert f"within {TIE:.0%} of the fastest" in record["why"]


def test_the_smallest_cap_within_the_tie_wins():
    from arc.tune import TIE, choose_cap

    assert choose_cap({1: 218.0, 2: 272.3, 4: 332.5, 8: 330.4, 16: 337.2}) == 4
    assert choose_cap({1: 200.0, 4: 250.0, 8: 300.0, 16: 250.0}) == 8
    below = 300.0 * (1 - TIE) - 0.01
    assert choose_cap({1: 100.0, 4: below, 8: 300.0}) == 8
    assert choose_cap({1: 300.0, 2: 299.0}) == 1  # plain ties: the smallest tree (the loop
    # can still decode plainly)


def test_tuned_engine_decodes_like_o1(tuned):
    from arc.runtime.load import load_engine

    paths, _ = tuned
    ids = []
    for level in ("O1", "O3"):
        eng = load_engine(paths[level])
        prompt = eng.prompt_ids("The quick brown fox jumps over the lazy dog. The quick")
        ids.append(eng.generator.generate(prompt, max_new_tokens=60, ignore_eos=True).token_ids)
    assert ids[0] == ids[1]


@pytest.mark.parametrize("ratio", [{"2": -1.0}, {"2": "x"}, [1.0], {"4": True}])
def test_crafted_cost_table_is_refused(tuned, ratio):
    from arc.runtime.load import load_engine
    from arc.runtime.speculative import check_plan

    paths, plan = tuned
    module = load_engine(paths["O3"]).module
    with pytest.raises(ArcError, match="cost_ratio"):
        check_plan("speculative", {**plan["options"], "cost_ratio": ratio}, module)
