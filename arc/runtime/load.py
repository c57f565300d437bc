"""Load an .arc engine: check it, hand its artifact to its target, build a Generator."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arc import targets
from arc.cache import EntryGone, EntryLock
from arc.engine import ARTIFACTS, CORPUS, TOKENIZER, WEIGHTS, open_engine, read_manifest
from arc.errors import ArcError, EngineError
from arc.ir import Module
from arc.lowering import weight_tensors
from arc.manifest import module_of
from arc.runtime.generate import Generator
from arc.runtime.speculative import check_plan


@dataclass
class LoadedEngine:
    manifest: dict[str, Any]
    module: Module
    generator: Generator
    tokenizer: Any
    lock: Any = None  # holds the unpacked engine in the cache against `arc cache prune`

    def prompt_ids(self, prompt: str, *, chat: bool = True, system: str | None = None) -> list[int]:
        """Token ids for `prompt`, through the model's chat template when it has one."""
        return prompt_ids(self.tokenizer, prompt, chat=chat, system=system)


def prompt_ids(tok, prompt: str, *, chat: bool = True, system: str | None = None) -> list[int]:
    """Token ids for `prompt` with tokenizer `tok`, through its chat template when it has one."""
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
    from tqdm import tqdm

    manifest = read_manifest(Path(path))  # format, version, self-digest, schema, payload names
    tinfo = manifest["target"]
    target = targets.get(tinfo["name"])
    if manifest["device"] not in target.DEVICES:
        raise EngineError(f"{path}: target {target.NAME} has no device {manifest['device']!r}")
    target.check_engine(tinfo)  # device, GPU arch, CPU extensions, torch: before native code
    module = module_of(manifest, path)
    plan = manifest["decode_plan"]
    if plan != {"kind": module.plan.kind, "options": dict(module.plan.options)}:
        raise EngineError(f"{path}: decode_plan disagrees with the IR's plan")
    try:
        check_plan(plan["kind"], plan["options"], module)
    except ArcError as e:
        raise EngineError(f"{path}: {e}") from None
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
        engine, lock = _open_locked(Path(path), bar.update)  # every payload's size, SHA-256
    weights = _weights(engine, module, path)
    try:
        steps = target.load(module, weights, engine.root / ARTIFACTS, tinfo, manifest["device"])
    except ArcError:
        raise
    except Exception as e:  # noqa: BLE001 - a crafted IR that verifies but does not lower
        raise EngineError(f"{path}: engine does not load ({_why(e)})") from None
    if plan["options"].get("accept") == "relaxed":
        from arc.runtime.relaxed import latents_of

        steps.latents = latents_of(module, weights)
    if plan["options"].get("corpus"):
        from arc.runtime.drafters.corpus import CorpusIndex

        steps.corpus = CorpusIndex(_corpus(engine, module, path))
    tok = _tokenizer(engine.root / TOKENIZER, path)  # the verified payloads, nowhere else
    rt = manifest["runtime"]
    gen = Generator(
        steps,
        tok,
        module.meta.get("eos_ids", []),
        prefill_chunk=rt["prefill_chunk"],
        plan=manifest["decode_plan"],
        meta=module.meta,
    )
    return LoadedEngine(manifest, module, gen, tok, lock)


def _open_locked(path: Path, progress):
    """Unpack (or find) the engine in the cache and hold it: a prune between the unpack and
    the lock removes it, and then it is unpacked once more."""
    for attempt in range(2):
        engine = open_engine(path, progress)
        try:
            return engine, EntryLock(engine.root)
        except EntryGone:
            if attempt:
                raise
    raise AssertionError("unreachable")


def _why(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:160]


def _weights(engine, module: Module, path) -> dict:
    """The engine's weights, checked against the tensors its IR reads (name, dtype, shape): the
    engine stores them materialized (fused ones concatenated, formats packed), so lowering meets
    no missing or misshapen tensor."""
    from safetensors.torch import load_file

    try:
        weights = load_file(str(engine.file(WEIGHTS)))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise EngineError(f"{path}: {WEIGHTS} unreadable ({_why(e)})") from None
    for name in module.used_weights():
        for t, (shape, dtype) in weight_tensors(module, name).items():
            have = weights.get(t)
            if (
                have is None
                or tuple(have.shape) != tuple(shape)
                or str(have.dtype) != f"torch.{dtype}"
            ):
                got = "missing" if have is None else f"{have.dtype} {tuple(have.shape)}"
                raise EngineError(
                    f"{path}: weight {t[:60]!r} is {got}, the IR wants {dtype} {shape}"
                )
    return weights


def _corpus(engine, module: Module, path):
    """The `corpus` drafter's datastore: a 1-D int32 array of token ids in the vocabulary, -1
    between documents (a crafted one could otherwise draft ids the embedding cannot look up)."""
    import numpy as np
    from safetensors.numpy import load_file

    from arc.ops import Op

    try:
        tokens = load_file(str(engine.file(CORPUS))).get("tokens")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise EngineError(f"{path}: {CORPUS} unreadable ({_why(e)})") from None
    embeds = [n.attrs["w"] for n in module.functions["decode"].nodes if n.op is Op.EMBED]
    vocab = module.weight_shapes()[embeds[0]][0] if embeds else None  # rows of the embedding
    if tokens is None or tokens.dtype != np.int32 or tokens.ndim != 1:
        raise EngineError(f"{path}: {CORPUS} holds no 1-D int32 tensor `tokens`")
    if len(tokens) and (tokens.min() < -1 or (vocab is not None and tokens.max() >= vocab)):
        raise EngineError(f"{path}: {CORPUS} holds token ids outside the vocabulary")
    return tokens


def _tokenizer(directory: Path, path):
    """The engine's tokenizer as transformers' AutoTokenizer makes it. A tokenizer saved as
    transformers 5's `TokenizersBackend` (every engine it compiles) is that class's own
    from_pretrained, the class AutoTokenizer resolves it to, without AutoTokenizer's scan of
    every model's module (~0.6 s of each `arc run`)."""
    try:  # an unreadable config is AutoTokenizer's to judge, as before
        config = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    try:
        if isinstance(config, dict) and config.get("tokenizer_class") == "TokenizersBackend":
            from transformers.tokenization_utils_tokenizers import TokenizersBackend

            return TokenizersBackend.from_pretrained(directory)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for bad files
        raise EngineError(f"{path}: tokenizer unreadable ({_why(e)})") from None
