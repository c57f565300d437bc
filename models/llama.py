"""The Llama family: Llama 2/3, SmolLM2, TinyLlama, Mistral and Qwen2 (pre-norm decoder).

Covers RMSNorm, rotary embeddings (any non-dynamic HF rope type, via HF's own inv_freq), GQA
attention with optional sliding window (Mistral, Qwen2), optional q/k/v bias (Qwen2), SwiGLU MLP,
and tied or untied LM head. The forward below reads top to bottom like gpt-fast's model.py; it
emits IR nodes instead of running tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from arc.errors import UnsupportedError
from arc.ir import GraphBuilder
from arc.ops import Op

FAMILY = "llama"
MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class Arch:
    """What the IR needs to know of an HF config."""

    model_type: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    qkv_bias: bool
    tied: bool
    windows: tuple[int, ...]  # per layer: sliding window size, 0 = full causal
    rope_scale: float  # HF's attention_scaling applied to cos/sin (1.0 for default rope)
    max_positions: int


def arch_from_config(cfg, rope_scale: float) -> Arch:
    """Read an HF config of a supported model type into an Arch; refuse what it cannot honour."""
    if cfg.model_type not in MODEL_TYPES:
        raise UnsupportedError(f"model_type {cfg.model_type!r} is not in the llama family")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise UnsupportedError(f"activation {cfg.hidden_act!r} is not supported (silu only)")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return Arch(
        model_type=cfg.model_type,
        vocab=cfg.vocab_size,
        hidden=cfg.hidden_size,
        layers=cfg.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate=cfg.intermediate_size,
        eps=float(cfg.rms_norm_eps),
        qkv_bias=cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
        tied=bool(getattr(cfg, "tie_word_embeddings", False)),
        windows=_windows(cfg),
        rope_scale=float(rope_scale),
        max_positions=int(cfg.max_position_embeddings),
    )


def _windows(cfg) -> tuple[int, ...]:
    window = getattr(cfg, "sliding_window", None) or 0
    types = getattr(cfg, "layer_types", None)
    if cfg.model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False):
        window = 0
    if types:
        return tuple(window if t == "sliding_attention" else 0 for t in types)
    return (window,) * cfg.num_hidden_layers


def hf_weight_names(a: Arch) -> dict[str, str]:
    """IR weight name -> HF state-dict key."""
    names = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight"}
    if not a.tied:
        names["lm_head"] = "lm_head.weight"
    for i in range(a.layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        names[p + "attn_norm"] = q + "input_layernorm.weight"
        names[p + "mlp_norm"] = q + "post_attention_layernorm.weight"
        for short, hf in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
            names[p + "w" + short] = q + f"self_attn.{hf}.weight"
            if a.qkv_bias and short != "o":
                names[p + "b" + short] = q + f"self_attn.{hf}.bias"
        for short in ("gate", "up", "down"):
            names[p + f"w_{short}"] = q + f"mlp.{short}_proj.weight"
    return names


def forward(b: GraphBuilder, a: Arch, *, new_tokens: int | str, last_only: bool) -> list[int]:
    """Emit the decoder forward into `b`; returns the graph outputs (logits).

    `new_tokens` is the T dimension: a symbol for prefill chunks, 1 for a decode step.
    """
    tokens = b.input("tokens", (1, new_tokens), "i64")
    pos = b.input("pos", (new_tokens,), "i64")  # absolute position of each new token
    slots = b.input("slots", ("L",), "i64")  # the KV slots attention reads: 0..L-1
    x = b.add(Op.EMBED, [tokens], w="embed")  # [1, T, hidden]
    for i in range(a.layers):
        x = _block(b, a, i, x, pos, slots)
    x = b.add(Op.RMSNORM, [x], w="norm", eps=a.eps)
    if last_only:
        x = b.add(Op.LAST, [x])  # [1, 1, hidden]: prefill needs the next-token logits only
    logits = b.add(Op.LM_HEAD, [x], w="embed" if a.tied else "lm_head")  # [1, T, vocab]
    return [logits]


def _block(b: GraphBuilder, a: Arch, i: int, x: int, pos: int, slots: int) -> int:
    p = f"layers.{i}."
    h = b.add(Op.RMSNORM, [x], w=p + "attn_norm", eps=a.eps)
    q = b.add(Op.LINEAR, [h], w=p + "wq", b=p + "bq" if a.qkv_bias else None)  # [1, T, H*D]
    k = b.add(Op.LINEAR, [h], w=p + "wk", b=p + "bk" if a.qkv_bias else None)  # [1, T, KV*D]
    v = b.add(Op.LINEAR, [h], w=p + "wv", b=p + "bv" if a.qkv_bias else None)  # [1, T, KV*D]
    rope = dict(w="rope.inv_freq", head_dim=a.head_dim, scale=a.rope_scale)
    q = b.add(Op.ROPE, [q, pos], heads=a.heads, **rope)
    k = b.add(Op.ROPE, [k, pos], heads=a.kv_heads, **rope)
    kv = b.add(Op.KV_WRITE, [k, v, pos], layer=i)
    attn = b.add(
        Op.ATTENTION,
        [q, kv, pos, slots],
        layer=i,
        heads=a.heads,
        kv_heads=a.kv_heads,
        head_dim=a.head_dim,
        mask="sliding" if a.windows[i] else "causal",
        window=a.windows[i] or None,
    )  # [1, T, H*D]
    x = b.add(Op.ADD, [x, b.add(Op.LINEAR, [attn], w=p + "wo")])
    h = b.add(Op.RMSNORM, [x], w=p + "mlp_norm", eps=a.eps)
    gate = b.add(Op.SILU, [b.add(Op.LINEAR, [h], w=p + "w_gate")])  # [1, T, I]
    up = b.add(Op.LINEAR, [h], w=p + "w_up")  # [1, T, I]
    down = b.add(Op.LINEAR, [b.add(Op.MUL, [gate, up])], w=p + "w_down")  # [1, T, hidden]
    return b.add(Op.ADD, [x, down])


def weight_shapes(a: Arch) -> Mapping[str, tuple[int, ...]]:
    """The shape of every IR weight (checked against the checkpoint when loading)."""
    hd, kvd = a.heads * a.head_dim, a.kv_heads * a.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "embed": (a.vocab, a.hidden),
        "norm": (a.hidden,),
        "rope.inv_freq": (a.head_dim // 2,),
    }
    if not a.tied:
        shapes["lm_head"] = (a.vocab, a.hidden)
    for i in range(a.layers):
        p = f"layers.{i}."
        shapes |= {p + "attn_norm": (a.hidden,), p + "mlp_norm": (a.hidden,)}
        shapes |= {p + "wq": (hd, a.hidden), p + "wk": (kvd, a.hidden), p + "wv": (kvd, a.hidden)}
        shapes |= {p + "wo": (a.hidden, hd)}
        if a.qkv_bias:
            shapes |= {p + "bq": (hd,), p + "bk": (kvd,), p + "bv": (kvd,)}
        shapes |= {p + "w_gate": (a.intermediate, a.hidden), p + "w_up": (a.intermediate, a.hidden)}
        shapes |= {p + "w_down": (a.hidden, a.intermediate)}
    return shapes
