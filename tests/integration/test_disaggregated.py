"""Generate through scheduler -> decode -> prefill equals the single-process engine."""

from __future__ import annotations

import pytest
import torch

from shared.pb.tandem.v1 import common_pb2

from .cluster import start_cluster, token_ids

PROMPT = [1, *range(40, 85)]  # 46 tokens: 2 full blocks + a partial one


@pytest.mark.parametrize("transport", ["grpc", "collective"])
async def test_greedy_matches_single_process(tiny_model, reference, transport):
    cluster = await start_cluster(tiny_model, transport=transport)
    try:
        responses = await cluster.generate(prompt=PROMPT, max_tokens=12)
        assert token_ids(responses) == reference(PROMPT, 12)
        last = responses[-1]
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(PROMPT), 12)
        assert cluster.decodes[0].worker.num_remote_prefills == 1
        assert cluster.decodes[0].worker.num_local_prefills == 0
        await cluster.wait_idle()
    finally:
        await cluster.stop()


def _spy_kv(cluster):
    """Record the KV the prefill worker exported and the KV in the decode worker's blocks
    right before the request joins its batch (read back from the blocks themselves)."""
    sent, landed = {}, {}
    prefill_engine = cluster.prefills[0].aengine.engine
    decode_engine = cluster.decodes[0].aengine.engine
    export_kv, add_prefilled = prefill_engine.export_kv, decode_engine.add_prefilled

    def spy_export(request_id):
        sent[request_id] = kv = export_kv(request_id)
        return kv

    def spy_add_prefilled(request_id, prompt_token_ids, *args, **kwargs):
        blocks = decode_engine.kv.block_ids(request_id)
        landed[request_id] = decode_engine.runner.gather_kv(blocks, len(prompt_token_ids))
        return add_prefilled(request_id, prompt_token_ids, *args, **kwargs)

    prefill_engine.export_kv = spy_export
    decode_engine.add_prefilled = spy_add_prefilled
    return sent, landed


@pytest.mark.parametrize("transport", ["grpc", "collective"])
async def test_decode_kv_equals_prefill_kv_bit_for_bit(tiny_model, transport):
    cluster = await start_cluster(tiny_model, transport=transport)
    sent, landed = _spy_kv(cluster)
    try:
        await cluster.generate(prompt=PROMPT, max_tokens=2)
        await cluster.generate(prompt=[1, 7, 8, 9], max_tokens=2)  # shorter than one block
        assert len(sent) == len(landed) == 2
        for rid, kv in sent.items():
            assert kv.shape[2] in (len(PROMPT), 4)
            assert torch.equal(landed[rid].view(torch.uint8), kv.view(torch.uint8))
    finally:
        await cluster.stop()


async def test_seeded_sampling_and_logprobs_match_single_process(tiny_model, reference):
    cluster = await start_cluster(tiny_model)
    try:
        params = dict(temperature=0.9, top_k=50, seed=1234)
        responses = await cluster.generate(prompt=PROMPT, max_tokens=10, logprobs=3, **params)
        assert token_ids(responses) == reference(PROMPT, 10, **params)
        logprobs = [lp for r in responses for lp in r.logprobs]
        assert [lp.token_id for lp in logprobs] == token_ids(responses)  # the first (prefilled) one too
        assert all(len(lp.top) == 3 and lp.logprob <= 0 for lp in logprobs)
    finally:
        await cluster.stop()


async def test_aggregated_mode_without_prefill_workers(tiny_model, reference):
    cluster = await start_cluster(tiny_model, num_prefill=0)
    try:
        responses = await cluster.generate(prompt=PROMPT, max_tokens=12)
        assert token_ids(responses) == reference(PROMPT, 12)
        assert cluster.decodes[0].worker.num_local_prefills == 1
        await cluster.wait_idle()
    finally:
        await cluster.stop()


async def test_short_prompts_prefill_locally(tiny_model, reference):
    cluster = await start_cluster(tiny_model, scheduler_overrides={"disagg_min_tokens": 32})
    try:
        short, long = [1, 5, 6, 7, 8], PROMPT
        assert token_ids(await cluster.generate(prompt=short, max_tokens=6)) == reference(short, 6)
        assert token_ids(await cluster.generate(prompt=long, max_tokens=6)) == reference(long, 6)
        worker = cluster.decodes[0].worker
        assert (worker.num_local_prefills, worker.num_remote_prefills) == (1, 1)
    finally:
        await cluster.stop()


async def test_prefix_cache_on_the_prefill_worker(tiny_model, reference):
    cluster = await start_cluster(tiny_model, num_prefill=2)
    try:
        first = await cluster.generate(prompt=PROMPT, max_tokens=4)
        again = await cluster.generate(prompt=PROMPT[:40] + [9, 9, 9], max_tokens=4)
        assert first[-1].usage.cached_tokens == 0
        # routed to the prefill worker that holds the first 2 blocks (32 tokens) of the prompt
        assert again[-1].usage.cached_tokens == 32
        assert token_ids(again) == reference(PROMPT[:40] + [9, 9, 9], 4)
        await cluster.wait_idle()
    finally:
        await cluster.stop()


async def test_prompt_logprobs_are_computed_on_the_decode_worker(tiny_model, reference):
    """A request asking for prompt logprobs needs every prompt token's logits: the scheduler
    routes it to no prefill peer, its decode worker prefills it in full (no prefix-cache hit),
    and the first response carries one entry per prompt token after the first, equal to the
    engine's own log-softmax; the prefill worker is not blamed for it."""
    import torch

    from tests.helpers.models import load_hf

    cluster = await start_cluster(tiny_model)
    try:
        await cluster.generate(prompt=PROMPT, max_tokens=2)  # the prompt's blocks are now cached
        responses = await cluster.generate(prompt=PROMPT, max_tokens=6, prompt_logprobs=2)
        assert token_ids(responses) == reference(PROMPT, 6)
        first, *rest = responses
        assert len(first.prompt_logprobs) == len(PROMPT) - 1 and not any(r.prompt_logprobs for r in rest)
        assert [lp.token_id for lp in first.prompt_logprobs] == PROMPT[1:]
        with torch.no_grad():
            ref = torch.log_softmax(load_hf(tiny_model)(torch.tensor([PROMPT])).logits[0].float(), dim=-1)
        for i, lp in enumerate(first.prompt_logprobs):
            assert abs(lp.logprob - float(ref[i, PROMPT[i + 1]])) < 1e-4
            assert [t.token_id for t in lp.top] == ref[i].topk(2).indices.tolist()
        assert responses[-1].usage.cached_tokens == 0  # computed, not taken from the cache
        worker = cluster.decodes[0].worker
        assert (worker.num_local_prefills, worker.num_remote_prefills) == (1, 1)
        pool = cluster.scheduler.pool
        assert all(w.healthy for w in pool.workers.values())
        await cluster.wait_idle()
    finally:
        await cluster.stop()
