"""Small tokenizers trained on the fly, so tests need no network and no model download.

`make_tokenizer_dir(tmp_path)` writes a byte-level BPE `tokenizer.json` (vocab ~400, ids 0-2 are
"<unk>", "<s>", "</s>") and a Llama-style `tokenizer_config.json` (add_bos_token true). Training
runs once per process; later calls only write the cached JSON.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB_SIZE = 400

_WORDS = (
    "the quick brown fox jumps over lazy dog hello world def return import class self print "
    "value token model cache block stream prefill decode draft héllo wörld naïve café über "
    "日本語 東京 中文 한국어 🙂 🚀 ✓ — … émoji"
).split()


def training_lines(n: int = 300) -> list[str]:
    """Deterministic text mixing ASCII, accented Latin, CJK and emoji."""
    lines = []
    for i in range(n):
        words = [_WORDS[(i * 7 + j * 13) % len(_WORDS)] for j in range(6 + i % 5)]
        lines.append(" ".join(words) + (".\n" if i % 3 else "\n"))
    return lines


@functools.cache
def _trained_json(kind: str) -> str:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # sentencepiece-like: "▁" marks a word start, the decoder drops the first one
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(training_lines(), trainer)
    return tok.to_str()


def make_tokenizer_dir(
    tmp_path: Path,
    *,
    kind: str = "bytelevel",
    add_bos_token: bool = True,
    post_processor_bos: bool = False,
    generation_config: dict | None = None,
) -> Path:
    """Write tokenizer.json + tokenizer_config.json (bos "<s>"=1, eos "</s>"=2) into tmp_path.

    kind: "bytelevel" (GPT-2/Llama-3 style) or "metaspace" (sentencepiece style).
    post_processor_bos: the tokenizer.json post-processor itself prepends "<s>" (Llama-3 style).
    """
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_str(_trained_json(kind))
    if post_processor_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
        )
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": add_bos_token}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if generation_config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    return tmp_path
