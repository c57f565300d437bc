"""Replay of the speculative loop on recorded greedy decodes, with a cost model: the loop's own
code (arc/runtime/speculative.py, the drafters, tree building, acceptance) decides every step,
but the model's forwards are looked up instead of run and cost what the cost model says. Runs
of a setting are then deterministic and take seconds, so settings that differ by 1-2% can be
told apart, and the held-out calibration prompts can be scored next to the benchmark's
(spec_ab.py measures the same on the real engine, where runs move by +-1.5%).

    python benchmarks/spec_sim.py --engine ENGINE.arc --record [--prompts FILE.json ...]
    python benchmarks/spec_sim.py --engine ENGINE.arc --arm WAKE=0 --arm WAKE=0.6
        [--cost 1:5.4,2:7.2,4:8.9,8:13.3,16:21] [--cold]

`--record` decodes each prompt plainly on the engine (greedy, --new-tokens) and keeps, per
position, the token and the model's top TOPK successors with their probabilities (what the
loop's Token Recycling learns from), in benchmarks/.sim/ (JSON). A replayed verify yields the
recorded token after every node on the recorded path; a node off the path yields the
successors recorded after the same token at its latest earlier place on the path (the
model's real ones there are not known; acceptance never reaches past such a node, only Token
Recycling's table sees them). A step's time is the cost model's for its size plus the real
time the loop's own Python took (drafting, tree building, acceptance); speedup is over plain
steps at the cost model's one-token time. Arms set constants as spec_ab.py's do. Step times
carry across requests after a warm-up replay (a server's SpecMemory); `--cold` starts every
request with nothing timed, as a one-shot `arc run` does (the engine's prior verify costs).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# ms per step of each size (1: a bare decode step, as plain decoding's) and, for a plain step
# that also hands the drafters the model's top successors (Token Recycling's teaching), TEACH
# more: -O2 tvm traces (`arc run --trace`), 2026-12-06, Intel Xeon: quiet steps 4.8-5.2 ms,
# teaching ones 5.25-5.45, verifies of 2 / 4 / 8 nodes 7.2 / 8.9 / 13.3
DEFAULT_COST = "1:5.1,2:7.2,4:8.9,8:13.3,16:21"
TEACH = 0.25


def record(engine: str, prompt_files: list[str], n: int, threads: int) -> list[dict]:
    """Each prompt's ids, greedy output, and per position the top successors (plain decode)."""
    import torch

    from arc.runtime.load import load_engine
    from arc.runtime.topk import TOPK, top_successors

    torch.set_num_threads(threads)
    eng = load_engine(engine)
    steps = eng.generator.steps
    decode, seen = steps.decode, {}

    def recording(token, pos):
        logits = decode(token, pos)
        tokens, probs = top_successors(logits[None].float(), TOPK)
        seen[pos] = (tokens[0].tolist(), [round(p, 5) for p in probs[0].tolist()])
        return logits

    steps.decode = recording
    out = []
    try:
        for f in prompt_files:
            for p in json.loads(Path(f).read_text()):
                text = p["prompt"] if isinstance(p, dict) else p
                ids = eng.prompt_ids(text)
                seen.clear()
                with torch.inference_mode():
                    res = eng.generator.generate(ids, max_new_tokens=n, speculative=False)
                succ = {str(k): v for k, v in seen.items()}
                out.append({"file": Path(f).name, "ids": ids, "out": res.token_ids, "succ": succ})
    finally:
        steps.decode = decode
    return out


class _Stats:
    """Steps.logit_stats for replayed "logits": a row holds a node's key; the argmax and the
    top successors are looked up. A plain step's teaching (a call on one row) costs TEACH."""

    def __init__(self, table, k, clock):
        self.table, self.k, self.clock = table, k, clock

    def __call__(self, rows):
        if rows.numel() == 1:
            self.clock.spend(TEACH)
        return self.look(rows)

    def look(self, rows):
        import torch

        best, toks, probs = [], [], []
        for key in rows.view(-1).tolist():
            b, t, p = self.table[int(key)]
            best.append(b)
            toks.append(t)
            probs.append(p)
        return torch.tensor(best), torch.tensor(toks), torch.tensor(probs)


