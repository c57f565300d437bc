"""Pass registry, spec parsing with typed options, order checks, instruments, records."""

import pytest

from arc.errors import ArcError
from arc.ir import Module
from arc.pipeline import (
    REGISTRY,
    DumpDir,
    PassContext,
    PassError,
    PassManager,
    PrintAfter,
    format_spec,
    parse_spec,
    register_pass,
)
from arc.presets import PRESETS, preset_spec


@pytest.fixture
def scratch_passes():
    """Two throwaway passes registered for one test: 'probe-b' must run after 'probe-a'."""

    @register_pass("probe-a")
    def probe_a(module: Module, ctx: PassContext, *, n: int = 1, f: float = 0.5) -> Module:
        return module

    @register_pass("probe-b", after=("probe-a",))
    def probe_b(module: Module, ctx: PassContext, *, boom: bool = False) -> Module:
        if boom:
            raise RuntimeError("kaboom")
        return module

    yield
    del REGISTRY["probe-a"], REGISTRY["probe-b"]


def test_spec_options_are_typed(scratch_passes):
    items = parse_spec("kv-fusion{mlp=false},probe-a{n=3,f=0.25}")
    assert items == [("kv-fusion", {"mlp": False}), ("probe-a", {"n": 3, "f": 0.25})]
    assert format_spec(items) == "kv-fusion{mlp=false},probe-a{n=3,f=0.25}"
    assert parse_spec("") == []


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("nope", "unknown pass 'nope'"),
        ("kv-fusion{bogus=1}", "bad option"),
        ("probe-a{n=x}", "must be an integer"),
        ("probe-a{f=half}", "must be a number"),
        ("kv-fusion{mlp=maybe}", "must be true or false"),
        ("probe-a{n=3,n=4}", "option n given twice"),
        ("kv-fusion{", "bad pipeline spec"),
    ],
)
def test_bad_specs_are_clear_errors(scratch_passes, spec, msg):
    with pytest.raises(ArcError, match=msg):
        parse_spec(spec)


def test_order_is_checked_not_fixed(scratch_passes):
    with pytest.raises(ArcError, match="probe-b must run after probe-a"):
        PassManager("probe-b,probe-a")
    PassManager("probe-a,probe-b")


def test_failing_pass_is_named_with_its_predecessors(scratch_passes, traced):
    _, m = traced("tiny-llama")
    with pytest.raises(PassError, match=r"pass probe-b failed \(after: probe-a\)"):
        PassManager("probe-a,probe-b{boom=true}").run(m)


def test_records_and_instruments(traced, tmp_path):
    _, m = traced("tiny-llama")
    printed = []
    pm = PassManager(
        "kv-fusion",
        instruments=[PrintAfter(["kv-fusion"], write=printed.append), DumpDir(tmp_path)],
    )
    out, records = pm.run(m)
    (rec,) = records
    assert rec.name == "kv-fusion" and rec.changed and rec.nodes_out > rec.nodes_in
    assert rec.wall_ms >= 0
    assert printed and "IR after kv-fusion" in printed[0] and "wq+wk+wv" in printed[0]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00-input.ir", "00-input.json", "01-kv-fusion.ir", "01-kv-fusion.json"]


def test_presets_are_lossless_and_known():
    from arc.pipeline import registry

    for level, items in PRESETS.items():
        for item in items:
            ((name, opts),) = parse_spec(item)
            assert registry()[name].is_lossless(opts), f"-{level} runs lossy pass {name}"
    assert preset_spec("O0") == "" and preset_spec("-O1") == "kv-fusion,weight-format"
    info = registry()["weight-format"]
    assert info.is_lossless({}) and info.is_lossless({"mode": "f32"})
    assert not info.is_lossless({"mode": "int4"}) and not info.is_lossless({"mode": "bf16"})
    with pytest.raises(ArcError):
        preset_spec("O9")
