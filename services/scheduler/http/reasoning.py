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

    @classmethod
    def for_prompt(cls, prompt_text: str) -> Reasoning:
        # the generation prompt's own <think>, at its very end: a tag quoted earlier in the
        # conversation (a user asking what <think> means) opens nothing
        return cls(open_in_prompt=prompt_text.rstrip().endswith(START))

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


def detect(template_source: str | None) -> bool:
    return bool(template_source) and START in template_source


def choose(setting: str, template_source: str | None) -> bool:
    """TANDEM_REASONING_PARSER: auto (on when the template writes <think>), none, or think
    (also named deepseek_r1 or qwen3)."""
    if setting == "auto":
        return detect(template_source)
    return setting != "none"