class Replay:
    """Steps for the speculative loop, answered from a recorded decode."""

    def __init__(self, rec: dict, sizes: list[int], cost: dict[int, float], clock, k: int):
        self.seq = rec["ids"] + rec["out"]
        self.succ = {int(p): v for p, v in rec["succ"].items()}
        self.verify_sizes, self.max_seq_len = sizes, len(self.seq) + 64
        self.cost, self.clock = cost, clock
        self.table: list = []  # key -> (argmax, topk tokens, topk probs)
        self.logit_stats = _Stats(self.table, k, clock)
        # the recorded decisions are plain decoding's, whatever the tree (a tvm engine's
        # verify, bit for bit): no near-tie guard (accept.settle), whose logits these are not
        self.verify_exact = True
        self.k = k
        self.functions = {}
        self.last_at: dict[int, int] = {}  # token -> its latest position on the path so far

    def _row(self, best, toks, probs):
        import torch

        self.table.append((best, toks, probs))
        return torch.tensor([float(len(self.table) - 1)])

    def _true(self, pos):
        toks, probs = self.succ.get(pos) or (
            [self.seq[pos + 1]] * self.k,
            [1.0] + [0.0] * (self.k - 1),
        )
        return self.seq[pos + 1], toks, probs

    def _off(self, token, before):
        """An off-path node's answer: the successors after `token` at its latest place on the
        path before `before` (else itself, which no drafted child is)."""
        at = max((p for p in self.succ if p < before and self.seq[p] == token), default=None)
        if at is None:
            return token, [token] * self.k, [1.0] + [0.0] * (self.k - 1)
        return self._true(at)

    def decode(self, token, pos):
        assert self.seq[pos] == token, "replay left the recorded path"
        self.clock.spend(self.cost[1])
        return self._row(*self._true(pos))

    def verify(self, tokens, pos, write, visible):
        import torch

        size = len(tokens)
        self.clock.spend(self.cost[size])
        prefix = pos[0]
        among = visible[:, prefix:]  # [B, B]: a node's ancestors (and itself)
        rows = []
        for i in range(size):
            anc = [j for j in range(size) if bool(among[i, j])]
            path = [tokens[j] for j in anc]  # root first: ancestors come before a node
            on = all(
                prefix + d < len(self.seq) and self.seq[prefix + d] == t for d, t in enumerate(path)
            )
            at = prefix + len(path) - 1
            if on and at + 1 < len(self.seq):
                rows.append(self._row(*self._true(at)))
            else:
                rows.append(self._row(*self._off(path[-1], prefix)))
        return torch.cat(rows)

    def verify_tree(self, tree, prefix, size):
        return self.verify(*tree.inputs(prefix, size))

    def move(self, src, dst):
        pass


class Clock:
    """time.perf_counter plus the modeled forwards' time; `wall=False`: the modeled time alone,
    so a replay's speed and its loop's timing choices do not depend on the machine's load."""

    def __init__(self, wall: bool = True):
        self.extra = 0.0
        self.wall = wall

    def spend(self, ms):
        self.extra += ms / 1e3

    def perf_counter(self):
        return (time.perf_counter() if self.wall else 0.0) + self.extra


