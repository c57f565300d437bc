"""Tiny random-weight models for tests: seeded HF configs of each family, a byte tokenizer.

Their reference is Hugging Face's own forward for the same saved weights, so a tiny model
tests the whole path (trace, passes, targets, runtime) in seconds.
"""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 320  # 256 bytes + specials, padded

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    initializer_range=0.08,  # wider than HF's 0.02 so greedy argmax gaps are far above fp32 noise
    eos_token_id=258,
    bos_token_id=None,
    pad_token_id=None,
)


def _config(kind: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if kind == "tiny-llama":
        return LlamaConfig(**_COMMON, tie_word_embeddings=False, rope_theta=10000.0)
    if kind == "tiny-qwen2":
        return Qwen2Config(**_COMMON, tie_word_embeddings=True, rope_theta=1e6)
    if kind == "tiny-mistral":  # a small window so tests cross it
        return MistralConfig(**_COMMON, tie_word_embeddings=False, sliding_window=24)
    raise KeyError(kind)


KINDS = ("tiny-llama", "tiny-qwen2", "tiny-mistral")


def byte_tokenizer():
    """A byte-level tokenizer (every byte one token) with ChatML specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", chat_template=CHATML
    )


def build(kind: str, out: Path) -> Path:
    """Write a seeded random-weight model of `kind` with its tokenizer to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(0)
    cfg = _config(kind)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=258, bos_token_id=None)
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out
