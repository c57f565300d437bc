"""Fixtures of the runtime tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def quiet(tmp_path_factory):
    """max_seq_len -> (loaded, traced Module) of a seeded 6-layer tiny Llama whose layers 2
    and 3 are nearly silent (output projections scaled by 1e-3): skipping them changes the
    model little, so layer-skip drafts and depth variants agree with it (the catalog's tiny
    models have 2 layers, none of which may go)."""
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from arc.compiler import trace_model
    from arc.models import tiny

    out = tmp_path_factory.mktemp("tiny6q")
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**tiny._COMMON, "num_hidden_layers": 6}, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for i in (2, 3):
            model.model.layers[i].self_attn.o_proj.weight.mul_(1e-3)
            model.model.layers[i].mlp.down_proj.weight.mul_(1e-3)
    model.generation_config = GenerationConfig(eos_token_id=258, bos_token_id=None)
    model.save_pretrained(out)
    tiny.byte_tokenizer().save_pretrained(out)
    return {seq: trace_model(str(out), seq) for seq in (96, 256)}
