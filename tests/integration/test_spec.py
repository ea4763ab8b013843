"""Speculative decoding through the services: the draft service (or n-gram lookup) changes how
many tokens a step yields, never which tokens a greedy request gets; usage reports the counts,
KV blocks come back on decode and draft, and a draft restart only pauses speculation."""

from __future__ import annotations

import asyncio
import time

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.draft.app import DraftApp
from shared.config import DraftConfig, from_env
from shared.pb.tandem.v1 import common_pb2, generate_pb2
from shared.telemetry import TelemetryConfig, setup_telemetry
from tests.helpers.models import make_tiny_checkpoint

from .cluster import BLOCK_SIZE, make_request, start_cluster, token_ids

# (prompt, max_tokens, per-request k): mixed lengths, one request with speculation off
REQUESTS = [
    ([1, 7], 24, None),
    ([1, *range(40, 85)], 33, None),
    ([1, *range(100, 130)], 6, 2),
    ([1, 30, 31, 32, 30, 31, 32, 30, 31], 28, None),
    ([1, *range(200, 290)], 40, None),
    ([1, *range(60, 75)], 20, 0),
]


@pytest.fixture(scope="module")
def draft_model(tmp_path_factory):
    """The target's weights drawn with a smaller scale: agrees with it often, not always."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-draft"), std=0.07)


def draft_app(model, port: int = 0, telemetry=None) -> DraftApp:
    config = from_env(
        DraftConfig,
        env={},
        overrides=dict(
            model=str(model),
            host="127.0.0.1",
            port=port,
            num_blocks=64,
            block_size=BLOCK_SIZE,
            grace_period_s=0.2,
        ),
    )
    return DraftApp(config, telemetry=telemetry)


async def start_draft(model, port: int = 0, telemetry=None) -> DraftApp:
    app = draft_app(model, port, telemetry)
    await app.start()
    return app


async def wait_draft_idle(cluster, draft: DraftApp, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        load = await cluster.load(draft)
        if load.num_running == 0 and load.num_free_blocks == load.num_total_blocks:
            return
        assert loop.time() < deadline, f"draft not idle: {load}"
        await asyncio.sleep(0.02)


async def generate_all(cluster, requests) -> list[list[generate_pb2.GenerateResponse]]:
    async def one(prompt, max_tokens, k):
        extra = {} if k is None else {"num_speculative_tokens": k}
        return [
            r
            async for r in cluster.stub.Generate(make_request(prompt=prompt, max_tokens=max_tokens, **extra))
        ]

    return await asyncio.gather(*(one(*r) for r in requests))


def check_usage(usage: common_pb2.Usage, k: int | None) -> None:
    if k == 0:
        assert (usage.spec_proposed_tokens, usage.spec_verify_steps) == (0, 0)
        return
    assert usage.spec_verify_steps > 0 and usage.spec_proposed_tokens > 0
    assert usage.spec_accepted_tokens <= usage.spec_proposed_tokens <= (k or 4) * usage.spec_verify_steps
    # every verification step yields its accepted drafts plus one token; other steps one token
    assert usage.spec_accepted_tokens + usage.spec_verify_steps <= usage.completion_tokens
    assert usage.spec_mean_accepted_length == pytest.approx(
        usage.spec_accepted_tokens / usage.spec_verify_steps, rel=1e-6
    )


@pytest.mark.parametrize(
    "ahead, transport",
    [(True, "stream"), (False, "stream"), (False, "grpc")],
    ids=["drafting-ahead", "propose-on-the-stream", "propose-over-grpc"],
)
async def test_greedy_with_draft_service_equals_plain_decoding(tiny_model, draft_model, reference, ahead, transport):
    draft = await start_draft(draft_model)
    # a generous draft deadline: on a loaded machine a missed one would (correctly) skip speculation
    decode = dict(draft_addr=draft.address, draft_timeout_s=30.0, draft_ahead=ahead, draft_transport=transport)
    cluster = await start_cluster(tiny_model, decode_overrides=decode)
    try:
        results = await generate_all(cluster, REQUESTS)
        # Propose goes on the draft's stream unless asked for gRPC; ProposeAhead is gRPC's
        assert cluster.decodes[0].proposer.transport == ("stream" if transport == "stream" and not ahead else "grpc")
        for (prompt, max_tokens, k), responses in zip(REQUESTS, results, strict=True):
            assert token_ids(responses) == reference(prompt, max_tokens), (len(prompt), k)
            check_usage(responses[-1].usage, k)
        usages = [r[-1].usage for r in results]
        proposed = sum(u.spec_proposed_tokens for u in usages)
        accepted = sum(u.spec_accepted_tokens for u in usages)
        assert 0 < accepted < proposed  # the draft is right sometimes, and wrong sometimes
        registry = cluster.decodes[0].telemetry.metrics.registry
        assert registry.get_sample_value("tandem_spec_proposed_tokens_total") == proposed
        assert registry.get_sample_value("tandem_spec_accepted_tokens_total") == accepted
        # every draft call was timed: one per speculating step, plus the prefetched calls whose
        # step asked for another batch (a request arrived meanwhile)
        calls = registry.get_sample_value("tandem_spec_draft_call_seconds_count")
        proposer = cluster.decodes[0].proposer
        assert proposer.num_calls == calls
        calls -= proposer.num_unused
        assert calls >= max(1, sum(u.spec_verify_steps for u in usages) // len(usages))
        assert registry.get_sample_value("tandem_spec_draft_call_seconds_sum") > 0
        # drafting ahead: some steps found their outcome drafted already, and took it without waiting
        foreseen = registry.get_sample_value("tandem_spec_draft_foreseen_calls_total")
        assert foreseen == proposer.num_foreseen and (foreseen > 0) == ahead
        assert draft.servicer.num_calls == proposer.num_calls
        # the steps by the k the policy chose reach /metrics through the worker's stats sampler
        for _ in range(50):
            by_k = [registry.get_sample_value("tandem_spec_steps_total", {"k": str(k)}) or 0 for k in range(17)]
            if sum(by_k[1:]) >= calls:
                break
            await asyncio.sleep(0.1)
        assert sum(by_k[1:]) >= calls
        await cluster.wait_idle()
        await wait_draft_idle(cluster, draft)
    finally:
        await cluster.stop()
        await draft.stop(0.2)


async def test_greedy_with_ngram_equals_plain_decoding(tiny_model, reference):
    cluster = await start_cluster(
        tiny_model, num_prefill=0, decode_overrides=dict(spec_proposer="ngram", num_speculative_tokens=3)
    )
    try:
        results = await generate_all(cluster, REQUESTS)
        for (prompt, max_tokens, _), responses in zip(REQUESTS, results, strict=True):
            assert token_ids(responses) == reference(prompt, max_tokens)
        assert results[-1][-1].usage.spec_proposed_tokens == 0  # k = 0: off
        assert sum(r[-1].usage.spec_proposed_tokens for r in results) > 0
        await cluster.wait_idle()
    finally:
        await cluster.stop()


async def test_sampled_requests_with_the_draft_carry_its_distribution(tiny_model, draft_model):
    draft = await start_draft(draft_model)
    cluster = await start_cluster(
        tiny_model, num_prefill=0, decode_overrides=dict(draft_addr=draft.address, draft_timeout_s=30.0)
    )
    try:
        requests = [
            make_request(prompt=[1, *range(40, 60)], max_tokens=24, temperature=0.8, top_k=50, seed=7),
            make_request(
                prompt=[1, 9, 10], max_tokens=16, temperature=1.0, top_p=0.9, repetition_penalty=1.2
            ),
        ]

        async def run(request):
            return [r async for r in cluster.stub.Generate(request)]

        results = await asyncio.gather(*(run(q) for q in requests))
        for responses, req in zip(results, requests, strict=True):
            assert len(token_ids(responses)) == req.stopping.max_tokens
            check_usage(responses[-1].usage, None)
        # a seeded request is reproducible with the same draft
        again = [r async for r in cluster.stub.Generate(requests[0])]
        assert token_ids(again) == token_ids(results[0])
        await cluster.wait_idle()
        await wait_draft_idle(cluster, draft)
    finally:
        await cluster.stop()
        await draft.stop(0.2)


async def test_draft_restart_pauses_speculation_only(tiny_model, draft_model, reference):
    """The draft goes away mid-generation and comes back on the same port with no state: the
    stream completes unchanged, and speculation resumes (the sequence is rebuilt)."""
    draft = await start_draft(draft_model)
    replacement = draft_app(draft_model, port=draft.server.port)  # model loaded now: starts at once
    decode = dict(draft_addr=draft.address, draft_timeout_s=30.0, draft_retry_s=0.05)
    cluster = await start_cluster(tiny_model, num_prefill=0, decode_overrides=decode)
    proposer = cluster.decodes[0].proposer
    engine = cluster.decodes[0].aengine.engine
    step = engine.step

    def slow_step():  # a few ms per step: the stream outlasts the draft's reconnection
        time.sleep(0.005)
        return step()

    engine.step = slow_step
    prompt, max_tokens = [1, *range(40, 60)], 300
    restarted = False
    try:
        call = cluster.stub.Generate(make_request(prompt=prompt, max_tokens=max_tokens))
        got: list[int] = []
        async for resp in call:
            got += resp.token_ids
            if draft is not None and len(got) >= 10:
                await draft.stop(0)
                draft = None
            elif not restarted and draft is None and proposer.num_failures:
                await replacement.start()
                restarted = True
        assert got == reference(prompt, max_tokens)
        assert restarted and replacement.servicer.num_proposed > 0
        # found the new draft's stream (another port than the old one's)
        assert proposer.transport == "stream" and proposer._stream.address.endswith(f":{replacement.stream.port}")
        assert resp.usage.spec_verify_steps > 0
        await cluster.wait_idle()
        await wait_draft_idle(cluster, replacement)
    finally:
        await cluster.stop()
        if draft is not None:
            await draft.stop(0.2)
        if restarted:
            await replacement.stop(0.2)


@pytest.mark.parametrize("ahead", [False, True], ids=["propose", "drafting-ahead"])
async def test_draft_call_is_traced_across_services(tiny_model, draft_model, ahead):
    exporter = InMemorySpanExporter()

    def telemetry(name):
        return setup_telemetry(
            TelemetryConfig(service_name=name),
            set_global=False,
            configure_logs=False,
            span_processors=[SimpleSpanProcessor(exporter)],
        )

    draft = await start_draft(draft_model, telemetry=telemetry("tandem-draft"))
    cluster = await start_cluster(
        tiny_model,
        num_prefill=0,
        decode_overrides=dict(draft_addr=draft.address, draft_timeout_s=30.0, draft_ahead=ahead),
        telemetry=telemetry,
    )
    try:
        request = make_request(prompt=[1, *range(40, 60)], max_tokens=6)
        request.request_id = "traced"
        responses = [r async for r in cluster.stub.Generate(request)]
        assert len(token_ids(responses)) == 6
    finally:
        await cluster.stop()
        await draft.stop(0.2)
    spans = exporter.get_finished_spans()
    client = [s for s in spans if s.name == "draft propose"]
    # greedy, one sequence: with TANDEM_DRAFT_AHEAD every call drafts ahead
    server = [s for s in spans if s.name == ("tandem.v1.Draft/ProposeAhead" if ahead else "tandem.v1.Draft/Propose")]
    assert client and server
    assert client[0].attributes["tandem.request_ids"] == "traced"
    assert "tandem.spec_proposed" in client[0].attributes
    assert all(("tandem.spec_branches" in s.attributes) == ahead for s in server)
    assert all("tandem.foreseen" in s.attributes for s in client)
    # the plain Propose went on the draft's stream, with the same SERVER span as over gRPC
    assert all(s.attributes.get("tandem.transport") == (None if ahead else "stream") for s in client)
    # the decode worker prefilled the prompt itself: its first draft call went out as that step ended
    assert client[0].attributes["tandem.prefetched"] is True
    assert {s.context.trace_id for s in server} <= {s.context.trace_id for s in client}


async def test_slow_draft_misses_its_deadline_and_decoding_goes_on(tiny_model, draft_model, reference):
    draft = await start_draft(draft_model)
    propose = draft.engine.propose

    def slow_propose(asks):
        time.sleep(0.3)
        return propose(asks)

    draft.engine.propose = slow_propose
    decode = dict(draft_addr=draft.address, draft_timeout_s=0.05, draft_retry_s=0.2)
    cluster = await start_cluster(tiny_model, num_prefill=0, decode_overrides=decode)
    try:
        results = await generate_all(cluster, REQUESTS[:3])
        for (prompt, max_tokens, _), responses in zip(REQUESTS[:3], results, strict=True):
            assert token_ids(responses) == reference(prompt, max_tokens)
        proposer = cluster.decodes[0].proposer
        assert proposer.num_failures >= 1
        assert proposer.num_calls < 20  # backed off rather than waiting out every step
        await cluster.wait_idle()
    finally:
        await cluster.stop()
        await draft.stop(0.2)


async def test_greedy_with_the_draft_in_the_decode_worker_equals_plain_decoding(tiny_model, draft_model, reference):
    """TANDEM_DRAFT_MODEL: the draft model runs inside the decode worker (no draft service), with
    the same delta protocol, and frees every sequence it held once the requests end."""
    decode = dict(draft_model=str(draft_model), draft_kv_cache_memory=4 << 20)
    cluster = await start_cluster(tiny_model, decode_overrides=decode)
    try:
        worker = cluster.decodes[0]
        assert worker.proposer is not None and worker.proposer.address == "in-process"
        results = await generate_all(cluster, REQUESTS)
        for (prompt, max_tokens, k), responses in zip(REQUESTS, results, strict=True):
            assert token_ids(responses) == reference(prompt, max_tokens), (len(prompt), k)
            check_usage(responses[-1].usage, k)
        usages = [r[-1].usage for r in results]
        assert 0 < sum(u.spec_accepted_tokens for u in usages) < sum(u.spec_proposed_tokens for u in usages)
        assert worker.proposer.num_failures == 0
        await cluster.wait_idle()
        engine = worker.proposer.local.engine
        deadline = time.monotonic() + 10
        while engine.stats().num_sequences and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        stats = engine.stats()
        assert stats.num_sequences == 0 and stats.num_free_blocks == stats.num_total_blocks
    finally:
        await cluster.stop()


async def test_a_prefetched_draft_call_serves_its_batch_or_is_taken_into_the_bookkeeping(draft_model):
    """The decode worker sends the next step's call early (prefetch). Asked for that batch, the
    answer is used as it is; asked for another, the answer still moves the draft's copies, so
    the next call's deltas match them; a release while a call is out waits for it, and frees
    everything on the draft."""
    from services.common.telemetry import quiet_telemetry
    from services.decode.draft_client import DraftProposer
    from shared.engine.spec import ProposalRequest
    from shared.params import SamplingParams

    draft = await start_draft(draft_model)
    telemetry = quiet_telemetry("t")

    def proposer() -> DraftProposer:
        return DraftProposer(draft.address, vocab_size=draft.engine.vocab_size, timeout_s=30.0, retry_s=1.0,
                             telemetry=telemetry)

    def asks(*seqs):
        greedy = SamplingParams(temperature=0.0, max_tokens=64)
        return [ProposalRequest(rid, tokens, k, greedy) for rid, tokens, k in seqs]

    def drafts(proposals):
        return {rid: p.token_ids for rid, p in proposals.items()}

    async def call(fn, *args):  # the proposer blocks: off the loop the draft serves from
        return await asyncio.to_thread(fn, *args)

    early, plain = proposer(), proposer()
    a, b = [1, *range(20, 40)], [1, *range(50, 60)]
    try:
        await call(early.prefetch, asks(("a", a, 3)))
        got = await call(early.propose, asks(("a", a, 3)))
        assert (early.num_calls, early.num_unused) == (1, 0)
        assert drafts(got) == drafts(await call(plain.propose, asks(("a", a, 3))))

        a = a + got["a"].token_ids[:1] + [7]  # one draft accepted, then a token it did not propose
        await call(early.prefetch, asks(("a", a, 3)))
        got = await call(early.propose, asks(("a", a, 3), ("b", b, 2)))  # b arrived meanwhile
        assert (early.num_calls, early.num_unused) == (3, 1)
        assert drafts(got) == drafts(await call(plain.propose, asks(("a", a, 3), ("b", b, 2))))

        a, b = a + got["a"].token_ids, b + got["b"].token_ids[:1] + [9]
        await call(early.prefetch, asks(("a", a, 2), ("b", b, 2)))
        for rid in ("a", "b"):
            await call(early.release, rid)
        for rid in ("a", "b"):
            await call(plain.release, rid)
        assert early.num_unused == 2 and early.num_failures == 0
        assert draft.engine.stats().num_sequences == 0
    finally:
        early.close()
        plain.close()
        await draft.stop(0.2)
