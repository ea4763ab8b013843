"""Bad input: each answered INVALID_ARGUMENT with a message that starts with the field's name,
before the request could queue or reach a worker, and the service keeps serving. (The basic
cases, e.g. temperature -1, top_p 0, max_tokens 0, out-of-vocabulary ids, an empty text or
stop string, are in test_api.py.)"""

from __future__ import annotations

import grpc
import pytest

from shared.pb.tandem.v1 import common_pb2, generate_pb2

from .cluster import make_request, start_cluster, token_ids

PROMPT = [1, *range(100, 130)]
GENERATE = "/tandem.v1.Tandem/Generate"


@pytest.fixture
async def cluster(tiny_model):
    c = await start_cluster(tiny_model)
    yield c
    await c.stop()


async def call_raw(cluster, data: bytes) -> list[generate_pb2.GenerateResponse]:
    """Generate with request bytes as they are on the wire (what a non-Python client may send)."""
    channel = grpc.aio.insecure_channel(cluster.scheduler.address)
    cluster.channels.append(channel)
    method = channel.unary_stream(
        GENERATE,
        request_serializer=lambda b: b,
        response_deserializer=generate_pb2.GenerateResponse.FromString,
    )
    return [r async for r in method(data)]


def wire(**fields) -> bytes:
    return make_request(**fields).SerializeToString()


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "fields, field_name",
    [
        (dict(temperature=NAN), "temperature"),
        (dict(temperature=INF), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=NAN), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_tokens=-1), "max_tokens"),
        (dict(max_tokens=2**31 - 1), "max_tokens"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(logprobs=21), "logprobs"),
        (dict(prompt=[]), "token_ids"),
        (dict(stop=["x"] * 17), "stop"),  # TANDEM_MAX_STOP_STRINGS is 16
        (dict(stop=["x" * 257]), "stop"),  # at most 256 characters each
    ],
)
async def test_bad_fields_are_named_and_the_service_keeps_serving(cluster, reference, fields, field_name):
    fields = {"prompt": PROMPT, **fields}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.generate(**fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field_name}:"), err.value.details()
    assert token_ids(await cluster.generate(prompt=PROMPT, max_tokens=4)) == reference(PROMPT, 4)


@pytest.mark.parametrize(
    "data, field_name, detail",
    [
        (wire(prompt="abc").replace(b"abc", b"a\xffc"), "text", "byte 0xff at offset 1"),
        (wire(prompt="abc", stop=["x", "yz"]).replace(b"yz", b"y\xc3"), "stop", "stop[1]"),
        # the logit_bias map comes before the bad regex: the check walks a map as a map
        (
            wire(prompt="abc", logit_bias={5: 1.0}, guidance=common_pb2.Guidance(regex="qq[0-9]")).replace(
                b"qq", b"q\xfe"
            ),
            "guidance",
            "regex is not valid UTF-8 (byte 0xfe at offset 1)",
        ),
        (wire(prompt="abc")[:-3], "request", "not a valid tandem.v1.GenerateRequest"),
        (b"\xff\xff\xff\xff", "request", "not a valid tandem.v1.GenerateRequest"),
    ],
    ids=["utf8-text", "utf8-stop", "utf8-after-a-map", "truncated", "garbage"],
)
async def test_undecodable_requests_are_invalid_argument_naming_the_field(cluster, data, field_name, detail):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call_raw(cluster, data)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert err.value.details().startswith(f"{field_name}:") and detail in err.value.details(), (
        err.value.details()
    )
    assert len(token_ids(await cluster.generate(prompt="abc", max_tokens=3))) == 3


async def test_unknown_fields_are_ignored(cluster, reference):
    unknown = b"\xf8\x06\x2a" + b"\x82\x07\x03xyz"  # field 111 = varint 42, field 112 = "xyz"
    sampling = common_pb2.SamplingParameters(temperature=0.0).SerializeToString() + b"\xa0\x06\x01"
    request = wire(prompt=PROMPT, max_tokens=4) + unknown + b"\x22" + bytes([len(sampling)]) + sampling
    responses = await call_raw(cluster, request)
    assert token_ids(responses) == reference(PROMPT, 4)
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
