"""The OpenAI-compatible HTTP API, driven by the real `openai` SDK against real processes
(scheduler + prefill + decode): completions and chat, streaming and not, greedy output equal to
HF transformers, seeded sampling, stop strings, logprobs, usage, a disconnect that frees every
KV block, and a 400 naming each bad field while the service keeps serving."""

from __future__ import annotations

import asyncio
import json
import re
import time

import grpc
import httpx
import jsonschema
import openai
import pydantic
import pytest

from shared.pb.tandem.v1 import worker_pb2, worker_pb2_grpc
from shared.text import Tokenizer
from tests.helpers.models import hf_greedy, hf_greedy_penalised, load_hf, make_tiny_checkpoint

from .procs import Service, free_port, serving

pytestmark = pytest.mark.slow

NUM_BLOCKS = 64
# Exercises what transformers gives a template: bos_token, raise_exception, add_generation_prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-openai"))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def stack(model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    http_port = free_port()
    common = {"TANDEM_MODEL": str(model), "TANDEM_GRACE_PERIOD_S": "5"}
    worker = {**common, "TANDEM_NUM_BLOCKS": str(NUM_BLOCKS)}
    prefill = Service("prefill", {**worker, "TANDEM_PORT": str(free_port())}, logs)
    decode = Service("decode", {**worker, "TANDEM_PORT": str(free_port())}, logs)
    scheduler = Service(
        "scheduler",
        {
            **common,
            "TANDEM_PORT": str(free_port()),
            "TANDEM_HTTP_PORT": str(http_port),
            "TANDEM_MODEL_NAME": "tiny",
            "TANDEM_DECODE_ADDRS": decode.address,
            "TANDEM_PREFILL_ADDRS": prefill.address,
            "TANDEM_HEALTH_INTERVAL_S": "0.2",
        },
        logs,
    )
    services = {"scheduler": scheduler, "prefill": prefill, "decode": decode}
    with serving(services):
        base = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/health").status_code != 200:  # the scheduler has seen its workers
            assert time.monotonic() < deadline, scheduler.log()
            time.sleep(0.2)
        yield {**services, "base": base}


@pytest.fixture(scope="module")
def client(stack):
    with openai.OpenAI(base_url=stack["base"] + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(model):
    return Tokenizer.from_dir(model)


@pytest.fixture(scope="module")
def hf(model):
    return load_hf(model)


def loads(stack) -> list[worker_pb2.WorkerLoad]:
    out = []
    for name in ("decode", "prefill"):
        with grpc.insecure_channel(stack[name].address) as channel:
            out.append(worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=5))
    return out


def wait_all_blocks_free(stack, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        current = loads(stack)
        if all(
            load.num_free_blocks == load.num_total_blocks == NUM_BLOCKS and not load.num_running
            for load in current
        ):
            return
        assert time.monotonic() < deadline, current
        time.sleep(0.1)


def test_completion_greedy_equals_transformers(client, tokenizer, hf):
    prompt = "def hello world"
    expected = tokenizer.decode(hf_greedy(hf, tokenizer.encode(prompt), 12))
    resp = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, **GREEDY)
    assert resp.choices[0].text == expected
    assert resp.choices[0].finish_reason == "length"
    assert resp.model == "tiny" and resp.object == "text_completion"
    # the same as a stream of chunks
    chunks = list(
        client.completions.create(model="tiny", prompt=prompt, max_tokens=12, stream=True, **GREEDY)
    )
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    # token ids as the prompt, and several prompts in one request
    ids = [1, *range(60, 90)]
    expected_ids = tokenizer.decode(hf_greedy(hf, ids, 10))
    resp = client.completions.create(model="tiny", prompt=[ids, ids[:20]], max_tokens=10, **GREEDY)
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.choices[0].text == expected_ids
    assert resp.choices[1].text == tokenizer.decode(hf_greedy(hf, ids[:20], 10))


