"""Tool calls in free text (tool_choice "auto"): each parser finds the calls its model family
writes, returns the text around them as content, finds none in plain text or broken JSON, and
while streaming holds back exactly what may be the start of a call."""

from __future__ import annotations

import pytest

from services.scheduler.http.tool_parsers import PARSERS, choose, detect

HERMES, LLAMA = PARSERS["hermes"], PARSERS["llama3_json"]


def test_hermes_finds_every_call_and_the_content_before():
    text = (
        "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n"
        "<tool_call>\n{\"name\": \"add\", \"arguments\": \"{\\\"a\\\": 1}\"}\n</tool_call>"
    )
    assert HERMES.parse(text) == ("Let me look.", [("get_weather", {"city": "Paris"}), ("add", {"a": 1})])
    # the model stopped at EOS before closing the last block
    assert HERMES.parse('<tool_call>{"name": "f", "arguments": {}}') == ("", [("f", {})])
    assert HERMES.parse("no calls here") == ("no calls here", [])
    broken = '<tool_call>{"name": "f", "arguments": {</tool_call>'
    assert HERMES.parse(broken) == (broken, [])
    assert HERMES.parse('<tool_call>{"arguments": {}}</tool_call>')[1] == []  # no name: not a call


@pytest.mark.parametrize(
    "text,streamable",
    [("Hello", 5), ("Hello ", 5), ("Hello <", 5), ("Hello <tool_", 5), ("Hello <tool_call>{", 5), ("a < b", 5), ("", 0)],
)
def test_hermes_streams_up_to_a_possible_call(text, streamable):
    assert HERMES.streamable(text) == streamable


def test_llama3_json_calls():
    assert LLAMA.parse('{"name": "f", "parameters": {"x": 1}}') == ("", [("f", {"x": 1})])
    assert LLAMA.parse('<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "arguments": {"y": 2}}') == (
        "",
        [("f", {}), ("g", {"y": 2})],
    )
    assert LLAMA.parse("Paris is sunny.") == ("Paris is sunny.", [])
    assert LLAMA.parse('{"name": "f", "parameters": {}} and text')[1] == []
    assert LLAMA.parse('{"x": 1}')[1] == []
    assert LLAMA.streamable("  {") == 0 and LLAMA.streamable("<|py") == 0 and LLAMA.streamable("Sure") == 4


def test_the_parser_comes_from_the_template_or_the_setting():
    assert detect("{% for t in tools %}<tool_call>{{ t | tojson }}</tool_call>{% endfor %}") is HERMES
    assert detect("{{- '<|python_tag|>' }}") is LLAMA
    assert detect("{{ messages }}") is None and detect(None) is None
    assert choose("auto", "<tool_call>") is HERMES and choose("none", "<tool_call>") is None
    assert choose("llama3_json", None) is LLAMA
