"""A thinking model's <think> block apart from its answer (services/scheduler/http/reasoning.py):
the whole text's split, and while it streams, splits that only grow and end where the whole
text's split is."""

from __future__ import annotations

import pytest

from services.scheduler.http import reasoning
from services.scheduler.http.reasoning import Reasoning

OPEN = Reasoning(open_in_prompt=True)  # DeepSeek-R1: the generation prompt ends with <think>
CLOSED = Reasoning(open_in_prompt=False)  # Qwen3: the model writes <think> itself, or not


@pytest.mark.parametrize(
    "how, text, expected",
    [
        (CLOSED, "<think>\nLet me add.\n</think>\n\n4", ("Let me add.\n", "4")),
        (CLOSED, "  <think>x</think>y", ("x", "y")),
        (CLOSED, "4, no thinking", ("", "4, no thinking")),
        (CLOSED, "I <think> not", ("", "I <think> not")),  # a <think> later on is text
        (CLOSED, "<think>cut by max_tokens", ("cut by max_tokens", "")),
        (CLOSED, "<thi", ("", "<thi")),  # the whole text: a tag that never came is text
        (OPEN, "\nLet me add.\n</think>\n\n4", ("Let me add.\n", "4")),
        (OPEN, "still thinking when cut", ("still thinking when cut", "")),
        (OPEN, "a</think>b</think>c", ("a", "b</think>c")),
        (OPEN, "", ("", "")),
    ],
)
def test_the_whole_text_splits_at_the_tags(how, text, expected):
    assert how.split(text, final=True) == expected


def test_the_prompt_says_whether_the_block_is_open():
    deepseek = "<｜User｜>2+2?<｜Assistant｜><think>\n"
    qwen3_no_thinking = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    quoted = "<|im_start|>user\nWhat does <think> mean?<|im_end|>\n<|im_start|>assistant\n"
    assert Reasoning.for_prompt(deepseek).open_in_prompt
    assert not Reasoning.for_prompt(qwen3_no_thinking).open_in_prompt
    assert not Reasoning.for_prompt(quoted).open_in_prompt  # a tag the user quoted opens nothing
    assert not Reasoning.for_prompt("plain").open_in_prompt
    # a prompt that closed the block: the reply does not think (structured output holds at once)
    assert Reasoning.for_prompt(qwen3_no_thinking).closed_in_prompt
    assert not any(Reasoning.for_prompt(p).closed_in_prompt for p in (deepseek, quoted, "plain"))


TEXTS = [
    "<think>\nLet me add 2 and 2.\n</think>\n\nIt is 4.",
    "\n<think>a < b and </b> is not </think> the end</think>done",
    "no thinking at all, just <text>",
    "<think>cut before the end </thin",
    "<",
    "",
]


@pytest.mark.parametrize("how", [OPEN, CLOSED], ids=["open", "closed"])
@pytest.mark.parametrize("text", TEXTS)
def test_streamed_splits_only_grow_and_end_at_the_whole_split(how, text):
    previous = ("", "")
    for end in range(len(text) + 1):  # one character at a time: every place a tag can be cut
        now = how.split(text[:end], final=False)
        assert now[0].startswith(previous[0]) and now[1].startswith(previous[1]), (text[:end], previous, now)
        previous = now
    final = how.split(text, final=True)
    assert final[0].startswith(previous[0]) and final[1].startswith(previous[1])


def test_a_tag_arriving_is_held_back():
    assert CLOSED.split("<th", final=False) == ("", "")
    assert CLOSED.split("<think>abc</th", final=False) == ("abc", "")
    assert OPEN.split("abc</", final=False) == ("abc", "")
    assert OPEN.split("abc</think>\n", final=False) == ("abc", "")


def test_the_setting():
    qwen3 = "{% if enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    assert reasoning.choose("auto", qwen3) and not reasoning.choose("auto", "{{ messages }}")
    assert not reasoning.choose("auto", None) and not reasoning.choose("none", qwen3)
    assert all(reasoning.choose(name, None) for name in reasoning.NAMES)


END_ID = 99  # </think> as one token of the vocabulary


def _count(how: Reasoning, pieces: list[tuple[str, list[int]]], end_id: int | None = END_ID) -> int:
    count = reasoning.TokenCount(how, end_id)
    for text, ids in pieces:
        count.add(text, ids)
    return count.tokens


@pytest.mark.parametrize(
    "how, pieces, end_id, expected",
    [
        # </think> one token: counted to it exactly, also inside a piece of several (speculation)
        (OPEN, [("a", [1]), ("b</think>c", [2, END_ID, 3]), ("d", [4])], END_ID, 3),
        (CLOSED, [("<think>", [7]), ("x", [1]), ("</think>", [END_ID]), ("y", [2])], END_ID, 3),
        # </think> spelled in several tokens: to the piece whose text closes the block
        (CLOSED, [("<think>x", [7, 1]), ("</th", [5]), ("ink>", [6]), ("y", [2])], None, 4),
        (OPEN, [("x</think", [1, 5]), (">\n", [6, 8]), ("y", [2])], None, 4),
        # a block still open: every token is reasoning
        (OPEN, [("still ", [1]), ("thinking", [2, 3])], END_ID, 3),
        (CLOSED, [("<th", [7]), ("ink>", [8]), ("cut", [1])], None, 3),
        # a reply that does not think: none, whatever it writes later
        (CLOSED, [("4, ", [1]), ("<think>x</think>", [7, 1, END_ID])], END_ID, 0),
        (CLOSED, [("\n", [8]), (" ", [9])], END_ID, 0),
    ],
)
def test_the_reasoning_tokens_are_counted(how, pieces, end_id, expected):
    assert _count(how, pieces, end_id) == expected