def test_chat_uses_the_template_and_equals_transformers(client, model, tokenizer, hf):
    import transformers

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    hf_tok = transformers.AutoTokenizer.from_pretrained(model)
    prompt = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    expected = tokenizer.decode(hf_greedy(hf, prompt, 10))
    resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, **GREEDY)
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == expected
    assert resp.usage.prompt_tokens == len(prompt) and resp.usage.completion_tokens == 10
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_completion_tokens=10, stream=True, **GREEDY
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    # the template's raise_exception becomes a 400 naming messages
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "tool", "content": "x"}], max_tokens=4
        )
    assert e.value.body["param"] == "messages" and "unknown role tool" in e.value.body["message"]


def test_seeded_sampling_is_reproducible(client):
    kw = dict(
        model="tiny", prompt="hello world", max_tokens=16, temperature=1.0, extra_body={"ignore_eos": True}
    )
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(seed=7, stream=True, **kw))
    assert a == b == streamed
    others = {client.completions.create(seed=s, **kw).choices[0].text for s in (8, 9, 10)}
    assert others - {a}, "other seeds should give other text"
    # n choices: choice k is seed + k, so they differ and each is reproducible
    many = client.completions.create(seed=7, n=3, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].text == a and len({c.text for c in many.choices}) > 1
    assert many.choices[1].text == client.completions.create(seed=8, **kw).choices[0].text
    # n choices streamed: the chunks of each index add up to that choice
    texts = ["", "", ""]
    for chunk in client.completions.create(seed=7, n=3, stream=True, **kw):
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == [c.text for c in many.choices]


def test_sampling_filters_reach_the_engine(client, tokenizer, hf):
    """top_k=1, min_p=1 and a tiny top_p each leave only the likeliest token: greedy, even at temperature 1."""
    prompt = "hello world"
    greedy = tokenizer.decode(hf_greedy(hf, tokenizer.encode(prompt), 8))
    kw = dict(model="tiny", prompt=prompt, max_tokens=8, temperature=1.0, seed=3)
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        out = client.completions.create(extra_body={"ignore_eos": True, **extra}, **kw).choices[0].text
        assert out == greedy, extra
    assert (
        client.completions.create(top_p=1e-6, extra_body={"ignore_eos": True}, **kw).choices[0].text == greedy
    )
    # a repetition penalty changes what greedy decoding picks; a list of string prompts answers each
    penalized = (
        client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=24,
            temperature=0,
            extra_body={"ignore_eos": True, "repetition_penalty": 5.0},
        )
        .choices[0]
        .text
    )
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, **GREEDY).choices[0].text
    assert penalized != plain
    both = client.completions.create(model="tiny", prompt=[prompt, "def "], max_tokens=8, **GREEDY)
    assert both.choices[0].text == greedy
    assert both.choices[1].text == tokenizer.decode(hf_greedy(hf, tokenizer.encode("def "), 8))


def test_frequency_presence_penalties_and_logit_bias(client, tokenizer, hf):
    """OpenAI's penalties and logit bias, greedy, equal to the rule applied to HF's logits; the
    first token is sampled on the prefill worker, the rest on the decode worker."""
    prompt = "hello world"
    ids = tokenizer.encode(prompt)
    plain = hf_greedy(hf, ids, 16)
    cases = [
        dict(frequency_penalty=1.5, presence_penalty=0.5),
        dict(logit_bias={plain[0]: -100.0, plain[1]: 5.0}),  # the first token banned
    ]
    for case in cases:
        want = hf_greedy_penalised(hf, ids, 16, **case)
        assert want != plain
        body = {**case, "logit_bias": {str(t): b for t, b in case.get("logit_bias", {}).items()}}
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, **GREEDY, **body)
        assert got.choices[0].text == tokenizer.decode(want), case
    # a bias of 100 forces a token, in chat too
    forced = tokenizer.encode(" x", add_special_tokens=False)[-1]
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, logit_bias={str(forced): 100}, **GREEDY
    )
    assert chat.choices[0].message.content == tokenizer.decode([forced] * 4)


STRUCTURED_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"}},
    "required": ["name", "ok"],
    "additionalProperties": False,
}


