"""A thinking model's reasoning through the OpenAI front, against in-process services and the
openai SDK: a model whose chat template writes <think> gets the reasoning returned apart from
the answer (reasoning_content on chat, a reasoning item on /v1/responses), streamed or not, also
before a tool call. The replies are forced with structured output, since a random tiny model
writes no tags of its own; a template that opens the block in the prompt (DeepSeek-R1's way)
makes an unforced reply reasoning from its first token."""

from __future__ import annotations

import shutil

import openai
import pytest

from tests.e2e.procs import free_port

from .cluster import start_cluster

# Qwen3's shape: the model writes <think> itself; enable_thinking false closes an empty block
QWEN3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if tools %}Call a tool as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>\n{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# DeepSeek-R1's shape: the generation prompt opens the block
DEEPSEEK_LIKE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: <think>\n"
MESSAGES = [{"role": "user", "content": "2+2?"}]
THOUGHT = r"<think>\nI add two and two\.\n</think>\n\n"


async def _serve(tiny_model, tmp_path, template: str, **scheduler):
    model = tmp_path / "thinking-model"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").write_text(template)
    port = free_port()
    cluster = await start_cluster(model, num_prefill=0, scheduler_overrides={"http_port": port, **scheduler})
    return cluster, openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)


@pytest.fixture
async def client(tiny_model, tmp_path):
    cluster, client = await _serve(tiny_model, tmp_path, QWEN3_LIKE)
    yield client
    await cluster.wait_idle()
    await cluster.stop()


def forced(regex: str) -> dict:
    return {"extra_body": {"structured_outputs": {"regex": regex}}, "temperature": 0.0, "max_tokens": 128}


def reasoning_of(message) -> str | None:
    return (message.model_extra or {}).get("reasoning_content")


def through_the_close(tokens) -> int:
    """How many of a reply's tokens (its logprobs entries) it took to write </think>."""
    text = ""
    for n, token in enumerate(tokens, 1):
        text += token.token
        if "</think>" in text:
            return n
    raise AssertionError(f"no </think> in {text!r}")


async def test_the_reasoning_comes_apart_from_the_answer(client):
    r = await client.chat.completions.create(
        model=None, messages=MESSAGES, logprobs=True, **forced(THOUGHT + "Four\\.")
    )
    message = r.choices[0].message
    assert reasoning_of(message) == "I add two and two.\n" and message.content == "Four."
    # the usage counts the reasoning's tokens: those through </think>, of more in all
    thinking = through_the_close(r.choices[0].logprobs.content)
    assert r.usage.completion_tokens_details.reasoning_tokens == thinking < r.usage.completion_tokens
    plain = await client.chat.completions.create(model=None, messages=MESSAGES, **forced("Four\\."))
    assert reasoning_of(plain.choices[0].message) is None and plain.choices[0].message.content == "Four."
    assert plain.usage.completion_tokens_details.reasoning_tokens == 0


