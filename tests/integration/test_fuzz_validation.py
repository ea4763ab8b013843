"""The scheduler checks sampling parameters itself (it never loads the engine) so that a bad
request is refused before it waits in the admission queue. Property: it refuses exactly what
the engine refuses, naming the same field, for any parameters a client can send."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.convert import sampling_from_pb
from services.common.errors import InvalidArgument
from services.scheduler.validation import check_sampling
from shared.engine import InvalidRequest
from shared.pb.tandem.v1 import common_pb2

VOCAB = 400
floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
edges = st.sampled_from([0.0, -0.0, 1.0, 1e-45, -1e-45, 0.9999999, 1.0000001, 20.0])


@st.composite
def parameters(draw):
    s = common_pb2.SamplingParameters()
    for name in ("temperature", "top_p", "repetition_penalty"):
        value = draw(st.none() | floats32 | edges)
        if value is not None:
            setattr(s, name, value)
    s.min_p = draw(floats32 | edges)
    s.top_k = draw(st.integers(-(2**31), 2**31 - 1) | st.integers(-2, 2))
    s.logprobs = draw(st.integers(0, 2**32 - 1) | st.integers(18, 22))
    s.seed_offset = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        s.num_speculative_tokens = draw(st.integers(0, 2**32 - 1) | st.integers(14, 18))
    t = common_pb2.StoppingCriteria(max_tokens=draw(st.integers(-(2**31), 2**31 - 1) | st.integers(-1, 2)))
    t.stop_token_ids.extend(
        draw(st.lists(st.integers(0, 2**32 - 1) | st.integers(VOCAB - 2, VOCAB + 1), max_size=3))
    )
    return s, t


def scheduler_verdict(s, t) -> str | None:
    try:
        check_sampling(s, t, VOCAB)
    except InvalidArgument as e:
        return e.field
    return None


def engine_verdict(s, t) -> str | None:
    try:
        sampling_from_pb(s, t).validate(VOCAB)
    except InvalidRequest as e:
        return e.field
    return None


@settings(max_examples=250, deadline=None, database=None)
@given(parameters())
def test_scheduler_refuses_exactly_what_the_engine_refuses(params):
    s, t = params
    assert scheduler_verdict(s, t) == engine_verdict(s, t), (s, t)


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty", "min_p"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_refused_by_both(field, value):
    s, t = common_pb2.SamplingParameters(), common_pb2.StoppingCriteria(max_tokens=4)
    setattr(s, field, value)
    assert scheduler_verdict(s, t) == engine_verdict(s, t) == field
