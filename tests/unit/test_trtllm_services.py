"""TANDEM_ENGINE=trtllm through the real services, in process: scheduler, prefill and decode
workers (gRPC on loopback) whose engines are the TensorRT-LLM adapter over the fake LLM API.

The prefill worker answers Prefill with `PrefillResult.engine_handoff` (no KV in the stream);
the decode worker turns it into a generation_only request; a client's Generate gets the
tokens a single engine would produce; cancelling frees the blocks on both workers."""

from __future__ import annotations

import asyncio
import functools
import json
from concurrent import futures

import grpc
import pytest

from services.decode.app import DecodeApp
from services.decode.handoff import EngineHandoff
from services.decode.trtllm_draft import GrpcDraftClient
from services.prefill.app import PrefillApp
from services.scheduler.app import SchedulerApp
from shared.config import SchedulerConfig, WorkerConfig, from_env
from shared.engines.trtllm import DraftAsk, TrtllmApi, TrtllmEngine, TrtllmSettings, read_model_info
from shared.pb.tandem.v1 import (
    common_pb2,
    draft_pb2,
    draft_pb2_grpc,
    generate_pb2,
    generate_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.fakes import fake_tensorrt_llm as fake
from tests.helpers.tokenizers import EOS_ID, VOCAB_SIZE, make_tokenizer_dir

API = TrtllmApi.from_namespace(fake)
PROMPT = [1, *range(50, 90)]


@pytest.fixture
def model_dir(tmp_path):
    make_tokenizer_dir(tmp_path)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "eos_token_id": EOS_ID,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def worker(model_dir, role: str) -> tuple[WorkerConfig, TrtllmEngine]:
    config = from_env(
        WorkerConfig,
        env={},
        overrides=dict(
            model=str(model_dir),
            role=role,
            engine="trtllm",
            host="127.0.0.1",
            port=0,
            block_size=16,
            grace_period_s=0.2,
            dtype="bfloat16",
        ),
    )
    engine = TrtllmEngine.build(
        TrtllmSettings.from_worker_config(config), read_model_info(config.model), api=API
    )
    return config, engine


@pytest.fixture
async def cluster(model_dir):
    prefill_config, prefill_engine = worker(model_dir, "prefill")
    decode_config, decode_engine = worker(model_dir, "decode")
    prefill = PrefillApp(prefill_config, aengine=prefill_engine)
    decode = DecodeApp(decode_config, aengine=decode_engine)
    await prefill.start()
    await decode.start()
    scheduler = SchedulerApp(
        from_env(
            SchedulerConfig,
            env={},
            overrides=dict(
                model=str(model_dir),
                host="127.0.0.1",
                port=0,
                decode_addrs=[decode.address],
                prefill_addrs=[prefill.address],
                health_interval_s=0.1,
                grace_period_s=0.2,
                http_port=0,
            ),
        )
    )
    await scheduler.start()
    await scheduler.pool.wait_ready("decode")
    await scheduler.pool.wait_ready("prefill")
    channel = grpc.aio.insecure_channel(scheduler.address)
    yield generate_pb2_grpc.TandemStub(channel), prefill, decode
    await channel.close()
    await scheduler.stop(0.2)
    await decode.stop(0.2)
    await prefill.stop(0.2)


def request(max_tokens: int, **sampling) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=PROMPT),
        sampling=common_pb2.SamplingParameters(temperature=0.0, **sampling),
        stopping=common_pb2.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True),
    )


def expected(n: int) -> list[int]:
    seq = list(PROMPT)
    for _ in range(n):
        seq.append(fake.next_token(seq, VOCAB_SIZE))
    return seq[len(PROMPT) :]