def test_structured_output(client):
    """response_format (json_schema, json_object) and vLLM's guided_* fields: the output is in the
    language and complete (finish_reason stop); the first token is sampled on the prefill worker."""
    messages = [{"role": "user", "content": "hello"}]
    for temperature in (0.0, 1.0):
        r = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=64, temperature=temperature, seed=1,
            response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": STRUCTURED_SCHEMA}},
        )
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), STRUCTURED_SCHEMA)
    r = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=64, temperature=0, response_format={"type": "json_object"}
    )
    assert r.choices[0].message.content.startswith("{")  # any object: may not close within max_tokens
    choices = ["the dog", "hello world", "über café"]
    r = client.completions.create(model="tiny", prompt="def ", max_tokens=16, n=3, temperature=1.0, seed=3,
                                  extra_body={"guided_choice": choices})
    assert all(c.text in choices and c.finish_reason == "stop" for c in r.choices)
    r = client.completions.create(model="tiny", prompt="x", max_tokens=48, temperature=0,
                                  extra_body={"structured_outputs": {"json_object": True}})
    assert r.choices[0].text.startswith("{")
    stream = client.completions.create(model="tiny", prompt="the", max_tokens=16, temperature=1.0, stream=True,
                                       extra_body={"structured_outputs": {"regex": "(quick|lazy) [0-9]{3}"}})
    assert re.fullmatch("(quick|lazy) [0-9]{3}", "".join(c.choices[0].text for c in stream))


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "maximum": 9}}, "required": ["a"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "parameters": ADD}},
]


def test_tool_calls_with_a_named_function_or_required(client):
    """tool_choice naming a function, or "required": the output is constrained to a call, and the
    message carries it as tool_calls (finish_reason tool_calls), streamed too."""
    messages = [{"role": "user", "content": "weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice=named,
                                       max_tokens=64, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice=named,
                                                 max_tokens=64, temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant" and chunks[-1].choices[0].finish_reason == "tool_calls"
    (streamed,) = [t for d in deltas for t in d.tool_calls or []]
    assert (streamed.index, streamed.function.name) == (0, "get_weather")
    assert json.loads(streamed.function.arguments) == json.loads(call.function.arguments)  # same greedy call
    # streamed with logprobs: each token's, as the non-streamed answer has them
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice=named,
                                                 max_tokens=64, temperature=0, stream=True, logprobs=True,
                                                 stream_options={"include_usage": True}))
    streamed_lps = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert len(streamed_lps) == chunks[-1].usage.completion_tokens
    # "required" over tools whose parameters refer to their own definitions (as pydantic writes nested models)
    nested = {"type": "function", "function": {"name": "route", "parameters": {
        "type": "object", "properties": {"to": {"$ref": "#/$defs/City"}}, "required": ["to"],
        "$defs": {"City": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}}, "required": ["name"]}}}}}
    r = client.chat.completions.create(model="tiny", messages=messages, tools=[nested, TOOLS[1]], tool_choice="required",
                                       max_tokens=96, temperature=0)
    assert r.choices[0].finish_reason in ("tool_calls", "length")
    for t in r.choices[0].message.tool_calls or []:
        args = json.loads(t.function.arguments)
        assert set(args) == ({"to"} if t.function.name == "route" else {"a"})
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="required",
                                       max_tokens=96, temperature=1.0, seed=4, n=4)
    calls = [t for c in r.choices if c.finish_reason == "tool_calls" for t in c.message.tool_calls]
    assert calls  # the others ran out of max_tokens: their text comes back as content
    for t in calls:
        jsonschema.validate(json.loads(t.function.arguments), {"get_weather": WEATHER, "add": ADD}[t.function.name])


@pytest.mark.parametrize(
    "change,param",
    [
        ({"tool_choice": "auto"}, "tool_choice"),
        ({}, "tool_choice"),  # auto is the default with tools
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": "add"}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {}}], "tool_choice": "required"}, "tools[0].function.name"),
        ({"tools": [{"type": "retrieval"}], "tool_choice": "required"}, "tools[0]"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ],
)
def test_tool_requests_the_server_cannot_honour_are_400s(client, change, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "tools": TOOLS, **change}
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/chat/completions", body=body, cast_to=object)
    assert e.value.body["param"] == param, e.value.body


def test_responses_api(client):
    """POST /v1/responses through the openai SDK: the same greedy text as the chat route, streamed
    as typed events, structured output parsed by the SDK, a function call, and 400s named by the
    Responses field."""
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, **GREEDY)
    r = client.responses.create(model="tiny", instructions="be brief", input="hello", max_output_tokens=12,
                                temperature=0, extra_body={"ignore_eos": True})
    assert r.output_text == chat.choices[0].message.content
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, 12)
    with client.responses.stream(model="tiny", instructions="be brief", input="hello", max_output_tokens=12,
                                 temperature=0, extra_body={"ignore_eos": True}) as stream:
        events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"

    class Flag(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=8)
        ok: bool

    parsed = client.responses.parse(model="tiny", input="hello", text_format=Flag, max_output_tokens=64, temperature=0)
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Flag)
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]
    r = client.responses.create(model="tiny", input="weather?", tools=tools, tool_choice="required",
                                max_output_tokens=96, temperature=0)
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    for change, param in [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"max_output_tokens": 100_000}, "max_output_tokens"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.post("/responses", body={"model": "tiny", "input": "hi", **change}, cast_to=object)
        assert e.value.body["param"] == param


