"""Reasoning written before the answer, for models that think aloud between <think> and
</think> (DeepSeek-R1 and its distills, Qwen3, QwQ). The chat route returns it apart from the
answer, as `reasoning_content` (vLLM's field), and the Responses route as a reasoning item.

A choice is in the reasoning from its first token when its prompt ends with <think>
(DeepSeek-R1's templates open the block in the generation prompt), or when its text begins
with <think> (Qwen3's thinking mode). The reasoning ends at </think> (all of a text cut before
it is reasoning); the answer is the rest. Qwen3 with `enable_thinking: false` renders an empty,
closed block in the prompt, so the whole text is the answer.

`detect` turns the parser on when the chat template's source writes <think>
(TANDEM_REASONING_PARSER=auto). Knows nothing of HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.text import partial_tail

START, END = "<think>", "</think>"
NAMES = ("think", "deepseek_r1", "qwen3")  # vLLM's parser names, one format


@dataclass(frozen=True)
class Reasoning:
    """How one request's choices split into reasoning and answer."""

    open_in_prompt: bool  # the prompt ends inside a <think> block
    closed_in_prompt: bool = False  # the prompt ends with an (empty) closed block: no thinking

    @classmethod
    def for_prompt(cls, prompt_text: str) -> Reasoning:
        # the generation prompt's own tags, at its very end: a tag quoted earlier in the
        # conversation (a user asking what <think> means) opens nothing
        end = prompt_text.rstrip()
        return cls(open_in_prompt=end.endswith(START), closed_in_prompt=end.endswith(END))

    def split(self, text: str, final: bool) -> tuple[str, str]:
        """(reasoning, answer) of a choice's text so far. While it streams (`final` False), a
        tag that may be arriving is in neither, so that what each returns only grows. Leading
        whitespace of either is dropped (the newlines around the tags)."""
        body = text
        if not self.open_in_prompt:
            opening = text.lstrip()
            if opening.startswith(START):
                body = opening[len(START) :]
            elif not final and START.startswith(opening):
                return "", ""  # nothing yet, or a <think> arriving
            else:
                return "", text
        at = body.find(END)
        if at >= 0:
            return body[:at].lstrip(), body[at + len(END) :].lstrip()
        if not final:
            body = body[: len(body) - partial_tail(body, END)]
        return body.lstrip(), ""


class TokenCount:
    """How many of one choice's tokens are reasoning, counted as its pieces arrive: up to and
    including the one that closes the block (exactly where </think> is one token, as in
    DeepSeek-R1's and Qwen3's vocabularies; else up to the piece whose text closes it), all of
    them while it is open, none when the choice does not think."""

    def __init__(self, reasoning: Reasoning, end_id: int | None):
        self._reasoning = reasoning
        self._end_id = end_id
        self._head = ""  # the text's start, until it shows whether the choice thinks
        self._tail = ""  # the text's last len(END) - 1 characters, for a tag split across pieces
        self._tokens = 0
        self._closed_at: int | None = None

    def add(self, text: str, token_ids: list[int]) -> None:
        before, self._tokens = self._tokens, self._tokens + len(token_ids)
        if len(self._head) < len(START) or not self._head.strip():
            self._head += text
        if self._closed_at is not None:
            return
        if self._end_id is not None and self._end_id in token_ids:
            self._closed_at = before + token_ids.index(self._end_id) + 1
        elif END in self._tail + text:
            self._closed_at = self._tokens
        self._tail = (self._tail + text)[-(len(END) - 1) :]

    @property
    def tokens(self) -> int:
        if not self._reasoning.open_in_prompt and not self._head.lstrip().startswith(START):
            return 0
        return self._tokens if self._closed_at is None else self._closed_at


def detect(template_source: str | None) -> bool:
    return bool(template_source) and START in template_source


def choose(setting: str, template_source: str | None) -> bool:
    """TANDEM_REASONING_PARSER: auto (on when the template writes <think>), none, or think
    (also named deepseek_r1 or qwen3)."""
    if setting == "auto":
        return detect(template_source)
    return setting != "none"
