"""An 8-bit KV cache across prefill and decode workers: the packed blocks and their scales arrive
bit for bit over both transports, and a prefill worker whose KV type differs refuses the request
(FAILED_PRECONDITION naming TANDEM_KV_CACHE_DTYPE), after which the decode worker prefills locally."""

from __future__ import annotations

import grpc
import pytest
import torch

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.pb.tandem.v1 import common_pb2, kv_pb2, worker_pb2, worker_pb2_grpc
from tests.helpers.models import make_tiny_checkpoint

from .cluster import BLOCK_SIZE, NUM_BLOCKS, start_cluster, token_ids
from .test_disaggregated import _spy_kv

PROMPT = [1, *range(40, 85)]


@pytest.fixture(scope="module")
def model_32(tmp_path_factory):
    """head_dim 32: the smallest an 8-bit cache takes."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-kv8"), hidden=128, heads=4, kv_heads=2)


def _reference(model, kv: str, max_tokens: int) -> list[int]:
    engine = LLMEngine(EngineConfig(model=str(model), num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE,
                                    kv_cache_dtype=kv))
    return engine.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))[0]


@pytest.mark.parametrize("transport,kv", [("grpc", "fp8"), ("collective", "fp8"), ("grpc", "int8"),
                                          ("collective", "int8")])
async def test_8bit_kv_and_its_scales_move_bit_for_bit(model_32, transport, kv):
    both = {"kv_cache_dtype": kv}
    cluster = await start_cluster(model_32, transport=transport, decode_overrides=both, prefill_overrides=both)
    sent, landed = _spy_kv(cluster)
    try:
        responses = await cluster.generate(prompt=PROMPT, max_tokens=10)
        assert token_ids(responses) == _reference(model_32, kv, 10)
        assert cluster.decodes[0].worker.num_remote_prefills == 1
        (rid, kv_sent), = sent.items()
        assert kv_sent.dtype == (torch.uint8 if kv == "fp8" else torch.int8) and kv_sent.shape[-1] == 33
        assert torch.equal(landed[rid].view(torch.uint8), kv_sent.view(torch.uint8))
        await cluster.wait_idle()
    finally:
        await cluster.stop()


async def test_kv_type_mismatch_is_refused_and_the_decode_worker_prefills_locally(model_32):
    cluster = await start_cluster(model_32, prefill_overrides={"kv_cache_dtype": "fp8"})
    try:
        prefill = worker_pb2_grpc.PrefillStub(cluster._channel(cluster.prefills[0].address))
        call = prefill.Prefill(worker_pb2.PrefillRequest(
            request_id="direct", prompt_token_ids=PROMPT, sampling=common_pb2.SamplingParameters(),
            kv_target=kv_pb2.KvTarget(transport=kv_pb2.KV_TRANSPORT_GRPC, kv_cache_dtype="float32")))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "TANDEM_KV_CACHE_DTYPE" in err.value.details() and "fp8" in err.value.details()
        # through the scheduler: the decode worker (float32 KV) falls back to its own prefill
        responses = await cluster.generate(prompt=PROMPT, max_tokens=8)
        assert token_ids(responses) == _reference(model_32, "auto", 8)
        decode = cluster.decodes[0].worker
        assert (decode.num_prefill_fallbacks, decode.num_remote_prefills) == (1, 0)
        await cluster.wait_idle()
    finally:
        await cluster.stop()
