"""Requests end, abort, sample, and move KV between engines without leaking a block."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from shared.engine import AsyncEngine, EngineConfig, FinishReason, InvalidRequest, LLMEngine, SamplingParams
from tests.helpers.models import make_tiny_checkpoint
from tests.helpers.tokenizers import EOS_ID

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [[1, *range(5, 45)], [1, 30, 31], [1, *range(100, 119)], [1, *range(200, 230)]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def make_engine(ckpt, **kw) -> LLMEngine:
    cfg = dict(model=str(ckpt), num_blocks=64, block_size=8, max_num_batched_tokens=16)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


def all_free(engine: LLMEngine) -> bool:
    s = engine.stats()
    return s.num_free_blocks == s.num_total_blocks and not engine.requests and not engine.has_unfinished()


@pytest.mark.parametrize("abort_after_steps", [0, 1, 2, 4, 8, 20])
def test_abort_at_every_phase_frees_all_blocks(ckpt, abort_after_steps):
    """Abort while waiting, mid chunked prefill, and mid decode."""
    engine = make_engine(ckpt, max_num_seqs=2)  # the 3rd and 4th requests wait
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, GREEDY)
    for _ in range(abort_after_steps):
        engine.step()
    for i in range(len(PROMPTS)):
        engine.abort(str(i))
    assert all_free(engine)


def test_finished_requests_free_blocks_and_report_reasons(ckpt):
    engine = make_engine(ckpt)
    probe = engine.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    engine.add_request("len", PROMPTS[0], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    engine.add_request("stop", PROMPTS[1], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[probe[1]]))
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    assert outs["len"][-1].finish_reason is FinishReason.LENGTH and len(outs["len"]) == 5
    assert outs["stop"][-1].finish_reason is FinishReason.STOP and len(outs["stop"]) == probe.index(probe[1]) + 1
    assert all_free(engine)


def test_eos_stops_unless_ignored(ckpt):
    engine = make_engine(ckpt)
    engine.model_config.eos_token_ids = [engine.generate([PROMPTS[2]], GREEDY)[0][3]]
    stopped = engine.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=12))[0]
    ignored = engine.generate([PROMPTS[2]], GREEDY)[0]
    assert len(stopped) == 4 and len(ignored) == 12 and ignored[:4] == stopped
    assert EOS_ID == 2


@pytest.mark.parametrize("field,prompt,params", [
    ("prompt_token_ids", [], GREEDY),
    ("prompt_token_ids", [1, 99999], GREEDY),
    ("max_tokens", [1, 2], SamplingParams(max_tokens=0)),
    ("max_tokens", [1] * 500, SamplingParams(max_tokens=100)),
    ("prompt", [1] * 512, SamplingParams(max_tokens=1)),  # the prompt alone fills the model length
    ("temperature", [1, 2], SamplingParams(temperature=float("nan"))),
    ("temperature", [1, 2], SamplingParams(temperature=-1)),
    ("top_p", [1, 2], SamplingParams(top_p=0)),
    ("top_k", [1, 2], SamplingParams(top_k=-1)),
    ("stop_token_ids", [1, 2], SamplingParams(stop_token_ids=[-3])),
])
def test_invalid_requests_name_the_field(ckpt, field, prompt, params):
    engine = make_engine(ckpt)
    with pytest.raises(InvalidRequest) as e:
        engine.add_request("x", prompt, params)
    assert e.value.field == field
    if len(prompt) >= engine.max_model_len:
        assert e.value.message.startswith(f"prompt ({len(prompt)} tokens) exceeds the model length")
    assert engine.generate([PROMPTS[1]], GREEDY)[0]  # still serving
    assert all_free(engine)


def test_seeded_sampling_is_reproducible_and_batch_independent(ckpt):
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, min_p=0.01, seed=1234, max_tokens=16,
                            ignore_eos=True, repetition_penalty=1.1)
    alone = make_engine(ckpt).generate([PROMPTS[0]], params)[0]
    others = [SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True) for _ in range(3)]
    batched = make_engine(ckpt).generate([PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[3]],
                                         [others[0], params, others[1], others[2]])[1]
    # and with preemption forcing a recompute midway
    tight = make_engine(ckpt, num_blocks=14, enable_prefix_caching=False)
    squeezed = tight.generate([PROMPTS[3], PROMPTS[0], PROMPTS[2]], [others[0], params, others[1]])[1]
    assert alone == batched == squeezed
    other_seed = make_engine(ckpt).generate([PROMPTS[0]], SamplingParams(**{**params.__dict__, "seed": 99}))[0]
    assert other_seed != alone


def test_sampling_filters_restrict_support(ckpt):
    from shared.engine.sampler import SamplingRow, sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(200, 1)
    for params, allowed in [
        (SamplingParams(temperature=1.0, top_k=2), {0, 1}),
        (SamplingParams(temperature=1.0, top_p=0.7), {0, 1}),
        (SamplingParams(temperature=1.0, min_p=0.35), {0, 1}),
        (SamplingParams(temperature=1.0), {0, 1, 2, 3}),
    ]:
        rows = [SamplingRow(params, [], i) for i in range(200)]
        got = set(sample(logits, rows, torch.Generator().manual_seed(0))[0])
        assert got == allowed, params


def test_logprobs_of_sampled_tokens(ckpt):
    engine = make_engine(ckpt)
    engine.add_request("a", PROMPTS[1], SamplingParams(temperature=0, max_tokens=3, logprobs=3, ignore_eos=True))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    for o in outs:
        (lp,) = o.logprobs
        assert len(lp.top) == 3 and lp.top[0][0] == o.new_token_ids[0]  # greedy = the top-1
        assert lp.logprob == pytest.approx(lp.top[0][1]) and lp.logprob <= 0


def test_kv_export_import_reproduces_single_engine(ckpt):
    """Prefill on one engine, move the prompt KV, decode on another: same tokens as one engine."""
    ref = make_engine(ckpt).generate([PROMPTS[0]], GREEDY)[0]
    prefill, decode = make_engine(ckpt), make_engine(ckpt, block_size=16)
    first = SamplingParams(**{**GREEDY.__dict__, "max_tokens": 1})
    prefill.add_request("r", PROMPTS[0], first, hold_kv=True)
    (out,) = [o for _ in range(10) for o in prefill.step()][:1]
    kv = prefill.export_kv("r")
    assert kv.shape[:3] == (2, 2, len(PROMPTS[0]))
    prefill.release("r")
    assert decode.reserve("r", len(PROMPTS[0]))
    decode.import_kv("r", kv[:1], layer_start=0)  # in two pieces, as a transport would
    decode.import_kv("r", kv[1:], layer_start=1)
    assert decode.add_prefilled("r", PROMPTS[0], out.new_token_ids[0], GREEDY) is None
    toks = list(out.new_token_ids)
    while decode.has_unfinished():
        for o in decode.step():
            toks += o.new_token_ids
    assert toks == ref
    assert all_free(decode)
    # the prefill worker keeps the prompt's full blocks as prefix cache
    assert prefill.stats().num_cached_blocks == len(PROMPTS[0]) // 8
    assert prefill.stats().num_free_blocks == prefill.stats().num_total_blocks


def test_reserve_fails_cleanly_when_full(ckpt):
    engine = make_engine(ckpt, num_blocks=8)
    assert not engine.reserve("big", 8 * 8 + 1)
    assert engine.reserve("ok", 30)
    engine.abort("ok")
    assert all_free(engine)


def test_async_engine_streams_and_cancel_frees_blocks(ckpt):
    engine = make_engine(ckpt)
    aeng = AsyncEngine(engine).start()
    ref = make_engine(ckpt).generate(PROMPTS, GREEDY)

    async def collect(i):
        toks = []
        async for out in aeng.generate(f"r{i}", PROMPTS[i], GREEDY):
            toks += out.new_token_ids
        return toks

    async def cancel_midway():
        agen = aeng.generate("c", PROMPTS[0], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        async for _ in agen:
            break
        await agen.aclose()

    async def main():
        got = await asyncio.gather(*(collect(i) for i in range(len(PROMPTS))), cancel_midway())
        with pytest.raises(InvalidRequest):
            async for _ in aeng.generate("bad", [], GREEDY):
                pass
        stats = await aeng.call(lambda eng: eng.stats())
        return got, stats

    got, stats = asyncio.run(main())
    aeng.shutdown()
    assert got[:-1] == ref
    assert stats.num_free_blocks == stats.num_total_blocks and not engine.requests


def test_long_prompt_never_stalls_running_decodes(ckpt):
    """Chunked prefill: while a long prompt is prefilled in chunks, every running decode
    still gets a token at every step, and the batch never exceeds max_num_seqs."""
    engine = make_engine(ckpt, max_num_batched_tokens=8, max_num_seqs=3, num_blocks=128)
    for i in range(2):
        engine.add_request(f"short{i}", PROMPTS[1], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    while len(engine.requests["short0"].output_token_ids) < 2:
        engine.step()
    engine.add_request("long", [1, *range(3, 203)], GREEDY)  # 201 tokens: 26+ chunks of <= 6
    engine.add_request("queued", PROMPTS[2], GREEDY)  # over max_num_seqs: waits
    steps_while_prefilling = 0
    while engine.requests["long"].num_computed_tokens < 201:
        outs = {o.request_id for o in engine.step()}
        assert {"short0", "short1"} <= outs, "a decode was stalled by the long prefill"
        assert len(engine.scheduler.running) <= 3
        steps_while_prefilling += 1
    assert steps_while_prefilling >= 25
    assert engine.requests["queued"].num_computed_tokens == 0


def test_bfloat16_and_float16_engines_track_float32(ckpt):
    ref = make_engine(ckpt)
    for dtype in ("bfloat16", "float16"):
        engine = make_engine(ckpt, dtype=dtype)
        assert engine.runner.kv_cache.dtype == getattr(torch, dtype)
        for eng in (ref, engine):
            eng.add_request("x", PROMPTS[0], GREEDY)
        batch_ref, batch = ref.scheduler.schedule(), engine.scheduler.schedule()
        inputs = [ref._seq_input(r, n, {}) for r, n in batch_ref.prefills]
        lr = ref.runner.forward(inputs, [], [1])[0]
        lo = engine.runner.forward([engine._seq_input(r, n, {}) for r, n in batch.prefills], [], [1])[0]
        ref.abort("x")
        engine.abort("x")
        # half precision: close in distribution, same top choice
        assert torch.nn.functional.cosine_similarity(lr, lo, dim=0) > 0.99
        assert lr.argmax() == lo.argmax()


def test_async_engine_coalesces_outputs_for_a_slow_consumer(ckpt):
    """A consumer that falls behind gets the queued tokens in fewer, larger outputs, none lost."""
    ref = make_engine(ckpt).generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    aeng = AsyncEngine(make_engine(ckpt)).start()

    async def slow():
        outs = []
        async for out in aeng.generate("s", PROMPTS[0], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)):
            outs.append(out)
            await asyncio.sleep(0.2)
        return outs

    outs = asyncio.run(slow())
    aeng.shutdown()
    assert [t for o in outs for t in o.new_token_ids] == ref
    assert len(outs) < len(ref) and outs[-1].finished and outs[-1].num_output_tokens == 30


@pytest.mark.parametrize("window", [None, 5])
def test_short_steps_through_the_decode_kernel_equal_the_prefill_path(ckpt, window):
    """A step of a few new tokens after cached context (speculative verification, a draft's
    tail) runs as decode-kernel rows on CPU; its logits equal the SDPA prefill path's."""
    from shared.engine.model import cpu_kernels
    from shared.engine.runner import SHORT_AS_DECODE, SeqInput

    if cpu_kernels.load() is None:
        pytest.skip("no C++ toolchain to build the kernel")
    engine = make_engine(ckpt)
    runner = engine.runner
    runner.cfg.sliding_window = window
    try:
        tokens = list(range(5, 5 + 40))
        blocks = list(range(3, 3 + -(-len(tokens) // engine.block_size)))
        runner.forward([SeqInput(tokens, 0, 30, blocks)], [], [0])  # the cached context: 30 tokens
        short = [SeqInput(tokens, 30, n, blocks) for n in (1, 4, SHORT_AS_DECODE - 7)]
        fast = [runner.forward([s], [], [s.n]) for s in short]
        runner._decode_kernel = False
        slow = [runner.forward([s], [], [s.n]) for s in short]
    finally:
        runner.cfg.sliding_window = None
        runner._decode_kernel = cpu_kernels.supports(runner.device, runner.dtype)
    for f, s in zip(fast, slow, strict=True):
        torch.testing.assert_close(f, s, atol=1e-4, rtol=1e-4)


def test_late_close_of_a_stream_spares_a_newer_request_reusing_its_id(ckpt):
    """The decode worker's disaggregated path reserves blocks under the client's request id and
    closes its stream when done. A client may send the next request under the same id before
    the previous one's clean-up ran: that late clean-up must not free the newer reservation."""
    engine = make_engine(ckpt)
    aeng = AsyncEngine(engine).start()

    async def main():
        old = aeng.open_stream("x")  # the first request: finished, its clean-up still pending
        new = aeng.open_stream("x")  # the next request under the same id
        assert await aeng.call(lambda eng: eng.reserve("x", 20))
        await aeng.close_stream("x", old)  # the first one's late clean-up: a no-op now
        alive = "x" in engine.requests
        await aeng.close_stream("x", new)  # the newer request's own clean-up aborts it
        return alive, await aeng.call(lambda eng: eng.stats())

    alive, stats = asyncio.run(main())
    aeng.shutdown()
    assert alive, "the newer request's reservation was freed by the older one's clean-up"
    assert stats.num_free_blocks == stats.num_total_blocks and not engine.requests


@pytest.mark.parametrize("hold_kv", [False, True])
def test_cancel_while_the_request_is_being_added_frees_its_blocks(ckpt, hold_kv):
    """A caller cancelled while its add_request command waits for the engine thread (a prefill
    worker whose caller's deadline passed right then): the request is added a moment later and
    must be aborted, or it runs on (and, holding its KV, keeps its blocks) with no one to free it."""
    engine = make_engine(ckpt)
    aeng = AsyncEngine(engine).start()
    params = SamplingParams(temperature=0.0, max_tokens=1 if hold_kv else 50, ignore_eos=True)

    async def main():
        gate = threading.Event()
        busy = asyncio.ensure_future(aeng.call(lambda eng: gate.wait(10)))  # the engine thread is busy
        await asyncio.sleep(0.05)

        async def consume():
            async for _ in aeng.generate("p", PROMPTS[0], params, hold_kv=hold_kv):
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.05)  # add_request is queued behind the busy command
        task.cancel()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await busy
        for _ in range(200):
            stats = await aeng.call(lambda eng: eng.stats())
            if not engine.has_unfinished() and stats.num_free_blocks == stats.num_total_blocks:
                break
            await asyncio.sleep(0.01)
        return stats

    stats = asyncio.run(main())
    aeng.shutdown()
    assert stats.num_free_blocks == stats.num_total_blocks and not engine.requests


def test_a_busy_engine_measures_what_its_steps_cost_besides_the_forward(ckpt):
    """The time between the starts of consecutive busy steps, less the forward pass, feeds the
    speculation policy's per-step overhead; an idle gap (nothing unfinished) does not."""
    import time

    engine = make_engine(ckpt)
    engine.add_request("r", PROMPTS[1], GREEDY)
    while not engine.requests["r"].num_output_tokens:
        engine.step()
    for _ in range(6):  # busy decoding, 20 ms of other work between steps
        engine.step()
        time.sleep(0.02)
    assert engine.spec_policy.overhead.measured
    assert 0.015 < engine.spec_policy.overhead(1) < 0.2
    while engine.has_unfinished():
        engine.step()
    before = engine.spec_policy.overhead._w
    time.sleep(0.05)  # idle
    engine.add_request("s", PROMPTS[1], GREEDY)
    engine.step()
    assert engine.spec_policy.overhead._w == before  # the idle gap was not a sample