def test_stop_strings(client, tokenizer, hf):
    prompt = "the quick brown fox"
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, **GREEDY).choices[0].text
    # a stop string of whole printable characters from the middle of the greedy text
    start = next(
        i
        for i in range(4, len(full) - 3)
        if all(ch.isprintable() and ch != "\ufffd" for ch in full[i : i + 3])
    )
    stop = full[start : start + 3]
    cut = full[: full.index(stop)]
    resp = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=24, stop=[stop, "never-there"], **GREEDY
    )
    assert resp.choices[0].text == cut and resp.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(
            model="tiny", prompt=prompt, max_tokens=24, stop=stop, stream=True, **GREEDY
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs(client):
    resp = client.completions.create(model="tiny", prompt="hello world", max_tokens=6, logprobs=3, **GREEDY)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and logprob <= 0
        assert logprob == pytest.approx(max(top.values()))  # greedy: the sampled token is the likeliest
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        logprobs=True,
        top_logprobs=2,
        **GREEDY,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)
    text = chat.choices[0].message.content
    if "\ufffd" not in text:  # the tokens' bytes join into the text, pieces of characters included
        assert b"".join(bytes(t.bytes) for t in content) == text.encode()
    # logprobs=0: the sampled tokens' own, no alternatives
    resp = client.completions.create(model="tiny", prompt="hello world", max_tokens=3, logprobs=0, **GREEDY)
    assert (
        len(resp.choices[0].logprobs.token_logprobs) == 3
        and resp.choices[0].logprobs.top_logprobs == [None] * 3
    )


def test_echo_scores_prompts_as_lm_eval_harness_does(stack, client, tokenizer, hf):
    """lm-eval-harness's `local-completions` loglikelihood request, byte for byte: token-id
    prompts, echo, logprobs 1, max_tokens 1. Each choice returns its prompt's tokens with their
    logprobs (the first null) equal to transformers', the top-1 alternative that tells whether
    the continuation is greedy, then the generated token; the prompts are prefilled on the decode
    worker, with the prefill worker left healthy."""
    import torch

    prompts = [[1, *range(60, 90)], [1, 7, 300, 42, 9]]
    body = {"model": "tiny", "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    resp = httpx.post(stack["base"] + "/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    choices = sorted(resp.json()["choices"], key=lambda c: c["index"])
    for prompt, choice in zip(prompts, choices, strict=True):
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(prompt) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for i in range(1, len(prompt)):
            assert lp["token_logprobs"][i] == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4)
            (best,) = lp["top_logprobs"][i].values()
            # lm-eval's greedy test: the token's logprob equals the best alternative's
            assert (lp["token_logprobs"][i] == best) == (int(ref[i - 1].argmax()) == prompt[i])
        prompt_text = tokenizer.decode(prompt, skip_special_tokens=False)
        assert choice["text"] == prompt_text + tokenizer.decode(hf_greedy(hf, prompt, 1))
        assert lp["text_offset"][-1] == len(prompt_text)
    assert "prefilled without it" not in stack["scheduler"].log()
    # max_tokens 0 with echo (OpenAI's way to score a prompt alone): the prompt, no completion
    only = client.completions.create(model="tiny", prompt="def hello world", max_tokens=0, echo=True, logprobs=0)
    assert only.choices[0].text == "def hello world" and only.usage.completion_tokens == 0
    assert len(only.choices[0].logprobs.tokens) == len(tokenizer.encode("def hello world"))
    # echo without logprobs, streamed and not: the prompt, then the completion
    full = client.completions.create(model="tiny", prompt="def hello world", max_tokens=6, echo=True, **GREEDY)
    chunks = list(client.completions.create(
        model="tiny", prompt="def hello world", max_tokens=6, echo=True, stream=True, **GREEDY))
    expected = "def hello world" + tokenizer.decode(hf_greedy(hf, tokenizer.encode("def hello world"), 6))
    assert full.choices[0].text == "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[0].choices[0].text.startswith("def hello world")
    wait_all_blocks_free(stack)


