"""Relaxed acceptance (lossy, opt-in: spec-tree{accept=relaxed}): LANTERN (Jang et al. 2025,
"LANTERN: Accelerating Visual Autoregressive Models with Relaxed Speculative Decoding").

Exact acceptance throws away a drafted token whenever the model prefers another, even one the
model itself can hardly tell apart from it. AR image models spread their probability over
many near-interchangeable tokens (codebook entries close in latent space), so exact
acceptance rates are low there; LANTERN accepts a drafted token x with the probability mass
of a latent neighbourhood A(x) of x instead of p(x) alone, with the neighbourhood's added mass
bounded by `delta`, so the distribution sampled stays within total variation `delta` of the
model's at every step.

Latent space here: the model's output embedding (the LM head's rows, the token embedding when
tied), cosine similarity. Two tokens are neighbours when their similarity is at least `sim`
(a threshold rather than LANTERN's k nearest: the same notion of closeness, without a [V, k]
nearest-neighbour table computed over the whole vocabulary). The default 0.65 is where
SmolLM2's neighbours stop being variants of one word: " big" has " large" 0.70, " huge"
0.66, " Big" 0.65; " return" has "return" 0.82, " returns" 0.77; while " the" has " a"
0.72 but " in" 0.59 and " and" has " or" 0.63 and "," 0.62.

Sampling (`accept_relaxed_sampled`): at a node with distribution p, the first (best) drafted
child c gets A(c) = {c} + its neighbours among p's top CANDIDATES tokens, most similar first,
while their added mass stays <= delta; c is accepted with probability p(A(c)). On rejection
A(c) is removed from p and the other children go through exact multi-branch rejection
(arc/runtime/accept.py) on what is left. The token emitted at the node is then c with
probability p(A(c)) and any y outside A(c) with probability p(y): total variation
p(A(c) - {c}) <= delta from p.

Greedy (`accept_relaxed_greedy`): the model's argmax t* is emitted exactly as in greedy
decoding, except when the tree has no child t* but has a child c that is t*'s neighbour with
p(c) >= p(t*) - delta: then c is accepted in its place (and drafting goes on below c).

Either way output changes, so the option is lossy: `arc eval` measures its agreement and
docs/SPECULATIVE.md shows it. Measured on smollm2-135m (greedy, 10 prompts x 64 tokens):
agreement 1.000 at the defaults (no near-tie neighbour met the rule) and 0.913 at delta
0.3; on tvm it decoded at 74.0 tok/s against exact -O2's 77.8 (one thread): for a text
model it buys nothing. LANTERN's gains are for image-token models, where codebook
neighbours abound.
"""

from __future__ import annotations

import torch
from torch import Tensor

from arc.runtime.accept import accept_greedy, accept_sampled
from arc.runtime.sampling import SamplingParams
from arc.runtime.tree import Tree

CANDIDATES = 64  # tokens of p considered as a drafted token's neighbours


class Latents:
    """Unit-norm output embeddings [V, H] (fp16: half the memory; cosines to ~1e-3)."""

    def __init__(self, w: Tensor):
        w = w.float()
        self.unit = (w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)).half()  # [V, H]

    def sim(self, token: int, others: Tensor | list[int]) -> Tensor:
        """Cosine similarity of `token` with each of `others` [n] -> [n] f32."""
        idx = torch.as_tensor(others, dtype=torch.long)
        return (self.unit[idx].float() @ self.unit[token].float()).reshape(-1)


def latents_of(module, weights) -> Latents:
    """The module's output embedding (its LM head's weight, dequantized exactly) as Latents;
    `weights`: an engine's materialized tensors."""
    from arc.errors import ArcError
    from arc.lowering import as_f32
    from arc.ops import Op

    heads = [n.attrs["w"] for n in module.functions["decode"].nodes if n.op is Op.LM_HEAD]
    if not heads:
        raise ArcError("relaxed acceptance needs the model's LM head; this decode has none")
    return Latents(as_f32(module, weights, heads[0]))


def accept_relaxed_greedy(
    tree: Tree, logits: Tensor, lat: Latents, delta: float, sim: float
) -> tuple[list[int], list[int]]:
    """(accepted nodes, new tokens incl. the bonus), like accept_greedy, relaxed."""

    def instead(node: int, top: int) -> int | None:
        """The first child of `node` within `delta` of the argmax's probability and its
        latent neighbour, or None."""
        p = torch.softmax(logits[node].double(), dim=-1)
        kids = list(tree.children(node).items())
        close = lat.sim(top, [t for t, _ in kids]).tolist()
        for (token, child), s in zip(kids, close, strict=True):
            if s >= sim and float(p[token]) >= float(p[top]) - delta:
                return child
        return None

    return accept_greedy(tree, logits, instead=instead)


def accept_relaxed_sampled(
    tree: Tree,
    logits: Tensor,
    params: SamplingParams,
    gen: torch.Generator,
    lat: Latents,
    delta: float,
    sim: float,
    rows: list | None = None,
) -> tuple[list[int], list[int]]:
    """Like accept_sampled, relaxed for the first child at each node (module docstring);
    `rows`: each node's distribution when the caller has them."""
    group = lambda p, token: _neighbourhood(p, token, lat, delta, sim)  # noqa: E731
    return accept_sampled(tree, logits, params, gen, group=group, rows=rows)


def _neighbourhood(p: Tensor, token: int, lat: Latents, delta: float, sim: float) -> list[int]:
    """`token` and its latent neighbours among p's top CANDIDATES, most similar first, while
    their probability adds up to at most `delta`."""
    top = torch.topk(p, min(CANDIDATES, p.numel())).indices
    top = top[top != token]
    close = lat.sim(token, top)
    group, added = [token], 0.0
    for j in torch.argsort(close, descending=True).tolist():
        if float(close[j]) < sim:
            break
        y = int(top[j])
        if added + float(p[y]) > delta:
            continue
        group.append(y)
        added += float(p[y])
    return group
