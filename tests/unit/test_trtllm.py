"""The TensorRT-LLM engine adapter (shared/engines/trtllm/) against a fake of TensorRT-LLM's
LLM API (tests/fakes/fake_tensorrt_llm.py): disaggregated prefill -> handoff -> decode,
cancel -> abort, finish reason / usage / logprob mapping, the remote drafter hook, and the
known traps (buffer a multiple of tokens_per_block, no overlap scheduler on the prefill side,
KV transfer timeouts free the blocks). The real tensorrt_llm is never imported."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pickle
import sys

import pytest

from shared.config import ConfigError
from shared.engine import FinishReason, FirstToken, SamplingParams
from shared.engines.trtllm.config import (
    ModelInfo,
    TrtllmApi,
    TrtllmSettings,
    check,
    llm_kwargs,
    read_model_info,
)
from shared.engines.trtllm.convert import Handoff, finish_reason, sampling_params, token_logprobs
from shared.engines.trtllm.drafter import DraftAsk, remote_drafter
from shared.engines.trtllm.engine import TrtllmEngine
from shared.kv.errors import KvTransferTimeout
from shared.params import Guidance
from tests.fakes import fake_tensorrt_llm as fake

API = TrtllmApi.from_namespace(fake)
VOCAB = 128
PROMPT = [1, *range(10, 30)]


@pytest.fixture
def model_dir(tmp_path):
    config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "eos_token_id": 2,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def settings(model_dir, role: str, **overrides) -> TrtllmSettings:
    return TrtllmSettings(
        model=str(model_dir), role=role, tokens_per_block=16, max_batched_tokens=256, **overrides
    )


def build(model_dir, role: str, *, eos: list[int] | None = None, drafter=None, **overrides) -> TrtllmEngine:
    info = read_model_info(str(model_dir))
    if eos is not None:
        info = ModelInfo(**{**info.__dict__, "eos_token_ids": eos})
    return TrtllmEngine.build(settings(model_dir, role, **overrides), info, api=API, drafter=drafter)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def expected(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(fake.next_token(seq, VOCAB))
    return seq[len(prompt) :]


async def collect(stream) -> list:
    return [out async for out in stream]


async def add_prefilled(engine: TrtllmEngine, rid: str, prompt, params, handoff: bytes, num_cached_tokens: int = 0):
    """The decode side's engine verbs for a request prefilled elsewhere: reserve, add_prefilled."""
    reservation = await engine.reserve(rid, prompt, params)
    first = FirstToken(Handoff.decode(handoff).first_gen_tokens[0], None, num_cached_tokens)
    return await engine.add_prefilled(reservation, first, handoff)


async def decode_prefilled(engine: TrtllmEngine, rid: str, prompt, params, handoff: bytes, **kw) -> list:
    return await collect((await add_prefilled(engine, rid, prompt, params, handoff, **kw)).outputs)


