"""A thinking model's reasoning through the OpenAI front, against in-process services and the
openai SDK: a model whose chat template writes <think> gets the reasoning returned apart from
the answer (reasoning_content on chat, a reasoning item on /v1/responses), streamed or not, also
before a tool call, with the usage counting the reasoning's tokens; structured output holds
after the reasoning, as vLLM applies it. The tiny model's vocabulary has <think> and </think> as
added tokens, as reasoning models' do; a random model writes them only when pushed, so the
requests raise their logits (logit_bias) and sample with a seed: the reasoning is random text,
and the answer is forced. A template that opens the block in the prompt (DeepSeek-R1's way)
makes an unforced reply reasoning from its first token."""

from __future__ import annotations

import shutil

import openai
import pytest

from tests.e2e.procs import free_port
from tests.helpers.models import make_thinking_checkpoint

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


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    """(checkpoint, <think> id, </think> id)"""
    return make_thinking_checkpoint(tmp_path_factory.mktemp("thinker"))


@pytest.fixture
async def client(thinker, tmp_path):
    cluster, client = await _serve(thinker[0], tmp_path, QWEN3_LIKE)
    yield client
    await cluster.wait_idle()
    await cluster.stop()


def thinking(thinker, answer: str, *, opens: bool = True, seed: int = 4) -> dict:
    """A request's arguments for a sampled reply that (the model pushed to it) opens the block
    with <think> when `opens`, reasons in random text, closes it with </think>, and then has the
    answer `answer` (a regex) forced by structured output."""
    _, start, end = thinker
    bias = {str(end): 4, **({str(start): 100} if opens else {})}
    extra = {"structured_outputs": {"regex": answer}}
    return {"extra_body": extra, "logit_bias": bias, "seed": seed, "temperature": 1.0, "max_tokens": 200}


def parts(tokens, opens: bool = True) -> tuple[str, str, int]:
    """(the reasoning, the answer, the number of reasoning tokens) a reply's tokens (its logprobs
    entries) spell: [<think>] reasoning </think> answer."""
    words = [t.token for t in tokens]
    assert (words[0] == "<think>") == opens, words
    close = words.index("</think>")

    def text(part) -> str:  # a token may hold part of a character: its bytes, joined, are the text
        return b"".join(bytes(t.bytes) for t in part).decode("utf-8", errors="replace").lstrip()

    return text(tokens[1 if opens else 0 : close]), text(tokens[close + 1 :]), close + 1


def forced(regex: str) -> dict:
    return {"extra_body": {"structured_outputs": {"regex": regex}}, "temperature": 0.0, "max_tokens": 128}


def reasoning_of(message) -> str | None:
    return (message.model_extra or {}).get("reasoning_content")


async def test_the_reasoning_comes_apart_from_the_answer(client, thinker):
    r = await client.chat.completions.create(
        model=None, messages=MESSAGES, logprobs=True, **thinking(thinker, "Four\\.")
    )
    message = r.choices[0].message
    reasoning, answer, reasoning_tokens = parts(r.choices[0].logprobs.content)
    assert reasoning and "think>" not in reasoning and answer == "Four."  # random text, then the forced answer
    assert reasoning_of(message) == reasoning and message.content == "Four." and r.choices[0].finish_reason == "stop"
    # the usage counts the reasoning's tokens: those through </think>, of more in all
    assert r.usage.completion_tokens_details.reasoning_tokens == reasoning_tokens < r.usage.completion_tokens
    # include_reasoning: false (vLLM's) leaves the reasoning out, whole and streamed; the usage still counts it
    args = dict(model=None, messages=MESSAGES, **thinking(thinker, "Four\\."))
    args["extra_body"] = {**args["extra_body"], "include_reasoning": False}
    hidden = await client.chat.completions.create(**args)
    assert reasoning_of(hidden.choices[0].message) is None and hidden.choices[0].message.content == "Four."
    assert hidden.usage.completion_tokens_details.reasoning_tokens == reasoning_tokens
    deltas = [c.choices[0].delta async for c in await client.chat.completions.create(**args, stream=True)]
    assert not any(reasoning_of(d) for d in deltas) and "".join(d.content or "" for d in deltas) == "Four."
    # a prompt that closed the block (Qwen3's enable_thinking: false): the answer from the first token
    plain = await client.chat.completions.create(
        model=None, messages=MESSAGES, logprobs=True, extra_body={
            "structured_outputs": {"regex": "Four\\."}, "chat_template_kwargs": {"enable_thinking": False}
        },
    )
    assert "".join(t.token for t in plain.choices[0].logprobs.content) == "Four."
    assert reasoning_of(plain.choices[0].message) is None and plain.choices[0].message.content == "Four."
    assert plain.usage.completion_tokens_details.reasoning_tokens == 0


