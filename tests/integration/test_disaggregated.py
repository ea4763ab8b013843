"""Generate through scheduler -> decode -> prefill equals the single-process engine."""

from __future__ import annotations

import pytest

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