def test_tokenizer_routes_as_vllm_serves_them(stack, model, tokenizer):
    """/tokenize, /detokenize and /tokenizer_info: what lm-eval-harness checks before it uses a
    server's tokenizer (tokenizer_info has eos_token; /tokenize answers a token list), the same
    ids as the scheduler's own tokenizer and, for messages, as transformers' apply_chat_template."""
    import transformers

    base = stack["base"]
    info = httpx.get(base + "/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.id_to_token(tokenizer.eos_token_ids[0])
    assert info["chat_template"] == CHAT_TEMPLATE and info["model_max_length"] == 512
    probe = httpx.post(base + "/tokenize", json={"prompt": "test", "add_special_tokens": False}).json()
    assert probe["tokens"] == tokenizer.encode("test", add_special_tokens=False)
    text = "def hello world"
    out = httpx.post(base + "/tokenize", json={"model": "tiny", "prompt": text, "return_token_strs": True}).json()
    assert out["tokens"] == tokenizer.encode(text) and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == 512 and out["token_strs"] == [tokenizer.id_to_token(t) for t in out["tokens"]]
    messages = [{"role": "user", "content": "hello world"}]
    chat = httpx.post(base + "/tokenize", json={"messages": messages}).json()
    hf_tok = transformers.AutoTokenizer.from_pretrained(model)
    expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert chat["tokens"] == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    back = httpx.post(base + "/detokenize", json={"tokens": out["tokens"]}).json()
    assert back["prompt"] == tokenizer.decode(out["tokens"], skip_special_tokens=False)
    for path, body, param in [
        ("/detokenize", {"tokens": [1, 10_000]}, "tokens"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "x" * 100_000}, "prompt"),  # far beyond the model length: refused untokenized
        ("/tokenize", {"messages": [{"role": "tool?", "content": "x"}]}, "messages"),
    ]:
        resp = httpx.post(base + path, json=body)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


def test_usage_counts_prompt_completion_and_cached_tokens(client, tokenizer):
    prompt = "the quick brown fox jumps over lazy dog " * 6  # several KV blocks
    num_prompt = len(tokenizer.encode(prompt))
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, **GREEDY).usage
    assert (first.prompt_tokens, first.completion_tokens, first.total_tokens) == (
        num_prompt,
        5,
        num_prompt + 5,
    )
    second = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, **GREEDY).usage
    assert second.prompt_tokens_details.cached_tokens >= 16  # the prefix cache served whole blocks
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.prompt_tokens == num_prompt


def test_disconnect_mid_stream_frees_every_kv_block(stack, client):
    wait_all_blocks_free(stack)
    before = generated_tokens(stack)
    stream = client.completions.create(
        model="tiny", prompt=[1, *range(40, 120)], max_tokens=400, stream=True, **GREEDY
    )
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    decode_load = loads(stack)[0]
    assert decode_load.num_running == 1 and decode_load.num_free_blocks < NUM_BLOCKS  # still generating
    stream.close()  # the client goes away mid-stream
    wait_all_blocks_free(stack)
    # a non-streaming request whose client gives up before the answer
    asyncio.run(_cancel_while_generating(stack))
    wait_all_blocks_free(stack)
    assert generated_tokens(stack) == before  # neither request ran to its end


async def _cancel_while_generating(stack) -> None:
    async with openai.AsyncOpenAI(base_url=stack["base"] + "/v1", api_key="unused", max_retries=0) as aclient:
        task = asyncio.create_task(
            aclient.completions.create(model="tiny", prompt=[1, *range(40, 120)], max_tokens=400, **GREEDY)
        )
        while not (await asyncio.to_thread(loads, stack))[0].num_running:
            assert not task.done()
            await asyncio.sleep(0.01)
        task.cancel()  # closes the connection
        with pytest.raises(asyncio.CancelledError):
            await task