async def test_a_reply_that_does_not_think_or_stops_at_the_tag(client, thinker):
    _, start, _ = thinker
    # a model that does not open the block: structured output holds from its first token
    r = await client.chat.completions.create(
        model=None, messages=MESSAGES, logit_bias={str(start): -100}, **forced("Four\\.")
    )
    assert r.choices[0].message.content == "Four." and r.choices[0].finish_reason == "stop"
    assert reasoning_of(r.choices[0].message) is None and r.usage.completion_tokens_details.reasoning_tokens == 0
    # cut right after it opened the block: thinking, with nothing to show yet
    r = await client.chat.completions.create(
        model=None, messages=MESSAGES, logit_bias={str(start): 100}, max_tokens=1
    )
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content is None
    assert r.usage.completion_tokens_details.reasoning_tokens == 1


async def test_streamed_reasoning_then_answer_equal_the_whole(client, thinker):
    args = dict(model=None, messages=MESSAGES, logprobs=True, **thinking(thinker, "It is four\\."))
    whole = await client.chat.completions.create(**args)
    stream = await client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    usage = chunks.pop().usage
    deltas = [c.choices[0].delta for c in chunks]
    thought = "".join(reasoning_of(d) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert thought == reasoning_of(whole.choices[0].message) and content == "It is four."
    assert not any("think>" in (reasoning_of(d) or "") + (d.content or "") for d in deltas)
    # the reasoning went out as it came, before the answer, not all at the end
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert len([d for d in deltas[:first_content] if reasoning_of(d)]) > 1
    assert not any(reasoning_of(d) for d in deltas[first_content:])
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in tokens] == [t.token for t in whole.choices[0].logprobs.content]
    assert usage.completion_tokens_details.reasoning_tokens == parts(tokens)[2]
    assert usage.completion_tokens == len(tokens)


async def test_reasoning_before_a_tool_call(client, thinker):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    call = r'<tool_call>\{"name": "add", "arguments": \{"a": 2\}\}</tool_call>'
    args = dict(model=None, messages=MESSAGES, tools=tools, **thinking(thinker, call))
    r = await client.chat.completions.create(**args)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and reasoning_of(choice.message)
    assert not choice.message.content and choice.message.tool_calls[0].function.name == "add"
    deltas = [c.choices[0].delta async for c in await client.chat.completions.create(**args, stream=True)]
    assert "".join(reasoning_of(d) or "" for d in deltas) == reasoning_of(choice.message)
    assert not "".join(d.content or "" for d in deltas)
    assert [t.function.name for d in deltas for t in d.tool_calls or []] == ["add"]
    # a forced call (tool_choice required) also follows the reasoning
    forced_call = await client.chat.completions.create(
        model=None, messages=MESSAGES, tools=tools, tool_choice="required",
        **{**thinking(thinker, "unused"), "extra_body": {}},
    )
    message = forced_call.choices[0].message
    assert reasoning_of(message) and message.tool_calls[0].function.name == "add"


async def test_responses_gives_a_reasoning_item(client, thinker):
    args = thinking(thinker, "Four\\.")
    fmt = {"extra_body": {**args["extra_body"], "logit_bias": args["logit_bias"], "seed": args["seed"]},
           "temperature": 1.0}
    r = await client.responses.create(input="2+2?", **fmt)
    assert [item.type for item in r.output] == ["reasoning", "message"] and r.output_text == "Four."
    chat = await client.chat.completions.create(model=None, messages=MESSAGES, **args)
    assert r.output[0].content[0].text == reasoning_of(chat.choices[0].message)
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
    assert item[1].part.type == "reasoning_text" and item[-2].part.text == r.output[0].content[0].text
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert deltas == r.output[0].content[0].text
    done = events[-1].response
    assert [item.type for item in done.output] == ["reasoning", "message"] and done.output_text == "Four."
    assert done.usage.output_tokens_details.reasoning_tokens == reasoning_tokens
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


async def test_a_prompt_that_opens_the_block_makes_the_reply_reasoning(thinker, tmp_path):
    cluster, client = await _serve(thinker[0], tmp_path, DEEPSEEK_LIKE)
    try:
        never_closes = {str(thinker[2]): -100}
        args = dict(model=None, messages=MESSAGES, temperature=0.0, max_tokens=8, logit_bias=never_closes)
        r = await client.chat.completions.create(**args)
        # a reply that does not close the block is all reasoning, cut by max_tokens
        text = reasoning_of(r.choices[0].message)
        assert r.choices[0].finish_reason == "length" and text and r.choices[0].message.content is None
        assert r.usage.completion_tokens_details.reasoning_tokens == r.usage.completion_tokens == 8
        # the same tokens, as the completions route gives them for the rendered prompt's ids
        tokens = await client.post("/../tokenize", body={"messages": MESSAGES}, cast_to=dict)
        raw = await client.completions.create(
            model=None, prompt=tokens["tokens"], temperature=0.0, max_tokens=8, logit_bias=never_closes
        )
        assert text == raw.choices[0].text.lstrip()
        # structured output holds after the reasoning, which needs no <think> of its own here
        guided = await client.chat.completions.create(
            model=None, messages=MESSAGES, logprobs=True, **thinking(thinker, "Four\\.", opens=False)
        )
        reasoning, answer, _ = parts(guided.choices[0].logprobs.content, opens=False)
        assert reasoning and answer == "Four."
        assert reasoning_of(guided.choices[0].message) == reasoning and guided.choices[0].message.content == "Four."
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
