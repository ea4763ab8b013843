"""Structured output after a thinking model's reasoning (Guidance.reasoning_start / _end,
shared/guidance.after_reasoning): the output may first reason freely up to the end tag, and the
requested language holds after it; the end tag as the vocabulary's own token (Qwen3's and
DeepSeek-R1's </think>) or spelled in text; without a reasoning_end nothing changes."""

from __future__ import annotations

import json

import llguidance
import pytest

from shared.guidance import after_reasoning, grammar
from shared.params import Guidance, InvalidRequest, SamplingParams
from shared.text import Tokenizer
from tests.helpers.models import make_thinking_checkpoint
from tests.helpers.tokenizers import make_tokenizer_dir

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
ANSWERS = {  # a guidance, and an answer in its language
    "regex": (Guidance("regex", r"Four\."), "Four."),
    "json_schema": (Guidance("json_schema", json.dumps(SCHEMA)), '{"a": 4}'),
    "json_object": (Guidance("json_object"), '{"b": 1}'),
    "lark": (Guidance("lark", 'start: "x" | "y"'), "y"),
}


@pytest.fixture(scope="module", params=["tags-as-tokens", "tags-as-text"])
def tokenizers(request, tmp_path_factory):
    """(llguidance's tokenizer, ours) of a vocabulary with <think> / </think> as added tokens
    (as reasoning models have them), or without them (the tags are spelled in several tokens)."""
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "tags-as-tokens":
        make_thinking_checkpoint(path)
    else:
        make_tokenizer_dir(path)
    return llguidance.LLTokenizer(str(path / "tokenizer.json")), Tokenizer.from_dir(path)


def takes(tokenizers, g: Guidance, text: str) -> str:
    """"complete", "partial" (a prefix of the language) or "refused", for the whole text."""
    llg, ours = tokenizers
    m = llguidance.LLMatcher(llg, after_reasoning(g, llg), log_level=0)
    assert not m.is_error(), m.get_error()
    if not m.consume_tokens(ours.encode(text, add_special_tokens=False)):
        return "refused"
    return "complete" if m.is_accepting() else "partial"


def thinking(g: Guidance, start: str = "<think>") -> Guidance:
    return Guidance(g.kind, g.value, reasoning_start=start, reasoning_end="</think>")


@pytest.mark.parametrize("kind", ANSWERS)
def test_the_language_holds_after_reasoning_the_model_opens(tokenizers, kind):
    g, answer = ANSWERS[kind]
    g = thinking(g)  # Qwen3's way: the model writes <think> itself, or does not think
    assert takes(tokenizers, g, f"<think>\nLet me see: {{not json}}.\n</think>\n\n{answer}") == "complete"
    assert takes(tokenizers, g, f"\n<think>first < then</think> {answer}") == "complete"
    assert takes(tokenizers, g, f"<think></think>{answer}") == "complete"
    assert takes(tokenizers, g, answer) == "complete"  # no thinking: the language from the first token
    assert takes(tokenizers, g, f"Sure! {answer}") == "refused"
    # while the block is open anything goes, even the answer, and it is not yet the answer
    assert takes(tokenizers, g, f"<think>\n{answer}") == "partial"
    assert takes(tokenizers, g, f"<think>\nhm</think>\n\nnot the {kind}") == "refused"
    # the first </think> ends the reasoning
    assert takes(tokenizers, g, f"<think>a</think>b</think>{answer}") == "refused"


@pytest.mark.parametrize("kind", ANSWERS)
def test_the_language_holds_after_reasoning_the_prompt_opened(tokenizers, kind):
    g, answer = ANSWERS[kind]
    g = thinking(g, start="")  # DeepSeek-R1's way: the prompt ends with <think>
    assert takes(tokenizers, g, f"Let me see: {{not json}}.\n</think>\n\n{answer}") == "complete"
    assert takes(tokenizers, g, f"</think>{answer}") == "complete"
    assert takes(tokenizers, g, answer) == "partial"  # still reasoning
    assert takes(tokenizers, g, f"a</think>b</think>{answer}") == "refused"


def test_an_end_tag_the_vocabulary_holds_closes_only_as_that_token(tmp_path):
    path, _, end = make_thinking_checkpoint(tmp_path)
    llg, ours = llguidance.LLTokenizer(str(path / "tokenizer.json")), Tokenizer.from_dir(path)
    g = thinking(ANSWERS["regex"][0])
    m = llguidance.LLMatcher(llg, after_reasoning(g, llg), log_level=0)
    spelled = [ours.encode(piece, add_special_tokens=False) for piece in ("<think>a", "</", "think>", "Four.")]
    assert spelled[0][0] != end and end not in [i for ids in spelled for i in ids]
    assert m.consume_tokens(spelled[0] + spelled[1]) and not m.consume_tokens(spelled[2])


def test_without_a_reasoning_end_the_language_holds_from_the_first_token(tokenizers):
    g, answer = ANSWERS["regex"]
    llg, _ = tokenizers
    assert after_reasoning(g, llg) == grammar(g)
    assert takes(tokenizers, g, answer) == "complete"
    assert takes(tokenizers, g, f"<think>hm</think>{answer}") == "refused"


@pytest.mark.parametrize(
    "g, message",
    [
        (Guidance("regex", "a", reasoning_start="<think>"), "reasoning_start needs a reasoning_end"),
        (Guidance("regex", "a", reasoning_end="x" * 65), "reasoning_end is 65 bytes, more than 64"),
        (Guidance("regex", "a", reasoning_start="é" * 33, reasoning_end="</think>"), "reasoning_start is 66 bytes"),
    ],
)
def test_bad_tags_are_refused_naming_the_field(g, message):
    with pytest.raises(InvalidRequest, match=message) as e:
        SamplingParams(guidance=g).validate()
    assert e.value.field == "guidance"
