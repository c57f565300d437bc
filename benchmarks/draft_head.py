"""Would a trained draft head pay here? Medusa heads (Cai et al. 2024, "Medusa"), self-distilled
on the datastore an engine's model wrote at compile time (spec-tree{corpus=N}), measured offline.

    python benchmarks/draft_head.py --engine CORPUS.arc [--docs 150,300,600] [--heads 2]
        [--vocab 8192] [--epochs 3] [--threads 2]

The training-free drafters draft almost nothing on chat and instructions (README, "Speculative
decoding"). EAGLE and Medusa, which the GPU servers ship, train a small head on the model's own
last hidden state instead. This measures what such a head would be right about, with nothing
but the engine's model and the documents it wrote (no text downloaded):

- features: the model's last hidden state (after the final norm, the LM head's input) at every
  position of every corpus document, from Hugging Face transformers' forward of the engine's
  source model (`--model`, default the engine's);
- heads: head k (k = 1..K) maps the hidden state h_t and the embedding of the token the model
  emits there, x_{t+1} (known at draft time: it is the verify's bonus token), to the token
  x_{t+1+k}: out = h + SiLU(W [h; e] + b) + P [h; e], scored against the `--vocab` most frequent
  corpus tokens' rows of the tied LM head (kept frozen); W, P zero-initialized as Medusa does;
  AdamW, one-cycle, `--epochs` over the first N documents for each N in `--docs`;
- evaluation: greedy decodes of the calibration prompts and of the benchmark's prompts (the
  engine decodes them first, plain), per head top-1 and top-3 accuracy, the share of positions
  by head-1 confidence and the accuracy there, and the tokens per verify a chain of the K heads'
  top-1 tokens would yield (1 + the expected run of right heads).

A head drafts once per step, so its weights are read once per step: the report states their
bytes in fp32 against a decode step's weight bytes (what they add to a memory-bound step).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CONF_BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.01)


def features(model, docs: list[list[int]]) -> list[torch.Tensor]:
    """Per document [T, D]: the last hidden state after the final norm at every position."""
    out = []
    with torch.inference_mode():
        for ids in docs:
            o = model(torch.tensor([ids]), output_hidden_states=True)
            out.append(o.hidden_states[-1][0].float())
    return out


def rows(feats: list[torch.Tensor], docs: list[list[int]], starts: list[int], k: int):
    """(h [N, D], labels [N, k + 1]): for every position t from its document's start - 1 on,
    h_t and the tokens x_{t+1}..x_{t+1+k} (-1 past the document's end)."""
    hs, labels = [], []
    for h, ids, s in zip(feats, docs, starts, strict=True):
        x = torch.tensor(ids)
        t = torch.arange(max(s - 1, 0), len(ids) - 1)
        lab = torch.full((len(t), k + 1), -1, dtype=torch.long)
        for j in range(k + 1):
            ok = t + 1 + j < len(ids)
            lab[ok, j] = x[(t + 1 + j)[ok]]
        hs.append(h[t])
        labels.append(lab)
    return torch.cat(hs), torch.cat(labels)


class Heads(torch.nn.Module):
    """K Medusa heads on [h; embedding of x_{t+1}], scored on a frozen vocabulary subset."""

    def __init__(self, k: int, embed: torch.Tensor, vocab: torch.Tensor):
        super().__init__()
        d = embed.shape[1]
        self.embed, self.lm = embed, embed[vocab]  # [V_all, D], [V, D]
        self.w = torch.nn.Parameter(torch.zeros(k, 2 * d, d))
        self.b = torch.nn.Parameter(torch.zeros(k, d))
        self.p = torch.nn.Parameter(torch.zeros(k, 2 * d, d))

    def forward(self, h: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        inp = torch.cat([h, self.embed[x1]], -1)  # [N, 2D]
        z = torch.einsum("nd,kde->kne", inp, self.w) + self.b[:, None]
        out = h[None] + torch.nn.functional.silu(z) + torch.einsum("nd,kde->kne", inp, self.p)
        return out @ self.lm.T  # [K, N, V]

    def step_bytes(self) -> int:
        """fp32 bytes a step reads to draft with these heads: W, b, P and the LM-head rows."""
        return 4 * (self.w.numel() + self.b.numel() + self.p.numel() + self.lm.numel())


def train(h, lab, k, embed, vocab, remap, epochs, seed=0) -> Heads:
    torch.manual_seed(seed)
    net = Heads(k, embed, vocab)
    y = remap[lab.clamp(min=0)]
    y[(lab < 0) | (y < 0)] = -100  # past the end, or outside the vocabulary subset
    batch = 512
    steps = max(epochs * (len(h) // batch), 1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps)
    for _ in range(epochs):
        perm = torch.randperm(len(h))
        for i in range(0, len(h) - batch + 1, batch):
            j = perm[i : i + batch]
            logits = net(h[j], lab[j, 0])
            ce = torch.nn.functional.cross_entropy
            loss = sum(ce(logits[q], y[j, q + 1], ignore_index=-100) for q in range(k))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net


def evaluate(net: Heads, vocab, h, lab, groups: dict[str, torch.Tensor]) -> dict:
    with torch.no_grad():
        p = net(h, lab[:, 0]).softmax(-1)  # [K, N, V]
    conf, arg = p.max(-1)
    top3 = vocab[p.topk(3, -1).indices]  # [K, N, 3]
    k = p.shape[0]
    ok1 = torch.stack([vocab[arg[q]] == lab[:, q + 1] for q in range(k)]).float()
    ok3 = torch.stack([(top3[q] == lab[:, q + 1, None]).any(-1) for q in range(k)]).float()
    chain = torch.cumprod(ok1, 0).sum(0)  # [N]: how many heads in a row are right
    report = {}
    for name, sel in groups.items():
        report[name] = {
            "top1": [round(v, 3) for v in ok1[:, sel].mean(1).tolist()],
            "top3": [round(v, 3) for v in ok3[:, sel].mean(1).tolist()],
            "chain_tokens_per_verify": round(1 + chain[sel].mean().item(), 3),
        }
    bins = []
    for lo, hi in zip(CONF_BINS, CONF_BINS[1:], strict=False):
        m = (conf[0] >= lo) & (conf[0] < hi)
        share = round(m.float().mean().item(), 3)
        right = round(ok1[0][m].mean().item(), 3) if m.any() else None
        bins.append({"conf": f"{lo:.1f}-{min(hi, 1):.1f}", "share": share, "top1": right})
    report["head1_by_confidence"] = bins
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", required=True, help="an engine built with spec-tree{corpus=N}")
    ap.add_argument("--model", help="the engine's source model (default: its manifest's)")
    ap.add_argument("--docs", default="150,300,600", help="training set sizes, in documents")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from transformers import AutoModelForCausalLM

    from arc.evaluate import load_prompts
    from arc.models import loader
    from arc.runtime.drafters.corpus import SEP
    from arc.runtime.load import load_engine

    eng = load_engine(a.engine)
    g = eng.generator
    corpus = getattr(g.steps, "corpus", None)
    if corpus is None:
        raise SystemExit(f"{a.engine}: no corpus (compile with spec-tree{{corpus=N}})")
    docs, cur = [], []
    for t in corpus.tokens:
        if t == SEP:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    texts = load_prompts(HERE / "calibration_prompts.json")
    kinds = ["calibration"] * len(texts)  # then the benchmark's prompts by their kind
    for p in json.loads((HERE / "prompts.json").read_text()):
        texts.append(p["prompt"])
        kinds.append(p["kind"])
    evals = []
    for text in texts:
        ids = eng.prompt_ids(text)
        with torch.inference_mode():
            r = g.generate(ids, max_new_tokens=a.new_tokens, speculative=False)
        evals.append((ids, r.token_ids))
    model_name = a.model or eng.manifest["model"]["name"]
    loaded = loader.load(model_name, weights=False)
    model = AutoModelForCausalLM.from_pretrained(loaded.directory, dtype=torch.float32).eval()
    embed = model.get_output_embeddings().weight.detach().float()

    t0 = time.perf_counter()
    ev_docs = [p + o for p, o in evals]
    ev_h, ev_lab = rows(features(model, ev_docs), ev_docs, [len(p) for p, _ in evals], a.heads)
    sizes = [len(o) for _, o in evals]
    idx = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    of_kind = {k: torch.tensor([x == k for x in kinds])[idx] for k in dict.fromkeys(kinds)}
    groups = {**of_kind, "benchmark": ~of_kind["calibration"]}
    sizes_docs = sorted(int(n) for n in a.docs.split(","))
    tr_feats = features(model, docs[: sizes_docs[-1]])
    print(f"features: {len(ev_docs)} decodes, {len(tr_feats)} documents, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
    results = []
    for n in sizes_docs:
        h, lab = rows(tr_feats[:n], docs[:n], [0] * n, a.heads)
        counts = torch.bincount(lab[:, 0][lab[:, 0] >= 0], minlength=embed.shape[0])
        vocab = torch.argsort(counts, descending=True)[: a.vocab]
        remap = torch.full((embed.shape[0],), -1, dtype=torch.long)
        remap[vocab] = torch.arange(len(vocab))
        t1 = time.perf_counter()
        net = train(h, lab, a.heads, embed, vocab, remap, a.epochs)
        rep = evaluate(net, vocab, ev_h, ev_lab, groups)
        covered = (remap[ev_lab[:, 1].clamp(min=0)] >= 0).float().mean().item()
        rep.update(docs=n, train_positions=len(h), train_s=round(time.perf_counter() - t1, 1),
                   vocab_coverage=round(covered, 3), head_bytes=net.step_bytes())  # fmt: skip
        results.append(rep)
        print(json.dumps(rep), flush=True)
    print(
        "\n| documents | positions | head 1 top-1 calib / bench | top-3 | chain tok/verify calib "
        "/ bench | chat, instruction chain | vocab coverage | head MB (fp32) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        c, b = r["calibration"], r["benchmark"]
        print(f"| {r['docs']} | {r['train_positions']} | {c['top1'][0]} / {b['top1'][0]} | "
              f"{c['top3'][0]} / {b['top3'][0]} | {c['chain_tokens_per_verify']} / "
              f"{b['chain_tokens_per_verify']} | {r['chat']['chain_tokens_per_verify']}, "
              f"{r['instruction']['chain_tokens_per_verify']} | {r['vocab_coverage']} | "
              f"{r['head_bytes'] / 1e6:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
