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
    best = max(rates.values())
    assert rates[str(chosen)] == best or (chosen == 2 and rates["1"] == best)


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
