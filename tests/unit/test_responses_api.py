"""The Responses API's translation to and from chat completions: input items and tools as the
chat request they mean, errors named by the Responses field, a chat completion as a Response,
and a chat stream as the Responses stream's ordered events."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.scheduler.http.responses import (
    ResponsesRequest,
    StreamTranslator,
    field_namer,
    response_object,
    to_chat,
)

TOOL = {"type": "function", "name": "add", "parameters": {"type": "object"}}


def test_input_items_become_the_conversation():
    req = ResponsesRequest(
        instructions="be brief",
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "add 1 2"}]},
            {"type": "function_call", "call_id": "c1", "name": "add", "arguments": '{"a": 1}'},
            {"type": "function_call", "call_id": "c2", "name": "add", "arguments": '{"a": 2}'},
            {"type": "function_call_output", "call_id": "c1", "output": "3"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "3"}]},
        ],
        max_output_tokens=7,
        tools=[TOOL],
        tool_choice={"type": "function", "name": "add"},
        text={"format": {"type": "json_schema", "name": "p", "schema": {"type": "object"}, "strict": True}},
        stream=True,
    )
    chat = to_chat(req)
    roles = [m.role for m in chat.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert [c["id"] for c in chat.messages[2].tool_calls] == ["c1", "c2"]  # calls made together: one turn
    assert chat.messages[1].content == [{"type": "text", "text": "add 1 2"}]
    assert chat.max_tokens == 7 and chat.stream and chat.stream_options.include_usage
    assert chat.tools == [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    assert chat.tool_choice == {"type": "function", "function": {"name": "add"}}
    assert chat.response_format == {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}, "strict": True}}


@pytest.mark.parametrize(
    "change,param",
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": []}, "input"),
        ({"input": [{"type": "web_search_call"}]}, "input[0]"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input"),  # nothing to answer
        ({"input": [{"type": "reasoning", "content": 5}]}, "input[0].content"),
        ({"input": [{"type": "reasoning", "summary": True}]}, "input[0].content"),
        ({"input": [{"type": "reasoning", "content": [{"type": "reasoning_text", "text": None}]}]}, "input[0].content"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ],
)
def test_what_cannot_be_translated_is_named(change, param):
    with pytest.raises(InvalidArgument) as e:
        to_chat(ResponsesRequest(**{"input": "hi", **change}))
    assert e.value.field == param


def test_chat_fields_are_named_as_the_client_set_them():
    with_instructions = field_namer(ResponsesRequest(input="x", instructions="i"))
    assert with_instructions("messages[1].content") == "input[0].content"
    assert with_instructions("messages[0]") == "instructions"
    assert with_instructions("max_completion_tokens") == "max_output_tokens"
    assert with_instructions("response_format") == "text.format"
    assert field_namer(ResponsesRequest(input="x"))("messages[0]") == "input[0]"


CHAT = {
    "id": "chatcmpl-abc", "created": 5, "model": "m",
    "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Sure.",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 1}},
}


def test_a_chat_completion_as_a_response():
    r = response_object(CHAT, ResponsesRequest(input="x", tools=[TOOL]))
    assert (r["id"], r["object"], r["status"], r["incomplete_details"]) == ("resp_abc", "response", "completed", None)
    message, call = r["output"]
    assert message["content"][0] == {"type": "output_text", "text": "Sure.", "annotations": [], "logprobs": []}
    assert (call["type"], call["call_id"], call["name"], call["arguments"]) == ("function_call", "call_1", "add", '{"a": 1}')
    assert r["usage"]["input_tokens"] == 3 and r["usage"]["input_tokens_details"]["cached_tokens"] == 1
    cut = {**CHAT, "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "ab"}}]}
    r = response_object(cut, ResponsesRequest(input="x"))
    assert r["status"] == "incomplete" and r["incomplete_details"] == {"reason": "max_output_tokens"}


def test_a_chat_stream_as_the_responses_events():
    t = StreamTranslator(ResponsesRequest(input="x"), "m")
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, **CHAT["choices"][0]["message"]["tool_calls"][0]}]},
                      "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": CHAT["usage"]},
    ]
    events = t.start() + [e for c in chunks for e in t.chunk(c)]
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[6]["text"] == "Hello" and events[4]["output_index"] == 0 and events[9]["output_index"] == 1
    final = events[-1]["response"]
    assert [o["type"] for o in final["output"]] == ["message", "function_call"]
    assert final["output"][0]["content"][0]["text"] == "Hello" and final["usage"]["output_tokens"] == 4


def test_the_chat_routes_extra_fields_pass_on_and_a_bad_one_is_named():
    chat = to_chat(ResponsesRequest(input="hi", top_k=3, seed=7, chat_template_kwargs={"enable_thinking": False},
                                    structured_outputs={"regex": "[ab]"}, unknown_field=1))
    assert (chat.top_k, chat.seed) == (3, 7) and chat.chat_template_kwargs == {"enable_thinking": False}
    assert chat.structured_outputs == {"regex": "[ab]"} and "unknown_field" not in chat.model_dump()
    with pytest.raises(InvalidArgument) as e:
        to_chat(ResponsesRequest(input="hi", top_k="many"))
    assert e.value.field == "top_k"


def test_a_reasoning_item_goes_with_the_assistant_turn_after_it():
    chat = to_chat(ResponsesRequest(input=[
        {"role": "user", "content": "2+2?"},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "add"}]},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
    ]))
    assert [m.role for m in chat.messages] == ["user", "assistant", "user"]
    assert chat.messages[1].model_extra["reasoning_content"] == "add"
