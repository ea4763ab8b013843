"""The public API's behaviour around generation: stop strings, errors, cancellation, info."""

from __future__ import annotations

import asyncio
import re
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.decode.app import DecodeApp
from shared.pb.tandem.v1 import common_pb2, generate_pb2, worker_pb2, worker_pb2_grpc

from .cluster import make_request, start_cluster, text_of, token_ids, worker_config

PROMPT = [1, *range(100, 130)]


async def read_all(call) -> list:
    out = []
    while (r := await call.read()) is not grpc.aio.EOF:
        out.append(r)
    return out


@pytest.fixture
async def cluster(tiny_model):
    c = await start_cluster(tiny_model)
    yield c
    await c.stop()


async def test_text_prompt_streams_text_deltas(cluster, reference):
    responses = await cluster.generate(prompt="the quick brown fox", max_tokens=10)
    tokenizer = cluster.scheduler.tokenizer
    ids = tokenizer.encode("the quick brown fox")
    assert token_ids(responses) == reference(ids, 10)
    assert text_of(responses) == tokenizer.decode(token_ids(responses))
    assert all(r.request_id == responses[0].request_id != "" for r in responses)


async def test_stop_string_cuts_text_and_frees_blocks(cluster):
    full = text_of(await cluster.generate(prompt=PROMPT, max_tokens=24))
    assert len(full) > 12
    stop = full[8:11]
    expected = full[: full.index(stop)]
    responses = await cluster.generate(prompt=PROMPT, max_tokens=24, stop=[stop])
    assert text_of(responses) == expected
    last = responses[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP and last.finish_message == f"stop string {stop!r}"
    assert 0 < last.usage.completion_tokens < 24
    await cluster.wait_idle()  # the decode worker aborted the request when the scheduler hung up


@pytest.mark.parametrize(
    "fields, field_name",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=600), "max_tokens"),  # prompt + max_tokens beyond the model length
        (dict(prompt=[1] * 600, max_tokens=1), "prompt: prompt (600 tokens) exceeds the model length 512"),
        (dict(prompt=[1, 2, 100000]), "token_ids"),
        (dict(prompt=""), "text"),
        (dict(stop=[""]), "stop"),
        (dict(prompt_logprobs=21), "prompt_logprobs"),
        (dict(frequency_penalty=3.0), "frequency_penalty"),
        (dict(logit_bias={100000: 1.0}), "logit_bias"),
        (dict(guidance=common_pb2.Guidance(regex="a(b")), "guidance: invalid regex"),
        (dict(guidance=common_pb2.Guidance()), "guidance: kind must be one of"),
    ],
)
async def test_invalid_arguments_are_named_and_the_server_keeps_serving(
    cluster, reference, fields, field_name
):
    fields = {"prompt": PROMPT, **fields}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.generate(**fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field_name), err.value.details()
    assert token_ids(await cluster.generate(prompt=PROMPT, max_tokens=4)) == reference(PROMPT, 4)
    await cluster.wait_idle()


async def test_structured_output_through_prefill_and_decode(cluster):
    """A guided request's first token is sampled on the prefill worker, the rest on the decode
    worker, each under the mask; the text is complete and in the language."""
    guidance = common_pb2.Guidance(regex="(quick|lazy) (fox|dog)[0-9]{2}")
    decode = cluster.decodes[0].aengine.engine
    add_prefilled, prefilled = decode.add_prefilled, []
    decode.add_prefilled = lambda rid, *a, **kw: prefilled.append(rid) or add_prefilled(rid, *a, **kw)
    for temperature in (0.0, 1.0):
        responses = await cluster.generate(
            prompt="the quick brown fox", max_tokens=32, temperature=temperature, ignore_eos=False, guidance=guidance
        )
        assert re.fullmatch("(quick|lazy) (fox|dog)[0-9]{2}", text_of(responses))
        assert responses[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert len(prefilled) == 2  # both were prefilled on the prefill worker
    await cluster.wait_idle()


async def test_missing_prompt_is_invalid(cluster):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.stub.Generate(generate_pb2.GenerateRequest()).read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in err.value.details()


async def test_client_cancel_frees_blocks_on_both_workers(cluster):
    call = cluster.stub.Generate(make_request(prompt=PROMPT, max_tokens=400))
    await call.read()
    await call.read()
    load = await cluster.load(cluster.decodes[0])
    assert load.num_running == 1
    call.cancel()
    await cluster.wait_idle()


async def test_out_of_kv_blocks_is_resource_exhausted(tiny_model):
    # 24 blocks of 16 tokens: a running 300-token request leaves too few for a 100-token prompt.
    # It generates 80 tokens, so it still holds its blocks when the second request arrives.
    c = await start_cluster(tiny_model, decode_overrides={"num_blocks": 24})
    try:
        hog = c.stub.Generate(make_request(prompt=[1, *range(3, 302)], max_tokens=80))
        await hog.read()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.generate(prompt=[1, *range(200, 299)], max_tokens=4)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        rest = await read_all(hog)
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        await c.wait_idle()
    finally:
        await c.stop()


async def test_no_decode_worker_is_unavailable(tiny_model):
    c = await start_cluster(tiny_model, num_decode=0, num_prefill=0)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.generate(prompt=PROMPT)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await c.stop()


async def test_model_info_lists_workers(cluster):
    info = await cluster.stub.GetModelInfo(generate_pb2.GetModelInfoRequest())
    assert info.model_name == cluster.decodes[0].model_name
    assert info.max_model_len == 512 and info.engine == "torch" and info.vocab_size > 0
    assert sorted((w.role, w.healthy) for w in info.workers) == [("decode", True), ("prefill", True)]


async def test_health_and_reflection_on_every_server(cluster):
    for app, service in [
        (cluster.scheduler, "tandem.v1.Tandem"),
        (cluster.decodes[0], "tandem.v1.Decode"),
        (cluster.prefills[0], "tandem.v1.Prefill"),
    ]:
        channel = grpc.aio.insecure_channel(app.address)
        cluster.channels.append(channel)
        for name in ("", service):
            resp = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=name)
            )
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = {s.name async for r in stream for s in r.list_services_response.service}
        assert {service, "grpc.health.v1.Health"} <= services
        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=service)])
        )
        assert [len(r.file_descriptor_response.file_descriptor_proto) async for r in stream][0] >= 1


