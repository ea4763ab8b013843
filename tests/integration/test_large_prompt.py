"""A huge prompt must not stall the scheduler for everyone else.

The scheduler tokenizes long texts in a worker process, refuses
a text too large for the model length before tokenizing it, and refuses a request over
TANDEM_MAX_REQUEST_BYTES with INVALID_ARGUMENT naming the limit. Each test sends the big request
while small ones run and holds the small ones to their latency alone plus a generous second
(the test machine is shared and loaded)."""

from __future__ import annotations

import asyncio
import statistics
import time

import grpc
import pytest

from services.scheduler.validation import text_byte_limit
from tests.helpers.models import make_tiny_checkpoint
from tests.helpers.tokenizers import training_lines

from .cluster import make_request, start_cluster

MAX_MODEL_LEN = 32768
MAX_REQUEST_BYTES = 12 << 20
SLACK_S = 1.0


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """A tiny model that claims 32768 positions, so that a text of megabytes passes the byte bound."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("long-llama"), max_positions=MAX_MODEL_LEN)


@pytest.fixture
async def cluster(long_model):
    c = await start_cluster(
        long_model,
        num_prefill=0,
        decode_overrides=dict(num_blocks=MAX_MODEL_LEN // 16),  # 16 MB: the cache holds one full-length sequence
        scheduler_overrides=dict(max_request_bytes=MAX_REQUEST_BYTES),
    )
    yield c
    await c.stop()


def ascii_text(num_bytes: int) -> str:
    base = "".join(training_lines()).encode("ascii", "ignore").decode()
    return (base * (num_bytes // len(base) + 1))[:num_bytes]


async def small_request_seconds(cluster) -> float:
    start = time.perf_counter()
    responses = await cluster.generate(prompt="hello world", max_tokens=4)
    assert sum(len(r.token_ids) for r in responses) == 4
    return time.perf_counter() - start


async def while_running(cluster, big: asyncio.Task) -> tuple[list[float], int]:
    """Small requests one after another for as long as `big` runs (at least three): their
    latencies, and how many of them ended while `big` was still running."""
    seconds, overlapped = [], 0
    while not big.done() or len(seconds) < 3:
        seconds.append(await small_request_seconds(cluster))
        overlapped += not big.done()
    return seconds, overlapped


async def baseline(cluster) -> float:
    await small_request_seconds(cluster)  # warm up the channel
    return statistics.median([await small_request_seconds(cluster) for _ in range(5)])


async def refused(cluster, request) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.generate(**request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    return err.value


async def test_tokenizing_a_huge_prompt_does_not_block_small_requests(cluster):
    alone = await baseline(cluster)
    limit = text_byte_limit(MAX_MODEL_LEN, cluster.scheduler.tokenizer.max_token_bytes)
    text = ascii_text(limit - 1000)  # passes the byte bound: the scheduler has to tokenize it (seconds)
    big = asyncio.create_task(refused(cluster, dict(prompt=text, max_tokens=1)))
    await asyncio.sleep(0.1)  # sent, and being tokenized
    seconds, overlapped = await while_running(cluster, big)
    err = await big
    # tokenized on the event loop, the big request would end before any small one could
    assert overlapped >= 3, (overlapped, seconds)
    # refused only once its tokens were counted: far more than the model length
    assert err.details().startswith("prompt: prompt (") and f"model length {MAX_MODEL_LEN}" in err.details()
    assert max(seconds) < alone + SLACK_S, (alone, seconds)


async def test_a_text_beyond_the_model_length_is_refused_before_tokenizing(cluster):
    alone = await baseline(cluster)
    limit = text_byte_limit(MAX_MODEL_LEN, cluster.scheduler.tokenizer.max_token_bytes)
    text = ascii_text(10 << 20)  # 10 MB: many seconds of tokenizing, were it tokenized
    assert len(text) > limit and len(text) < MAX_REQUEST_BYTES
    big = asyncio.create_task(refused(cluster, dict(prompt=text, max_tokens=1)))
    seconds, _ = await while_running(cluster, big)
    err = await big
    assert err.details().startswith("text: ") and f"the limit is {limit} bytes" in err.details()
    assert max(seconds) < alone + SLACK_S, (alone, seconds)


@pytest.mark.parametrize("prompt", ["text", "token_ids"])
async def test_a_request_over_the_size_limit_is_invalid_argument_naming_it(cluster, prompt):
    alone = await baseline(cluster)
    if prompt == "text":
        request = dict(prompt=ascii_text(MAX_REQUEST_BYTES + 1))
    else:  # ~5 bytes per id on the wire
        request = dict(prompt=[2**31] * (MAX_REQUEST_BYTES // 4))
    assert make_request(**request).ByteSize() > MAX_REQUEST_BYTES
    big = asyncio.create_task(refused(cluster, request))
    seconds, _ = await while_running(cluster, big)
    err = await big
    assert err.details().startswith("request: ") and str(MAX_REQUEST_BYTES) in err.details()
    assert "TANDEM_MAX_REQUEST_BYTES" in err.details()
    assert max(seconds) < alone + SLACK_S, (alone, seconds)
    await cluster.wait_idle()
