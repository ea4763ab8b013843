"""A request moved to another decode worker mid-stream (scheduler relay): what the resumed job asks."""

from __future__ import annotations

from services.scheduler.relay import Job
from shared.pb.tandem.v1 import common_pb2


def test_a_resumed_job_continues_where_the_client_is_and_asks_no_prompt_logprobs_again():
    job = Job(
        "r",
        [1, 2, 3],
        common_pb2.SamplingParameters(seed=7, seed_offset=1, prompt_logprobs=2),
        common_pb2.StoppingCriteria(max_tokens=10),
        [],
    )
    assert job.full_prefill
    resumed = job.resumed([5, 6], attempt=1)
    assert resumed.request_id == "r~1" and resumed.prompt_token_ids == [1, 2, 3, 5, 6]
    assert resumed.stopping.max_tokens == 8 and resumed.sampling.seed_offset == 3
    # the first response, which carried the prompt's logprobs, already reached the client
    assert not resumed.sampling.HasField("prompt_logprobs") and not resumed.full_prefill
    assert job.sampling.prompt_logprobs == 2  # the original is untouched
