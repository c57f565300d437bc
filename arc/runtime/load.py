"""Load an .arc engine: check it, hand its artifact to its target, build a Generator."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arc import targets
from arc.engine import WEIGHTS, open_engine, read_manifest
from arc.errors import EngineError
from arc.ir import Module, module_from_json
from arc.runtime.generate import Generator


@dataclass
class LoadedEngine:
    manifest: dict[str, Any]
    module: Module
    generator: Generator
    tokenizer: Any

    def prompt_ids(self, prompt: str, *, chat: bool = True, system: str | None = None) -> list[int]:
        """Token ids for `prompt`, through the model's chat template when it has one."""
        tok = self.tokenizer
        if chat and tok.chat_template:
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            return list(
                tok.apply_chat_template(
                    msgs, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
        return list(tok.encode(prompt, add_special_tokens=True))


def load_engine(path: str | Path, *, progress: bool = False) -> LoadedEngine:
    """Check and load engine `path`; `progress` shows a bar (stderr) while payloads are checked."""
    from safetensors.torch import load_file
    from tqdm import tqdm
    from transformers import AutoTokenizer

    manifest = read_manifest(Path(path))  # cheap checks first: format, version, self-digest
    tinfo = manifest["target"]
    target = targets.get(tinfo["name"])
    target.check_engine(tinfo)  # device, GPU arch, torch version: before any native code
    total = sum(f["size"] for f in manifest["files"].values())
    with tqdm(
        total=total,
        desc="check engine",
        unit="B",
        unit_scale=True,
        leave=False,
        disable=not progress,
        file=sys.stderr,
    ) as bar:
        engine = open_engine(Path(path), bar.update)  # every payload's size and SHA-256
    try:
        module = module_from_json(manifest["ir"])
    except (KeyError, ValueError, TypeError) as e:
        raise EngineError(f"{path}: IR in manifest unreadable ({e})") from None
    weights = load_file(str(engine.file(WEIGHTS)))
    steps = target.load(module, weights, engine.root / "artifacts", tinfo, manifest["device"])
    tok = AutoTokenizer.from_pretrained(engine.root / manifest["tokenizer"]["dir"])
    rt = manifest["runtime"]
    gen = Generator(steps, tok, module.meta.get("eos_ids", []), prefill_chunk=rt["prefill_chunk"])
    return LoadedEngine(manifest, module, gen, tok)