def generated_tokens(stack) -> float:
    metrics = httpx.get(stack["base"] + "/metrics").text
    return sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("tandem_generation_tokens_total")
    )


BAD_COMPLETION_FIELDS = [
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -5}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 100_000}, "max_tokens"),  # past the model length
    ({"logprobs": 21}, "logprobs"),
    ({"n": 0}, "n"),
    ({"seed": -(1 << 70)}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"stop_token_ids": [10_000]}, "stop_token_ids"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, 10_000]}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"10000": 1}}, "logit_bias"),  # past the vocabulary
    ({"logit_bias": {"5": 200}}, "logit_bias"),
    ({"logit_bias": {"²": 1}}, "logit_bias"),  # a digit to isdigit(), not to int()
    ({"guided_json": '{"type": "array", "items": ' * 3000 + "{}" + "}" * 3000}, "guided_json"),
    ({"echo": True, "max_tokens": -1}, "max_tokens"),
    ({"echo": True, "logprobs": 21}, "logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
]
BAD_CHAT_FIELDS = [
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content[0]",
    ),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"include_reasoning": "no"}, "include_reasoning"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 30}, "top_logprobs"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": "x"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format"),
    ({"guided_regex": "a(b"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex"),
    ({"structured_outputs": {"regex": "a", "json": {}}}, "structured_outputs"),
]


@pytest.mark.parametrize(
    "path,change,param",
    [("/completions", c, p) for c, p in BAD_COMPLETION_FIELDS]
    + [("/chat/completions", c, p) for c, p in BAD_CHAT_FIELDS],
    ids=[f"completions-{p}-{i}" for i, (_, p) in enumerate(BAD_COMPLETION_FIELDS)]
    + [f"chat-{p}-{i}" for i, (_, p) in enumerate(BAD_CHAT_FIELDS)],
)
def test_a_bad_field_is_a_400_naming_it_and_the_service_goes_on(client, path, change, param):
    body = {"model": "tiny", "max_tokens": 4}
    body.update(
        {"prompt": "hello"} if path == "/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    )
    body.update(change)
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(openai.BadRequestError) as e:
        client.post(path, body=body, cast_to=object)
    assert e.value.status_code == 400
    error = e.value.body
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(param), error
    # the service keeps serving
    assert (
        client.completions.create(model="tiny", prompt="hello", max_tokens=2, **GREEDY).choices[0].text
        is not None
    )


def test_models_health_and_metrics(stack, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="other", prompt="hi", max_tokens=2)
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    # another server's route: a 404 in OpenAI's error shape that says which routes are here
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="tiny", input="hi")
    message = e.value.body["message"]
    assert message.startswith("POST /v1/embeddings is not served here") and "POST /v1/chat/completions" in message
    health = httpx.get(stack["base"] + "/health")
    assert health.status_code == 200 and health.json()["decode_workers"] == 1
    client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    metrics = httpx.get(stack["base"] + "/metrics").text
    ttft = [
        line for line in metrics.splitlines() if line.startswith("tandem_time_to_first_token_seconds_count")
    ]
    assert ttft and float(ttft[0].split()[-1]) > 0  # the HTTP requests went through the pipeline's metrics


def test_a_body_that_is_not_a_json_object_says_why(stack):
    url = stack["base"] + "/v1/completions"
    # curl -d without -H 'Content-Type: application/json' sends a form's content type
    form = httpx.post(url, content=b'{"prompt": "hi"}', headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 400
    assert form.json()["error"]["message"] == (
        "request body: must be a JSON object, sent with Content-Type: application/json "
        "(this one came as application/x-www-form-urlencoded)"
    )
    broken = httpx.post(url, content=b'{"prompt": "hi"', headers={"content-type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"]["message"].startswith("the body is not valid JSON: ")
    assert "JSON decode error" not in broken.json()["error"]["message"]  # the parser's reason, not a generic one
    array = httpx.post(url, json=[1, 2])
    assert array.status_code == 400 and array.json()["error"]["message"] == "request body: must be a JSON object"
