"""tool_choice "auto" through the OpenAI front, against in-process services: a model whose chat
template writes hermes-style calls (<tool_call>...</tool_call>) gets its calls parsed out of the
reply (the parser is detected from the template), streamed or not, with the text before them as
content; a reply without calls is plain content. The replies are forced with structured output,
since a random tiny model writes no calls of its own."""

from __future__ import annotations

import json
import shutil

import openai
import pytest

from tests.e2e.procs import free_port

from .cluster import start_cluster

HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "Call a tool as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
MESSAGES = [{"role": "user", "content": "add"}]
CALL = r'<tool_call>\{"name": "add", "arguments": \{"a": [0-9]\}\}</tool_call>'


@pytest.fixture
async def client(tiny_model, tmp_path):
    model = tmp_path / "hermes-model"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    port = free_port()
    cluster = await start_cluster(model, num_prefill=0, scheduler_overrides={"http_port": port})
    yield openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    await cluster.wait_idle()
    await cluster.stop()


def forced(regex: str) -> dict:
    return {"extra_body": {"structured_outputs": {"regex": regex}}, "temperature": 0.0, "max_tokens": 128}


async def test_auto_parses_the_calls_out_of_the_reply(client):
    r = await client.chat.completions.create(model=None, messages=MESSAGES, tools=TOOLS, **forced(r"Sure\. " + CALL))
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure."
    (call,) = choice.message.tool_calls
    assert call.function.name == "add" and set(json.loads(call.function.arguments)) == {"a"}


async def test_auto_streams_the_content_then_the_calls(client):
    stream = await client.chat.completions.create(
        model=None, messages=MESSAGES, tools=TOOLS, stream=True, **forced(r"Sure thing\. " + CALL)
    )
    chunks = [c async for c in stream]
    deltas = [c.choices[0].delta for c in chunks]
    content = "".join(d.content or "" for d in deltas)
    assert content.strip() == "Sure thing." and "<tool" not in content
    calls = [t for d in deltas for t in d.tool_calls or []]
    assert [t.function.name for t in calls] == ["add"] and chunks[-1].choices[0].finish_reason == "tool_calls"
    # the content went out before the call was finished, not all at the end
    assert len([d for d in deltas if d.content]) > 1


async def test_a_reply_without_calls_is_content(client):
    r = await client.chat.completions.create(model=None, messages=MESSAGES, tools=TOOLS, **forced("hello world"))
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == "hello world"
    assert not r.choices[0].message.tool_calls