def replay(
    rec: dict, options: dict, cost: dict[int, float], memory, wall: bool = True
) -> tuple[float, float, bool]:
    """(speedup over plain at the cost model, tokens per forward, output identical); `memory`
    (SpecMemory) carries step times across requests, as a Generator's does; `wall=False` leaves
    the loop's own Python time out (see Clock)."""
    import arc.runtime.speculative as S
    from arc.runtime import drafters
    from arc.runtime.sampling import Sampler, SamplingParams
    from arc.runtime.topk import TOPK

    clock = Clock(wall)
    sizes = [b for b in options["verify_sizes"] if b in cost]
    steps = Replay(rec, sizes, cost, clock, TOPK)
    drafter = drafters.make(options["draft"], options, 49152, steps)
    n0, out = len(rec["ids"]), rec["out"]
    real_time = S.time
    S.time = clock
    try:
        loop = S.SpeculativeLoop(steps, drafter, dict(options), memory)
        sample = Sampler(SamplingParams(), lambda rows: steps.logit_stats.look(rows)[0].tolist())
        produced = [out[0]]

        def stopper(tok):
            produced.append(tok)
            return "length" if len(produced) >= len(out) else None

        history = list(rec["ids"]) + [out[0]]
        t0 = clock.perf_counter()
        if len(out) > 1:
            _, stats = loop.run(history, n0, sample, stopper)
            fwd = stats.forward_passes
        else:
            fwd = 1
        spent = clock.perf_counter() - t0
    finally:
        S.time = real_time
    plain = (len(out) - 1) * cost[1] / 1e3
    same = produced[: len(out)] == out
    return plain / max(spent, 1e-9), (len(out) - 1) / max(fwd, 1), same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", required=True)
    ap.add_argument("--record", action="store_true", help="record greedy decodes first")
    ap.add_argument("--prompts", action="append", help="prompt files (default: both shipped)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arm", action="append", default=[], help="NAME=VALUE[,NAME=VALUE]")
    ap.add_argument("--cost", default=DEFAULT_COST, help="ms per step size: 1:5.4,2:7.2,...")
    ap.add_argument("--sizes", help="verify sizes to replay instead of the engine's: 2,4,8,16")
    ap.add_argument(
        "--cold",
        action="store_true",
        help="every request starts with nothing timed, as a one-shot `arc run` does (default: "
        "step times carried across requests after a warm-up replay, as a server's)",
    )
    a = ap.parse_args()
    files = a.prompts or [str(HERE / "calibration_prompts.json"), str(HERE / "prompts.json")]
    store = HERE / ".sim" / (Path(a.engine).stem + f"-{a.new_tokens}.json")
    if a.record or not store.exists():
        store.parent.mkdir(exist_ok=True)
        recs = record(a.engine, files, a.new_tokens, a.threads)
        store.write_text(json.dumps(recs))
    recs = json.loads(store.read_text())
    from spec_ab import owner, parse_arm

    from arc.runtime.load import load_engine

    options = dict(load_engine(a.engine).generator.plan["options"])
    cost = {int(k): float(v) for k, v in (x.split(":") for x in a.cost.split(","))}
    if a.sizes:  # a tree-size ladder the engine was not built with (budget and depth follow)
        sizes = sorted(int(b) for b in a.sizes.split(","))
        options.update(verify_sizes=sizes, verify_tokens=sizes[-1], budget=sizes[-1] - 1)
        options.update(depth=sizes[-1] - 1, cost_ratio={})
    missing = [b for b in options["verify_sizes"] if b not in cost]
    if missing or 1 not in cost:
        raise SystemExit(f"--cost has no time for step sizes {[1, *missing]}")
    arms = a.arm or ["MARGIN=0.05"]
    for arm in arms:
        setting = parse_arm(arm)
        saved = {name: getattr(*owner(name)) for name in setting}
        for name, value in setting.items():
            setattr(*owner(name), type(saved[name])(value))
        try:
            import arc.runtime.speculative as S

            res, memory = {}, S.SpecMemory()
            if not a.cold:
                replay(recs[0], options, cost, memory)  # times the steps, as a warm-up would
            for rec in recs:
                memory = S.SpecMemory() if a.cold else memory
                res.setdefault(rec["file"], []).append(replay(rec, options, cost, memory))
        finally:
            for name, value in saved.items():
                setattr(*owner(name), value)
        parts = []
        for f, rows in res.items():
            g = math.exp(sum(math.log(s) for s, _, _ in rows) / len(rows))
            worst = min(s for s, _, _ in rows)
            lost = sum(not same for _, _, same in rows)
            parts.append(
                f"{f}: geomean {g:.3f}x worst {worst:.3f}x" + (f" LOST {lost}" if lost else "")
            )
        print(f"{arm:50s} " + " | ".join(parts), flush=True)
        if len(res) == 1 or "prompts.json" in res:
            rows = res.get("prompts.json") or next(iter(res.values()))
            print("   per prompt: " + " ".join(f"{s:.2f}" for s, _, _ in rows))


if __name__ == "__main__":
    main()