async def test_streamed_reasoning_then_answer_equal_the_whole(client):
    stream = await client.chat.completions.create(
        model=None, messages=MESSAGES, stream=True, logprobs=True, stream_options={"include_usage": True},
        **forced(THOUGHT + "It is four\\."),
    )
    chunks = [c async for c in stream]
    usage = chunks.pop().usage
    deltas = [c.choices[0].delta for c in chunks]
    thought = "".join(reasoning_of(d) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert thought == "I add two and two.\n" and content == "It is four."
    assert not any("think>" in (reasoning_of(d) or "") + (d.content or "") for d in deltas)
    # the reasoning went out as it came, before the answer, not all at the end
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert len([d for d in deltas[:first_content] if reasoning_of(d)]) > 1
    assert not any(reasoning_of(d) for d in deltas[first_content:])
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert "".join(t.token for t in tokens) == "<think>\nI add two and two.\n</think>\n\nIt is four."
    assert usage.completion_tokens_details.reasoning_tokens == through_the_close(tokens)
    assert usage.completion_tokens == len(tokens)


async def test_reasoning_before_a_tool_call(client):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    call = r'<tool_call>\{"name": "add", "arguments": \{"a": 2\}\}</tool_call>'
    r = await client.chat.completions.create(model=None, messages=MESSAGES, tools=tools, **forced(THOUGHT + call))
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and reasoning_of(choice.message) == "I add two and two.\n"
    assert not choice.message.content and choice.message.tool_calls[0].function.name == "add"
    stream = await client.chat.completions.create(
        model=None, messages=MESSAGES, tools=tools, stream=True, **forced(THOUGHT + call)
    )
    deltas = [c.choices[0].delta async for c in stream]
    assert "".join(reasoning_of(d) or "" for d in deltas) == "I add two and two.\n"
    assert not "".join(d.content or "" for d in deltas)
    assert [t.function.name for d in deltas for t in d.tool_calls or []] == ["add"]


async def test_responses_gives_a_reasoning_item(client):
    fmt = {"extra_body": {"structured_outputs": {"regex": THOUGHT + "Four\\."}}, "temperature": 0.0}
    r = await client.responses.create(input="2+2?", **fmt)
    assert [item.type for item in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "I add two and two.\n" and r.output_text == "Four."
    chat = await client.chat.completions.create(model=None, messages=MESSAGES, **forced(THOUGHT + "Four\\."))
    reasoning_tokens = chat.usage.completion_tokens_details.reasoning_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == reasoning_tokens > 0
    events = [e async for e in await client.responses.create(input="2+2?", stream=True, **fmt)]
    kinds = [e.type for e in events]
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    # the reasoning item's events, in the order OpenAI sends a message's, with its reasoning_text part
    rid = next(e.item.id for e in events if e.type == "response.output_item.added")
    item = [e for e in events if rid in (getattr(e, "item_id", None), getattr(getattr(e, "item", None), "id", None))]
    assert [e.type for e in item][:2] == ["response.output_item.added", "response.content_part.added"]
    assert [e.type for e in item][-3:] == [
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done"
    ]
    assert item[1].part.type == "reasoning_text" and item[-2].part.text == "I add two and two.\n"
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert deltas == "I add two and two.\n"
    done = events[-1].response
    assert [item.type for item in done.output] == ["reasoning", "message"] and done.output_text == "Four."
    # the reasoning item sent back as input is taken (and given to the template with the turn)
    again = await client.responses.create(
        input=[{"role": "user", "content": "2+2?"}, *[item.model_dump() for item in r.output],
               {"role": "user", "content": "and 3+3?"}],
        **fmt,
    )
    assert again.output_text == "Four."


async def test_the_parser_can_be_turned_off(tiny_model, tmp_path):
    cluster, client = await _serve(tiny_model, tmp_path, QWEN3_LIKE, reasoning_parser="none")
    try:
        r = await client.chat.completions.create(model=None, messages=MESSAGES, **forced(THOUGHT + "Four\\."))
        assert reasoning_of(r.choices[0].message) is None
        assert r.choices[0].message.content == "<think>\nI add two and two.\n</think>\n\nFour."
    finally:
        await cluster.wait_idle()
        await cluster.stop()


async def test_a_prompt_that_opens_the_block_makes_the_reply_reasoning(tiny_model, tmp_path):
    cluster, client = await _serve(tiny_model, tmp_path, DEEPSEEK_LIKE)
    try:
        args = dict(model=None, messages=MESSAGES, temperature=0.0, max_tokens=8)
        r = await client.chat.completions.create(**args)
        # a random model never closes the block: the whole reply is reasoning, cut by max_tokens
        text = reasoning_of(r.choices[0].message)
        assert r.choices[0].finish_reason == "length" and text and r.choices[0].message.content is None
        assert r.usage.completion_tokens_details.reasoning_tokens == r.usage.completion_tokens == 8
        # the same tokens, as the completions route gives them for the rendered prompt's ids
        tokens = await client.post("/../tokenize", body={"messages": MESSAGES}, cast_to=dict)
        raw = await client.completions.create(model=None, prompt=tokens["tokens"], temperature=0.0, max_tokens=8)
        assert text == raw.choices[0].text.lstrip()
    finally:
        await cluster.wait_idle()
        await cluster.stop()


async def test_a_think_tag_the_user_quotes_opens_nothing(tiny_model, tmp_path):
    plain = DEEPSEEK_LIKE.replace("<think>\n", "\n")
    cluster, client = await _serve(tiny_model, tmp_path, plain, reasoning_parser="think")
    try:
        messages = [{"role": "user", "content": "What does <think> mean?"}]
        r = await client.chat.completions.create(model=None, messages=messages, temperature=0.0, max_tokens=8)
        assert reasoning_of(r.choices[0].message) is None and r.choices[0].message.content
        assert r.usage.completion_tokens_details.reasoning_tokens == 0
    finally:
        await cluster.wait_idle()
        await cluster.stop()
