"""Property: whatever a client sends to Generate (fields in and out of range, NaN, huge and
negative numbers, odd text, bytes that are not a valid request at all), the answer is either a
clean completion or a clean status naming what was wrong, and the service keeps serving.

The cluster runs in its own event loop on a background thread; hypothesis drives a plain
synchronous gRPC client against it."""

from __future__ import annotations

import asyncio
import os
import threading

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.pb.tandem.v1 import common_pb2, generate_pb2, generate_pb2_grpc
from tests.helpers.tokenizers import VOCAB_SIZE

from .cluster import start_cluster

GENERATE = "/tandem.v1.Tandem/Generate"
# Fields a refusal may name (the message starts with "<field>:").
FIELDS = {
    "prompt", "text", "token_ids", "request", "request_id", "stop", "stop_token_ids", "max_tokens",
    "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "logprobs", "seed_offset",
    "num_speculative_tokens", "presence_penalty", "frequency_penalty", "logit_bias", "guidance",
}  # fmt: skip
CLEAN_REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def served(tiny_model):
    """(address, cluster, loop): a cluster serving from a background thread's event loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    cluster = asyncio.run_coroutine_threadsafe(start_cluster(tiny_model), loop).result(60)
    try:
        yield cluster.scheduler.address, cluster, loop
    finally:
        asyncio.run_coroutine_threadsafe(cluster.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


def sometimes_bad(draw, good, bad):
    """Mostly a valid value, one time in sixteen an invalid one: about half the requests are
    valid all through and complete, the others have one or two bad fields."""
    return draw(bad if draw(st.sampled_from([False] * 15 + [True])) else good)


@st.composite
def requests(draw) -> generate_pb2.GenerateRequest:
    req = generate_pb2.GenerateRequest(priority=draw(st.integers(-(2**31), 2**31 - 1)))
    req.request_id = sometimes_bad(
        draw, st.text("abcdef0123456789-", max_size=12), st.text(max_size=8) | st.just("x" * 129)
    )
    prompt = sometimes_bad(
        draw,
        st.text(min_size=1, max_size=40) | st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=40),
        st.none() | st.just("") | st.lists(st.integers(0, VOCAB_SIZE + 5), max_size=40),
    )
    if isinstance(prompt, str):
        req.text = prompt
    elif isinstance(prompt, list):
        req.token_ids.ids.extend(prompt)
    s = req.sampling
    for name, good in [
        ("temperature", st.sampled_from([0.0, 0.7, 1.0]) | st.floats(0, 2)),
        ("top_p", st.floats(0.05, 1.0)),
        ("repetition_penalty", st.floats(0.5, 2.0)),
    ]:
        value = sometimes_bad(draw, st.none() | good, floats32)
        if value is not None:
            setattr(s, name, value)
    s.min_p = sometimes_bad(draw, st.just(0.0) | st.floats(0, 0.3), floats32)
    s.top_k = sometimes_bad(
        draw, st.integers(0, 50), st.integers(-(2**31), -1) | st.integers(VOCAB_SIZE, 2**31 - 1)
    )
    s.logprobs = sometimes_bad(draw, st.integers(0, 5), st.integers(21, 2**32 - 1))
    s.presence_penalty = sometimes_bad(draw, st.just(0.0) | st.floats(-2, 2), floats32)
    s.frequency_penalty = sometimes_bad(draw, st.just(0.0) | st.floats(-2, 2), floats32)
    for token in draw(st.lists(st.integers(0, VOCAB_SIZE + 3), max_size=2)):  # a few past the vocabulary
        s.logit_bias[token] = sometimes_bad(draw, st.floats(-100, 100), floats32)
    if draw(st.integers(0, 7)) == 0:  # structured output, one request in eight
        kind, text = sometimes_bad(
            draw,
            st.sampled_from([("regex", "[a-z]{1,4}"), ("json_object", ""), ("json_schema", '{"type": "integer"}')]),
            st.sampled_from([("regex", "(a"), ("json_schema", "{"), ("json_schema", "[]"), ("lark", "start: ")]),
        )
        if kind == "json_object":
            s.guidance.json_object = True
        else:
            setattr(s.guidance, kind, text)
        if draw(st.booleans()):  # after a reasoning block, as the chat route asks it of a thinking model
            s.guidance.reasoning_start, s.guidance.reasoning_end = sometimes_bad(
                draw,
                st.sampled_from([("<think>", "</think>"), ("", "</think>")]),
                st.sampled_from([("<think>", ""), ("", "x" * 65)]),
            )
    s.seed_offset = draw(st.integers(0, 50))
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, 2**64 - 1))
    if draw(st.booleans()):
        s.num_speculative_tokens = sometimes_bad(draw, st.integers(0, 4), st.integers(17, 40))
    t = req.stopping
    max_tokens = sometimes_bad(
        draw, st.none() | st.integers(1, 12), st.integers(-(2**31), 0) | st.sampled_from([600, 2**31 - 1])
    )
    if max_tokens is not None:
        t.max_tokens = max_tokens
    t.stop.extend(
        sometimes_bad(
            draw,
            st.lists(st.text(min_size=1, max_size=6), max_size=3),
            st.just([""]) | st.just(["x"] * 17) | st.just(["y" * 300]),
        )
    )
    t.stop_token_ids.extend(
        sometimes_bad(draw, st.lists(st.integers(0, VOCAB_SIZE - 1), max_size=2), st.just([VOCAB_SIZE]))
    )
    t.ignore_eos = draw(st.booleans())
    return req


@st.composite
def wire_bytes(draw) -> bytes:
    """A request's bytes as the client library sends them, or (one time in four) mangled: a
    flipped byte, cut short, junk appended, or junk alone."""
    data = draw(requests()).SerializeToString()
    how = draw(st.sampled_from(["as is"] * 12 + ["flip", "truncate", "append", "junk"]))
    if how == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    elif how == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "append":
        data += draw(st.binary(max_size=12))
    elif how == "junk":
        data = draw(st.binary(max_size=40))
    return data


def check_answer(stub_call, request_bytes: bytes) -> None:
    try:
        responses = list(stub_call(request_bytes, timeout=30))
    except grpc.RpcError as e:
        assert e.code() in CLEAN_REFUSALS, (e.code(), e.details())
        if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
            field = e.details().split(":", 1)[0].split("[", 1)[0]
            assert field in FIELDS, e.details()
        return
    assert responses, "a completion has at least its final response"
    request = generate_pb2.GenerateRequest.FromString(request_bytes)  # it completed: it parses
    max_tokens = request.stopping.max_tokens if request.stopping.HasField("max_tokens") else 16
    last = responses[-1]
    assert last.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    assert all(r.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    tokens = [t for r in responses for t in r.token_ids]
    assert all(0 <= t < VOCAB_SIZE for t in tokens)
    assert last.usage.completion_tokens == len(tokens) <= max_tokens
    assert len({r.request_id for r in responses}) == 1


def test_every_answer_is_a_clean_result_or_a_clean_status(served):
    address, cluster, loop = served
    with grpc.insecure_channel(address) as channel:
        raw = channel.unary_stream(
            GENERATE,
            request_serializer=lambda b: b,
            response_deserializer=generate_pb2.GenerateResponse.FromString,
        )

        @settings(
            max_examples=int(os.environ.get("TANDEM_FUZZ_EXAMPLES", "80")),
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        @given(wire_bytes())
        def answer_is_clean(data):
            check_answer(raw, data)

        answer_is_clean()
        # still serving, and nothing left behind on any worker
        stub = generate_pb2_grpc.TandemStub(channel)
        ok = generate_pb2.GenerateRequest(text="hello", stopping=common_pb2.StoppingCriteria(max_tokens=3))
        assert list(stub.Generate(ok, timeout=30))[-1].usage.completion_tokens == 3
    asyncio.run_coroutine_threadsafe(cluster.wait_idle(), loop).result(30)