async def test_workers_register_themselves(tiny_model, reference):
    c = await start_cluster(tiny_model, num_decode=0, num_prefill=0)
    decode = DecodeApp(worker_config(tiny_model, "decode", scheduler_addr=c.scheduler.address))
    c.decodes.append(decode)
    try:
        await decode.start()
        await c.scheduler.pool.wait_ready("decode", timeout_s=10)
        assert c.scheduler.pool.workers[decode.address].registered
        assert token_ids(await c.generate(prompt=PROMPT, max_tokens=4)) == reference(PROMPT, 4)
    finally:
        await c.stop()


async def test_unhealthy_decode_worker_is_skipped(tiny_model, reference):
    c = await start_cluster(tiny_model, num_decode=2)
    try:
        down = c.decodes.pop(0)
        await down.stop(0)
        for _ in range(3):  # the first may hit the stopped worker and fail over
            assert token_ids(await c.generate(prompt=PROMPT, max_tokens=4)) == reference(PROMPT, 4)
        assert not c.scheduler.pool.workers[down.address].healthy
    finally:
        await c.stop()


async def test_prefill_worker_down_falls_back_to_local_prefill(tiny_model, reference):
    c = await start_cluster(tiny_model, scheduler_overrides={"health_interval_s": 30})
    try:
        down = c.prefills.pop(0)
        await down.stop(0)
        # the scheduler still believes the prefill worker healthy: the decode worker falls back
        assert token_ids(await c.generate(prompt=PROMPT, max_tokens=4)) == reference(PROMPT, 4)
        assert c.decodes[0].worker.num_local_prefills == 1
        await c.wait_idle()
    finally:
        await c.stop()


async def test_concurrent_requests_all_match(cluster, reference):
    prompts = [[1, *range(10 + i, 40 + 3 * i)] for i in range(6)]
    results = await asyncio.gather(*(cluster.generate(prompt=p, max_tokens=10) for p in prompts))
    for p, responses in zip(prompts, results, strict=True):
        assert token_ids(responses) == reference(p, 10)
    await cluster.wait_idle()


async def test_worker_info(cluster):
    stub = worker_pb2_grpc.WorkerStub(cluster._channel(cluster.decodes[0].address))
    info = await stub.GetInfo(worker_pb2.GetInfoRequest())
    assert (info.role, info.num_layers, info.block_size) == ("decode", 2, 16)


async def test_cancel_during_the_kv_transfer_frees_blocks_on_both_workers(tiny_model):
    c = await start_cluster(tiny_model)
    prefill_engine = c.prefills[0].aengine.engine
    export_kv = prefill_engine.export_kv
    exporting = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_export(request_id):  # runs on the prefill engine thread
        loop.call_soon_threadsafe(exporting.set)
        time.sleep(0.5)
        return export_kv(request_id)

    prefill_engine.export_kv = slow_export
    try:
        call = c.stub.Generate(make_request(prompt=PROMPT, max_tokens=8))
        await exporting.wait()  # the decode worker holds its reservation, the prefill worker its blocks
        load = await c.load(c.decodes[0])
        assert load.num_free_blocks < load.num_total_blocks
        call.cancel()
        await c.wait_idle()
    finally:
        await c.stop()


async def test_deadline_is_enforced(cluster):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        [r async for r in cluster.stub.Generate(make_request(prompt=PROMPT, max_tokens=400), timeout=0.3)]
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await cluster.wait_idle()


async def test_model_info_shows_the_load_as_it_is_now(tiny_model):
    # a health interval longer than the test: only a check made for GetModelInfo can see the changes
    cluster = await start_cluster(tiny_model, scheduler_overrides=dict(health_interval_s=60.0))
    try:
        stub = cluster.stub

        async def decode_running() -> int:
            info = await stub.GetModelInfo(generate_pb2.GetModelInfoRequest())
            (decode,) = [w for w in info.workers if w.role == "decode"]
            assert decode.healthy
            return decode.num_running

        call = stub.Generate(make_request(prompt=PROMPT, max_tokens=400))
        await call.read()
        await call.read()
        assert await decode_running() == 1
        call.cancel()
        await cluster.wait_idle()
        assert await decode_running() == 0
    finally:
        await cluster.stop()


async def test_rejected_and_cancelled_requests_are_logged(cluster):
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        bad = make_request(prompt=PROMPT, max_tokens=0)
        bad.request_id = "bad-one"
        with pytest.raises(grpc.aio.AioRpcError):
            await read_all(cluster.stub.Generate(bad))
        long = make_request(prompt=PROMPT, max_tokens=400)
        long.request_id = "gone"
        call = cluster.stub.Generate(long)
        await call.read()
        await call.read()
        call.cancel()
        await cluster.wait_idle()
    # (the request id of a running request is bound to every line by bind_request_id, which
    # capture_logs does not apply)
    events = {e["event"]: e for e in logs}
    rejected = events["request rejected"]
    assert rejected["request_id"] == "bad-one" and rejected["code"] == "INVALID_ARGUMENT"
    assert rejected["reason"].startswith("max_tokens")
    assert events["request cancelled"]["phase"] == "running"