async def until(predicate, timeout_s: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


# -- the suite never loads TensorRT-LLM -------------------------------------------------------


def test_the_adapter_and_the_fake_do_not_import_tensorrt_llm():
    assert "tensorrt_llm" not in sys.modules


# -- start-up checks: the traps ---------------------------------------------------------------


def test_buffer_not_a_multiple_of_tokens_per_block_fails_at_start_up_with_a_clear_error(model_dir):
    with pytest.raises(
        ConfigError,
        match="TANDEM_TRTLLM_MAX_TOKENS_IN_BUFFER: 1000 .*multiple of TANDEM_BLOCK_SIZE=16.*use 1008",
    ):
        build(model_dir, "prefill", max_tokens_in_buffer=1000)
    # what TensorRT-LLM itself would have done, later and less clearly
    with pytest.raises(RuntimeError, match="maxNumTokens.value\\(\\) % tokensPerBlock == 0"):
        fake.LLM(
            str(model_dir),
            kv_cache_config=fake.KvCacheConfig(tokens_per_block=16),
            cache_transceiver_config=fake.CacheTransceiverConfig(backend="UCX", max_tokens_in_buffer=1000),
        )


def test_default_buffer_is_the_longest_sequence_rounded_up_to_a_block_and_bounded(model_dir):
    info = read_model_info(str(model_dir))
    checked = check(settings(model_dir, "decode", max_model_len=250), info)
    assert checked.max_tokens_in_buffer == 256
    assert check(settings(model_dir, "decode"), info).max_tokens_in_buffer == 256  # max_position_embeddings
    # a 128k-context model: a model-length buffer would cost 16 GiB (Llama-3-8B); the default stays bounded
    long = ModelInfo(**{**info.__dict__, "max_position_embeddings": 131072})
    assert check(settings(model_dir, "decode"), long).max_tokens_in_buffer == 8192


@pytest.mark.parametrize(
    "overrides, variable",
    [
        ({"tokens_per_block": 24}, "TANDEM_BLOCK_SIZE"),
        ({"max_batched_tokens": 100}, "TANDEM_MAX_BATCHED_TOKENS"),
        ({"kv_backend": "TCP"}, "TANDEM_TRTLLM_KV_BACKEND"),
        ({"kv_backend": "MPI"}, "TANDEM_TRTLLM_KV_BACKEND.*MPI is deprecated"),
        ({"num_speculative_tokens": 4}, "TANDEM_DRAFT_ADDR"),
    ],
)
def test_settings_trtllm_rejects_are_refused_naming_the_variable(model_dir, overrides, variable):
    info = read_model_info(str(model_dir))
    base = {**settings(model_dir, "decode").__dict__, **overrides}
    with pytest.raises(ConfigError, match=variable):
        check(TrtllmSettings(**base), info)


def test_llm_arguments_prefill_without_overlap_scheduler_and_with_a_transfer_timeout(model_dir):
    info = read_model_info(str(model_dir))
    prefill = llm_kwargs(API, check(settings(model_dir, "prefill", kv_timeout_s=7.5), info))
    decode = llm_kwargs(API, check(settings(model_dir, "decode"), info))
    assert prefill["disable_overlap_scheduler"] is True
    assert "disable_overlap_scheduler" not in decode  # decode keeps TensorRT-LLM's default (overlap on)
    transceiver = prefill["cache_transceiver_config"]
    assert (transceiver.backend, transceiver.max_tokens_in_buffer, transceiver.kv_transfer_timeout_ms) == (
        "UCX",
        256,
        7500,
    )
    assert prefill["kv_cache_config"].tokens_per_block == 16
    assert prefill["skip_tokenizer_init"] is True
    assert prefill["enable_chunked_prefill"] is decode["enable_chunked_prefill"] is True
    fake.LLM(**prefill).shutdown()  # every argument is one the LLM accepts


async def test_context_only_needs_the_overlap_scheduler_off(model_dir):
    """Why the prefill role disables it: a decode-configured LLM refuses context-only work."""
    decode = build(model_dir, "decode")
    with pytest.raises(Exception, match="disable_overlap_scheduler"):
        await decode.prefill("r", PROMPT, greedy(4))
    assert decode.llm.used_blocks == 0 and not decode._requests


# -- prefill -> handoff -> decode -------------------------------------------------------------


async def test_disaggregated_request_equals_the_aggregated_one_and_frees_every_block(model_dir):
    prefill, decode, single = (
        build(model_dir, "prefill"),
        build(model_dir, "decode"),
        build(model_dir, "decode"),
    )
    params = greedy(8, ignore_eos=True)
    result = await prefill.prefill("r1", PROMPT, params)
    wire = result.handoff  # what travels in PrefillResult.engine_handoff
    assert result.kv is None and result.first.new_token_ids == expected(PROMPT, 1)
    assert prefill.llm.held, "the context's KV waits for the decode worker"
    outs = await decode_prefilled(decode, "r1", PROMPT, params, wire)
    tokens = result.first.new_token_ids + [t for o in outs for t in o.new_token_ids]
    assert tokens == expected(PROMPT, 8)
    assert tokens == [
        t for o in await collect(single.generate("r2", PROMPT, params)) for t in o.new_token_ids
    ]
    assert [o.num_output_tokens for o in outs][-1] == 8 and outs[-1].finished
    assert outs[-1].finish_reason == FinishReason.LENGTH
    req = decode.llm.requests[-1]
    assert req.disaggregated_params.request_type == "generation_only"
    assert req.disaggregated_params.opaque_state == Handoff.decode(wire).opaque_state
    for engine in (prefill, decode, single):
        assert engine.llm.used_blocks == 0 and not engine._requests
    assert fake.transfer_pending() == 0


def test_handoff_round_trip_and_malformed_bytes():
    handoff = Handoff([7], 42, b"\x00\xffucx-state", [3, 4])
    assert Handoff.decode(handoff.encode()) == handoff
    params = handoff.to_params(API)
    assert (params.request_type, params.ctx_request_id, params.first_gen_tokens) == (
        "generation_only",
        42,
        [7],
    )
    with pytest.raises(ValueError, match="malformed TensorRT-LLM handoff"):
        Handoff.decode(b"not json")


async def test_a_first_token_that_ends_the_request_still_releases_the_context_at_once(model_dir):
    prefill, decode = build(model_dir, "prefill", kv_timeout_s=30), build(model_dir, "decode")
    result = await prefill.prefill("r", PROMPT, greedy(1))
    prefilled = await add_prefilled(decode, "r", PROMPT, greedy(1), result.handoff)
    assert prefilled.finish == FinishReason.LENGTH and await collect(prefilled.outputs) == []
    await until(lambda: decode.llm.used_blocks == 0)
    assert prefill.llm.used_blocks == 0 and fake.transfer_pending() == 0, "freed now, not after 30 s"


# -- cancel -> abort ----------------------------------------------------------------------------


async def test_cancelling_a_decode_stream_aborts_the_request_and_frees_its_blocks(model_dir):
    prefill, decode = build(model_dir, "prefill"), build(model_dir, "decode")
    decode.llm.step_s = 0.01  # 200 tokens take 2 s: the cancel comes mid-way
    params = greedy(200, ignore_eos=True)
    handoff = (await prefill.prefill("r", PROMPT, params)).handoff
    seen = []

    async def consume():
        async for out in (await add_prefilled(decode, "r", PROMPT, params, handoff)).outputs:
            seen.append(out)

    task = asyncio.create_task(consume())
    await until(lambda: len(seen) >= 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    req = decode.llm.requests[-1]
    assert req.aborted() and decode.llm.num_aborts == 1
    await until(lambda: decode.llm.used_blocks == 0)
    assert not decode._requests


async def test_abort_by_request_id_ends_a_local_generation_as_cancelled(model_dir):
    engine = build(model_dir, "decode")
    outs = []
    async for out in engine.generate("r", PROMPT, greedy(200, ignore_eos=True)):
        outs.append(out)
        if len(outs) == 2:
            await engine.abort("r")
    assert engine.llm.requests[-1].aborted()
    await until(lambda: engine.llm.used_blocks == 0)


async def test_cancelling_a_prefill_aborts_the_context_request(model_dir):
    prefill = build(model_dir, "prefill")
    task = asyncio.create_task(prefill.prefill("r", PROMPT, greedy(4)))
    await asyncio.sleep(0)  # submitted, context phase not done
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert prefill.llm.requests[-1].aborted()
    await until(lambda: prefill.llm.used_blocks == 0)
    assert not prefill.llm.held


# -- KV transfer timeout ------------------------------------------------------------------------


async def test_a_context_nobody_pulls_is_freed_at_the_transfer_timeout(model_dir):
    prefill = build(model_dir, "prefill", kv_timeout_s=0.2)
    await prefill.prefill("r", PROMPT, greedy(4))
    assert prefill.llm.used_blocks > 0
    await until(lambda: prefill.llm.used_blocks == 0, timeout_s=2)
    assert not prefill.llm.held


async def test_decode_of_an_expired_context_fails_with_kv_transfer_timeout_and_frees_its_blocks(model_dir):
    prefill = build(model_dir, "prefill", kv_timeout_s=0.1)
    decode = build(model_dir, "decode", kv_timeout_s=0.3)
    handoff = (await prefill.prefill("r", PROMPT, greedy(4))).handoff
    await until(lambda: not prefill.llm.held)  # expired on the prefill worker
    with pytest.raises(KvTransferTimeout):
        await decode_prefilled(decode, "r", PROMPT, greedy(4), handoff)
    assert decode.llm.used_blocks == 0 and not decode._requests


# -- mapping: finish reasons, usage, logprobs, sampling -----------------------------------------


async def test_finish_reasons_stop_on_eos_and_stop_tokens_length_otherwise(model_dir):
    tokens = expected(PROMPT, 6)
    eos_engine = build(model_dir, "decode", eos=[tokens[3]])
    outs = await collect(eos_engine.generate("a", PROMPT, greedy(10)))
    assert [t for o in outs for t in o.new_token_ids] == tokens[:4]
    assert outs[-1].finish_reason == FinishReason.STOP
    outs = await collect(eos_engine.generate("b", PROMPT, greedy(6, ignore_eos=True)))
    assert outs[-1].finish_reason == FinishReason.LENGTH and outs[-1].num_output_tokens == 6
    plain = build(model_dir, "decode")
    outs = await collect(plain.generate("c", PROMPT, greedy(10, stop_token_ids=[tokens[2]])))
    assert [t for o in outs for t in o.new_token_ids] == tokens[:3] and outs[
        -1
    ].finish_reason == FinishReason.STOP


def test_finish_reason_table():
    assert finish_reason("stop") == FinishReason.STOP
    assert finish_reason("length") == FinishReason.LENGTH
    assert finish_reason("cancelled") == FinishReason.CANCELLED
    assert finish_reason("timeout") == FinishReason.ERROR
    assert finish_reason(None) == FinishReason.ERROR


async def test_usage_counts_prompt_output_and_the_prefill_workers_cached_tokens(model_dir):
    prefill, decode = build(model_dir, "prefill"), build(model_dir, "decode")
    params = greedy(5, ignore_eos=True)
    result = await prefill.prefill("r", PROMPT, params)
    assert (result.first.num_prompt_tokens, result.first.num_output_tokens) == (len(PROMPT), 1)
    outs = await decode_prefilled(decode, "r", PROMPT, params, result.handoff, num_cached_tokens=16)
    assert [o.num_output_tokens for o in outs] == list(range(2, 6))
    assert {(o.num_prompt_tokens, o.num_cached_tokens) for o in outs} == {(len(PROMPT), 16)}


async def test_logprobs_of_the_first_and_later_tokens(model_dir):
    prefill, decode = build(model_dir, "prefill"), build(model_dir, "decode")
    params = greedy(4, ignore_eos=True, logprobs=2)
    result = await prefill.prefill("r", PROMPT, params)
    first = result.first.logprobs[0]
    assert (first.token_id, first.logprob) == (result.first.new_token_ids[0], -0.25)
    assert [t for t, _ in first.top] == [first.token_id, (first.token_id + 1) % VOCAB]
    outs = await decode_prefilled(decode, "r", PROMPT, params, result.handoff)
    lps = [lp for o in outs for lp in o.logprobs]
    assert [lp.token_id for lp in lps] == [t for o in outs for t in o.new_token_ids]
    assert all(len(lp.top) == 2 for lp in lps)
    assert token_logprobs([5], [-1.5], 1)[0].logprob == -1.5  # releases that return floats
    assert token_logprobs([5], [], 0) is None


def test_sampling_parameters(model_dir):
    info = ModelInfo("m", VOCAB, 2, 2, 16, 256, eos_token_ids=[2, 9])
    g = sampling_params(API, greedy(5, seed=3), info)
    assert (g.top_k, g.temperature, g.end_id, g.stop_token_ids, g.seed, g.detokenize) == (
        1,
        None,
        2,
        [9],
        3,
        False,
    )
    s = sampling_params(
        API, SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9, min_p=0.05, top_k=40), info
    )
    assert (s.temperature, s.top_p, s.min_p, s.top_k) == (0.7, 0.9, 0.05, 40)
    assert sampling_params(API, greedy(5, ignore_eos=True), info).stop_token_ids is None
    assert sampling_params(API, greedy(5), info, max_tokens=1).max_tokens == 1
    plain = sampling_params(API, greedy(5), info, num_prompt_tokens=12)
    assert (plain.presence_penalty, plain.frequency_penalty, plain.prompt_ignore_length) == (None, None, None)
    # OpenAI's penalties count generated tokens only: the prompt is skipped, except a resumed
    # request's earlier outputs at its end (seed_offset of them)
    p = sampling_params(
        API, SamplingParams(max_tokens=5, presence_penalty=0.5, frequency_penalty=-1.0, seed_offset=3), info,
        num_prompt_tokens=12,
    )
    assert (p.presence_penalty, p.frequency_penalty, p.prompt_ignore_length) == (0.5, -1.0, 9)


async def test_invalid_requests_are_refused_before_tensorrt_llm_sees_them(model_dir):
    from shared.engine import InvalidRequest

    engine = build(model_dir, "decode")
    with pytest.raises(InvalidRequest, match="prompt"):
        await collect(engine.generate("a", [VOCAB + 5], greedy(2)))
    with pytest.raises(InvalidRequest, match="max_tokens"):
        await collect(engine.generate("b", PROMPT, greedy(1000)))
    with pytest.raises(InvalidRequest, match="prompt_logprobs: not supported by the TensorRT-LLM engine"):
        await collect(engine.generate("c", PROMPT, dataclasses.replace(greedy(2), prompt_logprobs=1)))
    with pytest.raises(InvalidRequest, match="guidance: structured output is not supported by the TensorRT-LLM"):
        await collect(engine.generate("c", PROMPT, dataclasses.replace(greedy(2), guidance=Guidance("json_object"))))
    with pytest.raises(InvalidRequest, match="repetition_penalty: cannot be combined with presence_penalty"):
        combined = dataclasses.replace(greedy(2), repetition_penalty=1.2, frequency_penalty=0.5)
        await collect(engine.generate("c", PROMPT, combined))
    with pytest.raises(InvalidRequest, match="logit_bias: not supported by the TensorRT-LLM engine"):
        await collect(engine.generate("c", PROMPT, dataclasses.replace(greedy(2), logit_bias={5: 1.0})))
    assert not engine.llm.requests


# -- the draft service as TensorRT-LLM's drafter ----------------------------------------------


class OracleDraftClient:
    """Proposes the target's own greedy tokens, except a wrong one every third position."""

    def __init__(self):
        self.asks: list[DraftAsk] = []

    def propose(self, asks):
        self.asks += asks
        out = []
        for ask in asks:
            seq, tokens = list(ask.token_ids), []
            for i in range(ask.k):
                t = fake.next_token(seq, VOCAB)
                t = (t + 1) % VOCAB if i == 2 else t
                tokens.append(t)
                seq.append(t)
            out.append(tokens)
        return out


def oracle_factory():
    return OracleDraftClient()


async def test_remote_drafter_proposals_are_verified_without_changing_the_output(model_dir):
    drafter = remote_drafter(fake.Drafter, oracle_factory, max_draft_len=4)
    assert isinstance(drafter, fake.Drafter)
    engine = build(model_dir, "decode", drafter=drafter, num_speculative_tokens=4, draft_addr="draft:50054")
    outs = await collect(engine.generate("r", PROMPT, greedy(12, ignore_eos=True)))
    assert [t for o in outs for t in o.new_token_ids] == expected(PROMPT, 12)
    assert engine.llm.num_accepted > 0 and engine.llm.num_accepted < engine.llm.num_drafted
    assert len(outs) < 12, "accepted drafts come several tokens per step"
    asks = drafter.client.asks
    assert asks[0].token_ids[: len(PROMPT)] == PROMPT and all(a.k <= 4 for a in asks)
    assert max(len(a.token_ids) + a.k for a in asks) <= len(PROMPT) + 12 - 1 + 1, "no drafts past max_tokens"


def test_remote_drafter_pickles_into_an_executor_process():
    drafter = remote_drafter(fake.Drafter, oracle_factory, max_draft_len=3)
    clone = pickle.loads(pickle.dumps(drafter))
    request = fake.LlmRequest(1, list(PROMPT), len(PROMPT), 10)
    clone.prepare_draft_tokens(fake.ScheduledRequests(generation_requests=[request]))
    assert request.py_draft_tokens == expected(PROMPT, 2) + [(expected(PROMPT, 3)[2] + 1) % VOCAB]


def broken_factory():
    raise ConnectionError("draft service down")


def test_a_missing_draft_service_means_no_drafts_not_a_failure_and_is_left_alone_for_a_while():
    now = [100.0]
    drafter = remote_drafter(fake.Drafter, broken_factory, max_draft_len=3, retry_s=2.0)
    drafter.clock = lambda: now[0]

    def step():
        request = fake.LlmRequest(1, list(PROMPT), len(PROMPT), 10)
        drafter.prepare_draft_tokens(fake.ScheduledRequests(generation_requests=[request]))
        return request.py_draft_tokens

    assert step() == [] and drafter.num_failures == 1
    now[0] += 1.0
    assert step() == [] and drafter.num_failures == 1, "not asked again within TANDEM_DRAFT_RETRY_S"
    now[0] += 1.5
    assert step() == [] and drafter.num_failures == 2, "tried again after it"


# -- load and GetInfo -------------------------------------------------------------------------


async def test_stats_report_tensorrt_llms_kv_blocks_and_requests_in_flight(model_dir):
    engine = build(model_dir, "decode")
    stream = engine.generate("r", PROMPT, greedy(50, ignore_eos=True))
    await stream.__anext__()
    stats = engine.refresh_stats()
    assert stats.num_total_blocks == 64 and 0 < stats.num_free_blocks < 64 and stats.num_running == 1
    await stream.aclose()
    info = engine.info()
    assert (info.num_layers, info.num_kv_heads, info.block_size, info.vocab_size) == (2, 2, 16, VOCAB)
    assert info.max_model_len == 256 and info.kv_dtype == "bfloat16" and info.kv_handoff == "engine"
