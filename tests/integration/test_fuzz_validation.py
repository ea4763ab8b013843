"""The scheduler validates requests itself (it never loads the engine) so that a bad request is
refused before it waits in the admission queue. Property: for any prompt ids, sampling and
stopping parameters a client can send, the scheduler's checks (the ones `Frontend.prepare`
runs) refuse exactly what a real engine's `validate_request` refuses, naming the same field:
token range, prompt length and prompt + max_tokens against the model length included."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.convert import sampling_from_pb
from services.common.errors import InvalidArgument
from services.scheduler.validation import check_options, check_prompt_ids
from shared.engine import EngineConfig, InvalidRequest, LLMEngine
from shared.pb.tandem.v1 import common_pb2, generate_pb2

MAX_MODEL_LEN = 64
# the field a client sent (token_ids) is what the engine calls prompt_token_ids
SAME_FIELD = {"token_ids": "prompt_token_ids"}

floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
edges = st.sampled_from([0.0, -0.0, 1.0, 1e-45, -1e-45, 0.9999999, 1.0000001, 20.0])


@pytest.fixture(scope="module")
def engine(tiny_model):
    return LLMEngine(
        EngineConfig(model=str(tiny_model), num_blocks=8, block_size=16, max_model_len=MAX_MODEL_LEN)
    )


@st.composite
def requests(draw, vocab: int):
    s = common_pb2.SamplingParameters()
    for name in ("temperature", "top_p", "repetition_penalty"):
        value = draw(st.none() | floats32 | edges)
        if value is not None:
            setattr(s, name, value)
    s.min_p = draw(floats32 | edges)
    s.presence_penalty = draw(floats32 | edges | st.sampled_from([2.0, -2.0, 2.0000002]))
    s.frequency_penalty = draw(floats32 | edges | st.sampled_from([2.0, -2.0, -2.0000002]))
    for token in draw(st.lists(st.integers(0, 2**32 - 1) | st.integers(vocab - 2, vocab + 1), max_size=3)):
        s.logit_bias[token] = draw(floats32 | st.sampled_from([100.0, -100.0, 100.00001]))
    s.top_k = draw(st.integers(-(2**31), 2**31 - 1) | st.integers(-2, 2))
    s.logprobs = draw(st.integers(0, 2**32 - 1) | st.integers(18, 22))
    s.seed_offset = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        s.prompt_logprobs = draw(st.integers(0, 2**32 - 1) | st.integers(18, 22))
    if draw(st.booleans()):
        s.num_speculative_tokens = draw(st.integers(0, 2**32 - 1) | st.integers(14, 18))
    t = common_pb2.StoppingCriteria()
    if draw(st.booleans()):  # unset: the scheduler's default max_tokens
        t.max_tokens = draw(st.integers(-(2**31), 2**31 - 1) | st.integers(-1, MAX_MODEL_LEN + 1))
    t.stop_token_ids.extend(
        draw(st.lists(st.integers(0, 2**32 - 1) | st.integers(vocab - 2, vocab + 1), max_size=3))
    )
    ids = st.integers(0, vocab - 1) | st.integers(vocab - 1, vocab + 1) | st.integers(0, 2**32 - 1)
    length = st.integers(0, 4) | st.integers(MAX_MODEL_LEN - 20, MAX_MODEL_LEN + 2)
    prompt = draw(length.flatmap(lambda n: st.lists(ids, min_size=n, max_size=n)))
    req = generate_pb2.GenerateRequest(sampling=s, stopping=t)
    req.token_ids.ids.extend(prompt)
    return req


def scheduler_verdict(req: generate_pb2.GenerateRequest, vocab: int) -> str | None:
    try:
        prompt = list(req.token_ids.ids)
        check_prompt_ids(prompt, vocab, MAX_MODEL_LEN, field="token_ids")
        check_options(
            req,
            len(prompt),
            vocab_size=vocab,
            max_model_len=MAX_MODEL_LEN,
            default_max_tokens=16,
            max_stop_strings=4,
        )
    except InvalidArgument as e:
        return SAME_FIELD.get(e.field, e.field)
    return None


def engine_verdict(engine: LLMEngine, req: generate_pb2.GenerateRequest) -> str | None:
    stopping = common_pb2.StoppingCriteria()
    stopping.CopyFrom(req.stopping)
    if not stopping.HasField("max_tokens"):
        stopping.max_tokens = 16
    try:
        engine.validate_request(list(req.token_ids.ids), sampling_from_pb(req.sampling, stopping))
    except InvalidRequest as e:
        return e.field
    return None


@settings(max_examples=int(os.environ.get("TANDEM_FUZZ_EXAMPLES", "300")), deadline=None, database=None)
@given(data=st.data())
def test_scheduler_refuses_exactly_what_the_engine_refuses(engine, data):
    vocab = engine.model_config.vocab_size
    req = data.draw(requests(vocab))
    assert scheduler_verdict(req, vocab) == engine_verdict(engine, req), req


@pytest.mark.parametrize(
    "prompt_len,max_tokens,field",
    [
        (MAX_MODEL_LEN, 1, "prompt"),
        (MAX_MODEL_LEN - 1, 1, None),
        (MAX_MODEL_LEN - 1, 2, "max_tokens"),
        (0, 1, "prompt_token_ids"),
    ],
)
def test_model_length_edges(engine, prompt_len, max_tokens, field):
    req = generate_pb2.GenerateRequest(stopping=common_pb2.StoppingCriteria(max_tokens=max_tokens))
    req.token_ids.ids.extend([5] * prompt_len)
    assert scheduler_verdict(req, engine.model_config.vocab_size) == engine_verdict(engine, req) == field


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty", "min_p"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_refused_by_both(engine, field, value):
    req = generate_pb2.GenerateRequest(stopping=common_pb2.StoppingCriteria(max_tokens=4))
    req.token_ids.ids.extend([5, 6])
    setattr(req.sampling, field, value)
    assert scheduler_verdict(req, engine.model_config.vocab_size) == engine_verdict(engine, req) == field
