"""The bundled demo pair (models/tandem-demo-code): loads in transformers and in the engine with the
same greedy outputs, continues Python openings with Python, and the draft agrees with the target
often enough for speculative decoding to pay."""

from __future__ import annotations

import builtins
import json
import keyword
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer as HFTokenizer

from shared.engine import EngineConfig, LLMEngine, SamplingParams  # a broken engine fails here
from shared.text import REPLACEMENT_CHAR, Tokenizer
from tests.helpers.models import hf_greedy, load_hf
from tools.train_demo import greedy_agreement, sample_batch, stdlib_texts, token_stream

DEMO = Path(__file__).resolve().parents[2] / "models" / "tandem-demo-code"
KINDS = ("target", "draft")
OPENINGS = ["def ", "import ", "class "]
MAX_BYTES = 20_000_000
# Words a reader recognizes as Python at a glance: keywords, builtins, self/cls.
PYTHON_WORDS = set(keyword.kwlist) | {w for w in dir(builtins) if not w.startswith("_")} | {"self", "cls"}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(DEMO / "target")


@pytest.fixture(scope="module")
def hf_models() -> dict:
    return {kind: load_hf(DEMO / kind) for kind in KINDS}


def _python_word_share(text: str) -> float:
    words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)
    return sum(w in PYTHON_WORDS for w in words) / max(1, len(words))


def test_layout_dtype_and_size():
    total = 0
    for kind in KINDS:
        d = DEMO / kind
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json"):
            assert (d / name).is_file(), f"{kind}/{name} missing"
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes == {"BF16"}, f"{kind} weights stored as {dtypes}"
        total += sum(p.stat().st_size for p in d.iterdir())
    assert total <= MAX_BYTES, f"demo pair is {total / 1e6:.1f} MB, budget {MAX_BYTES / 1e6:.0f} MB"
    # One tokenizer for both: the draft's proposals are target token ids.
    assert (DEMO / "target/tokenizer.json").read_bytes() == (DEMO / "draft/tokenizer.json").read_bytes()
    target, draft = (json.loads((DEMO / k / "config.json").read_text()) for k in KINDS)
    assert target["vocab_size"] == draft["vocab_size"]
    assert draft["num_hidden_layers"] * 4 <= target["num_hidden_layers"], "the draft must be much cheaper"


def test_tokenizer_conventions(tokenizer):
    ids = tokenizer.encode("def ")
    assert ids[0] == tokenizer.bos_token_id == 1 and tokenizer.eos_token_ids == [2]
    assert len(ids) == 2, "an opening that ends in a space is one token, as in training"
    text = "class A:\n    def f(self, x='é'):\n        return x  # ok\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_continuation_is_python(kind, hf_models, tokenizer):
    texts = []
    for opening in OPENINGS:
        out = hf_greedy(hf_models[kind], tokenizer.encode(opening), 48)
        text = opening + tokenizer.decode(out)
        assert REPLACEMENT_CHAR not in text, f"{kind} wrote broken UTF-8 after {opening!r}: {text!r}"
        texts.append(text)
    share = _python_word_share("\n".join(texts))
    assert share >= 0.2, f"{kind}: only {share:.0%} of words are Python keywords/builtins:\n" + "\n---\n".join(texts)


def test_draft_agrees_with_target_on_heldout_stdlib(hf_models):
    files = stdlib_texts(heldout=True)
    assert len(files) >= 10, "held-out split of the stdlib is unexpectedly small"
    # Random 256-token windows of the held-out files, as in the model card's figure.
    stream = token_stream(HFTokenizer.from_file(str(DEMO / "target/tokenizer.json")), [t for _, t in files])
    windows = sample_batch(stream, 12, 256, torch.Generator().manual_seed(7))
    rate = greedy_agreement(hf_models["target"], hf_models["draft"], windows.tolist())
    assert rate >= 0.5, f"draft agrees with the target on {rate:.1%} of held-out positions"


@pytest.mark.parametrize("kind", KINDS)
def test_engine_greedy_matches_transformers(kind, hf_models, tokenizer):
    engine = LLMEngine(
        EngineConfig(model=str(DEMO / kind), dtype="float32", num_blocks=64, block_size=16)
    )
    prompts = [tokenizer.encode(o) for o in OPENINGS]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outputs = engine.generate(prompts, params)
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out == hf_greedy(hf_models[kind], prompt, 32), tokenizer.decode(prompt)