async def until(predicate, timeout_s: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_the_engine_setting_picks_the_engine_kv_handoff(cluster):
    _, prefill, decode = cluster
    assert isinstance(decode.worker.handoff, EngineHandoff) and decode.worker.handoff.transport == "trtllm"
    async with grpc.aio.insecure_channel(decode.address) as channel:
        info = await worker_pb2_grpc.WorkerStub(channel).GetInfo(worker_pb2.GetInfoRequest())
    assert (info.engine, info.num_layers, info.block_size, info.vocab_size) == ("trtllm", 2, 16, VOCAB_SIZE)


async def test_generate_is_prefilled_by_context_only_and_decoded_by_generation_only(cluster):
    stub, prefill, decode = cluster
    responses = [r async for r in stub.Generate(request(10, logprobs=1))]
    assert [t for r in responses for t in r.token_ids] == expected(10)
    assert sum(len(r.logprobs) for r in responses) == 10
    last = responses[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(PROMPT), 10)
    ctx = prefill.aengine.llm.requests[-1]
    gen = decode.aengine.llm.requests[-1]
    assert ctx.disaggregated_params.request_type == "context_only"
    assert gen.disaggregated_params.request_type == "generation_only"
    assert gen.disaggregated_params.ctx_request_id == ctx.request_id
    await until(lambda: decode.aengine.llm.used_blocks == 0 and prefill.aengine.llm.used_blocks == 0)
    assert fake.transfer_pending() == 0


async def test_client_cancel_aborts_the_generation_and_frees_both_workers(cluster):
    stub, prefill, decode = cluster
    decode.aengine.llm.step_s = 0.02  # 400 tokens take 8 s: the cancel arrives mid-way
    call = stub.Generate(request(400))
    seen = 0
    async for r in call:
        seen += len(r.token_ids)
        if seen >= 3:
            break
    call.cancel()
    await until(lambda: decode.aengine.llm.requests and decode.aengine.llm.requests[-1].aborted())
    await until(lambda: decode.aengine.llm.used_blocks == 0 and prefill.aengine.llm.used_blocks == 0)
    assert not decode.aengine._requests and fake.transfer_pending() == 0


async def test_a_prompt_tensorrt_llm_refuses_at_submission_is_invalid_argument_and_the_worker_lives_on(cluster):
    stub, prefill, decode = cluster
    llm = decode.aengine.llm
    llm.chunked_prefill, llm.max_num_tokens = False, 64  # the LLM API's own max_num_tokens check applies
    long_prompt = [1, *((i % 200) + 5 for i in range(100))]
    async with grpc.aio.insecure_channel(decode.address) as channel:
        call = worker_pb2_grpc.DecodeStub(channel).Generate(
            worker_pb2.DecodeRequest(
                request_id="long",
                prompt_token_ids=long_prompt,
                sampling=common_pb2.SamplingParameters(temperature=0.0),
                stopping=common_pb2.StoppingCriteria(max_tokens=4, ignore_eos=True),
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [r async for r in call]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in info.value.details() and "max_num_tokens" in info.value.details()
    responses = [r async for r in stub.Generate(request(3))]  # the worker still serves
    assert [t for r in responses for t in r.token_ids] == expected(3)


# -- the draft service behind TensorRT-LLM's drafter hook ----------------------------------------


class DraftServicer(draft_pb2_grpc.DraftServicer):
    """A draft service that proposes the fake target's own next tokens (it keeps each copy)."""

    def __init__(self):
        self.requests: list[draft_pb2.ProposeRequest] = []
        self.copies: dict[tuple[str, str], list[int]] = {}

    def Propose(self, request, context):  # noqa: N802 (the proto's name)
        self.requests.append(request)
        for sid in request.released_ids:
            self.copies.pop((request.client_id, sid), None)
        proposals = []
        for seq in request.sequences:
            key = (request.client_id, seq.sequence_id)
            copy = self.copies.get(key)
            if seq.num_kept_tokens and (copy is None or seq.num_kept_tokens > len(copy)):
                proposals.append(draft_pb2.DraftProposal(sequence_id=seq.sequence_id, unknown_sequence=True))
                continue
            tokens = (copy or [])[: seq.num_kept_tokens] + list(seq.token_ids)
            proposed = []
            for _ in range(seq.num_proposals):
                proposed.append(fake.next_token(tokens + proposed, VOCAB_SIZE))
            self.copies[key] = tokens + proposed
            proposals.append(draft_pb2.DraftProposal(sequence_id=seq.sequence_id, token_ids=proposed))
        return draft_pb2.ProposeResponse(proposals=proposals, vocab_size=VOCAB_SIZE)


@pytest.fixture
def draft_service():
    servicer = DraftServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    draft_pb2_grpc.add_DraftServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_draft_client_sends_deltas_releases_and_resends_lost_sequences(draft_service):
    address, servicer = draft_service
    client = GrpcDraftClient(address, timeout_s=5)
    first = client.propose([DraftAsk("7", PROMPT, 3)])[0]
    assert first == expected(3)
    assert servicer.requests[-1].sequences[0].num_kept_tokens == 0
    # two proposals accepted, then the target's own token: only that token travels
    seq = PROMPT + first[:2] + [5]
    client.propose([DraftAsk("7", seq, 2)])
    sent = servicer.requests[-1].sequences[0]
    assert (sent.num_kept_tokens, list(sent.token_ids)) == (len(PROMPT) + 2, [5])
    servicer.copies.clear()  # the draft service restarted
    assert client.propose([DraftAsk("7", seq + [6], 2)]) == [[]]
    client.propose([DraftAsk("7", seq + [6], 2)])
    assert servicer.requests[-1].sequences[0].num_kept_tokens == 0, "a lost sequence is sent whole"
    client.propose([DraftAsk("8", PROMPT, 1)])
    assert list(servicer.requests[-1].released_ids) == ["7"], "a sequence that ended is released"
    client.close()


async def test_decode_speculates_with_the_draft_service_through_the_drafter_hook(model_dir, draft_service):
    address, servicer = draft_service
    config = from_env(
        WorkerConfig,
        env={},
        overrides=dict(
            model=str(model_dir),
            role="decode",
            engine="trtllm",
            block_size=16,
            draft_addr=address,
            num_speculative_tokens=3,
        ),
    )
    settings = TrtllmSettings.from_worker_config(config)
    assert settings.num_speculative_tokens == 3
    engine = TrtllmEngine.build(
        settings,
        read_model_info(config.model),
        api=API,
        draft_client_factory=functools.partial(GrpcDraftClient, address, 5.0),
    )
    from shared.engine import SamplingParams

    outs = [
        o
        async for o in engine.generate(
            "r", PROMPT, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        )
    ]
    assert [t for o in outs for t in o.new_token_ids] == expected(12)
    assert servicer.requests and engine.llm.num_accepted == engine.llm.num_drafted > 0
    assert len(outs) <= 4, "every step carries the accepted drafts plus one"
    engine.shutdown()
