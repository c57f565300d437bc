"""An engine's tokenizer (arc/runtime/load.py `_tokenizer`): a `TokenizersBackend` one is made
by that class directly, skipping AutoTokenizer's scan of every model's module; it must be the
tokenizer AutoTokenizer makes of the same files, for every tiny family's engine."""

from __future__ import annotations

import zipfile

import pytest

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "  spaces,\ttabs and ünïcödé — 123 456",
]


def test_engine_tokenizer_is_autotokenizers(tiny_engines, tmp_path):
    from transformers import AutoTokenizer

    from arc.runtime.load import _tokenizer

    direct = 0
    for ref, engine in tiny_engines.items():
        root = tmp_path / ref
        with zipfile.ZipFile(engine) as z:
            z.extractall(root, [n for n in z.namelist() if n.startswith("tokenizer/")])
        directory = root / "tokenizer"
        ours, auto = _tokenizer(directory, engine), AutoTokenizer.from_pretrained(directory)
        assert type(ours) is type(auto), ref
        direct += type(ours).__name__ == "TokenizersBackend"
        for text in TEXTS:
            ids = ours.encode(text)
            assert ids == auto.encode(text), (ref, text)
            assert ours.decode(ids, skip_special_tokens=True) == auto.decode(
                ids, skip_special_tokens=True
            )
        if auto.chat_template:
            chat = [{"role": "user", "content": TEXTS[0]}]
            got = ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            want = auto.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            assert got == want, ref
        assert ours.eos_token_id == auto.eos_token_id
        assert ours.all_special_ids == auto.all_special_ids
    if not direct:
        pytest.fail("no tiny engine's tokenizer took the direct path: the test tests nothing")
