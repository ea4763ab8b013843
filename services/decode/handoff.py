"""How a prompt prefilled on a peer reaches this decode worker: the KV hand-off strategies.

Both send the peer one Prefill call and read its stream to the `PrefillResult`:
- `TensorHandoff` (engines whose KV_HANDOFF is "tensors", i.e. the torch engine): the peer
  ships the prompt's KV into our reservation, as checksummed gRPC chunks on that stream
  (transport "grpc") or over a torch.distributed pair group whose metadata the stream carries
  (transport "collective"); pieces are imported as they arrive (kv_import.py).
- `EngineHandoff` (KV_HANDOFF "engine", i.e. TensorRT-LLM): the stream carries only the
  engine's opaque handoff; the engine pulls the KV itself when the request is added.
Any trouble with the peer before decoding started is PrefillPeerUnavailable: the decode
worker then prefills locally. This module knows the peer call's protobuf, nothing of engines
beyond the engine interface.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Protocol

import grpc

from services.common.errors import Unavailable
from services.common.server import CHANNEL_OPTIONS
from services.common.tls import PLAINTEXT, Tls
from shared.engine import EngineClient, Reservation
from shared.kv.chunks import KvChunk
from shared.kv.collective import TransferMeta
from shared.kv.collective_receiver import CollectiveKvReceiver
from shared.kv.errors import KvShapeMismatch, KvTransferError, KvTransferTimeout
from shared.pb.tandem.v1 import common_pb2, kv_pb2, worker_pb2, worker_pb2_grpc

from .kv_import import KvImporter


@dataclass
class PrefillOutcome:
    first_token_id: int
    first_logprob: common_pb2.TokenLogprob | None
    num_cached_tokens: int
    kv_bytes: int = 0
    kv_seconds: float = 0.0  # first KV piece received to the last one imported
    handoff: bytes = b""  # EngineHandoff: the engine's own


@dataclass
class PeerJob:
    """One prefill to ask of a peer."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_pb: common_pb2.SamplingParameters
    peer: str  # host:port
    timeout_s: float | None  # what is left of the caller's deadline


class PrefillPeerUnavailable(Exception):
    """The prefill peer failed, or its KV cannot be trusted, before the request started
    decoding: it died or stopped, failed, stalled past TANDEM_KV_TIMEOUT_S, sent a chunk that
    failed its checksum, too few chunks, or KV of the wrong shape. Nothing was emitted and the
    reservation is freed (the bad KV never reached the prefix cache): prefilling locally is safe."""


class PrefillPeers:
    """Channels to prefill workers, opened on first use and kept."""

    def __init__(self, interceptors=(), tls: Tls = PLAINTEXT) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._interceptors = list(interceptors)
        self._tls = tls

    def stub(self, address: str) -> worker_pb2_grpc.PrefillStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self._tls.aio_channel(
                address, options=CHANNEL_OPTIONS, interceptors=self._interceptors
            )
        return worker_pb2_grpc.PrefillStub(channel)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels.values()), return_exceptions=True)
        self._channels.clear()


class KvHandoff(Protocol):
    transport: str  # the kv_transport label of spans and metrics

    async def fetch(self, job: PeerJob, reservation: Reservation) -> PrefillOutcome:
        """Have the peer prefill the prompt; on return the KV is (or can be) in this engine."""
        ...


class TensorHandoff:
    def __init__(
        self,
        engine: EngineClient,
        peers: PrefillPeers,
        *,
        transport: str,
        chunk_bytes: int,
        kv_timeout_s: float,
        receiver: CollectiveKvReceiver | None = None,
    ):
        self._engine = engine
        self._peers = peers
        self._receiver = receiver
        self.transport = "collective" if transport == "collective" and receiver is not None else "grpc"
        self._chunk_bytes = chunk_bytes
        self._kv_timeout_s = kv_timeout_s
        info = engine.info()
        # payload geometry and type as the engine exports them (8-bit caches: packed rows with their scales)
        self._kv_geometry = (info.num_layers, 2, info.num_kv_heads, info.kv_width or info.head_dim)
        self._kv_dtype = info.kv_dtype

    async def fetch(self, job: PeerJob, reservation: Reservation) -> PrefillOutcome:
        # the prefill worker refuses the request when its KV type is not ours
        target = kv_pb2.KvTarget(max_chunk_bytes=self._chunk_bytes, kv_cache_dtype=self._kv_dtype)
        if self.transport == "collective":
            target.transport = kv_pb2.KV_TRANSPORT_COLLECTIVE
            target.receiver_address = self._receiver.address
            # one pair group per (prefill peer, this decode worker): the receiver is ours alone
            target.pair_name = f"prefill@{job.peer}"
        else:
            target.transport = kv_pb2.KV_TRANSPORT_GRPC
        num_layers, two, num_kv_heads, head_dim = self._kv_geometry
        shape = (num_layers, two, len(job.prompt_token_ids), num_kv_heads, head_dim)
        importer = KvImporter(
            self._engine, reservation, shape, self._kv_dtype, self._receiver, timeout_s=self._kv_timeout_s
        )
        call = self._peers.stub(job.peer).Prefill(_request(job, target), timeout=job.timeout_s)
        peer = job.peer
        try:
            while True:
                # a stalled peer (or transfer) fails the prefill after TANDEM_KV_TIMEOUT_S of silence
                try:
                    msg = await asyncio.wait_for(call.read(), self._kv_timeout_s)
                except asyncio.TimeoutError:
                    raise KvTransferTimeout(f"nothing from {peer} for {self._kv_timeout_s:.0f}s") from None
                if msg is grpc.aio.EOF:
                    raise PrefillPeerUnavailable(f"{peer} ended its stream without a result")
                kind = msg.WhichOneof("kind")
                if kind == "kv_chunk":
                    importer.add_chunk(chunk_from_pb(msg.kv_chunk))
                elif kind == "kv_meta":
                    await importer.add_collective(meta_from_pb(msg.kv_meta))
                elif kind == "result":
                    await importer.finish()  # raises unless every piece arrived and passed its checksum
                    r = msg.result
                    if r.num_prompt_tokens and r.num_prompt_tokens != len(job.prompt_token_ids):
                        raise KvShapeMismatch(
                            f"{peer} prefilled {r.num_prompt_tokens} tokens, the prompt has "
                            f"{len(job.prompt_token_ids)}"
                        )
                    # the result is the last message: let the call end with its own status rather
                    # than cancel it on the way out (a cancelled call is traced as CANCELLED)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(call.code(), self._kv_timeout_s)
                    return PrefillOutcome(
                        r.first_token_id,
                        r.first_logprob if r.HasField("first_logprob") else None,
                        r.num_cached_tokens,
                        importer.num_bytes,
                        importer.seconds,
                    )
        except grpc.aio.AioRpcError as e:
            # whatever the peer's trouble (down, stopping, failed, even refusing the request the
            # engine here accepted), this worker can still prefill the prompt itself
            raise PrefillPeerUnavailable(f"{peer}: {e.code().name}: {e.details()}") from None
        except (KvTransferError, ValueError) as e:  # ValueError: a piece outside the reservation
            raise PrefillPeerUnavailable(f"KV from {peer} rejected: {type(e).__name__}: {e}") from None
        finally:
            call.cancel()  # the peer aborts and frees its blocks
            await importer.close()  # no import may land after the reservation is freed


class EngineHandoff:
    """The engine moves the KV (TensorRT-LLM's cache transceiver): only its handoff travels."""

    transport = "trtllm"

    def __init__(self, peers: PrefillPeers):
        self._peers = peers

    async def fetch(self, job: PeerJob, reservation: Reservation) -> PrefillOutcome:
        target = kv_pb2.KvTarget()  # unused: the engines move the KV between themselves
        call = self._peers.stub(job.peer).Prefill(_request(job, target), timeout=job.timeout_s)
        try:
            async for msg in call:
                if msg.WhichOneof("kind") == "result":
                    r = msg.result
                    if not r.engine_handoff:
                        raise Unavailable(
                            f"prefill peer {job.peer} sent no engine handoff: every prefill and decode "
                            "worker must run the same TANDEM_ENGINE"
                        )
                    return PrefillOutcome(
                        r.first_token_id,
                        r.first_logprob if r.HasField("first_logprob") else None,
                        r.num_cached_tokens,
                        handoff=r.engine_handoff,
                    )
            raise Unavailable(f"prefill peer {job.peer} ended its stream without a result")
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:  # nothing was prefilled for us yet
                raise PrefillPeerUnavailable(e.details()) from None
            raise
        finally:
            call.cancel()


def _request(job: PeerJob, target: kv_pb2.KvTarget) -> worker_pb2.PrefillRequest:
    return worker_pb2.PrefillRequest(
        request_id=job.request_id,
        prompt_token_ids=job.prompt_token_ids,
        sampling=job.sampling_pb,
        kv_target=target,
    )


def chunk_from_pb(c: kv_pb2.KvChunk) -> KvChunk:
    s = c.slice
    return KvChunk(
        index=c.index,
        total=c.total,
        layer_start=s.layer_start,
        layer_end=s.layer_start + s.num_layers,
        token_start=s.token_start,
        token_end=s.token_start + s.num_tokens,
        dtype=s.dtype,
        shape=tuple(s.shape),
        data=c.data,
        crc32=c.crc32,
    )


def meta_from_pb(m: kv_pb2.KvCollectiveMeta) -> TransferMeta:
    return TransferMeta(
        transfer_id=m.transfer_id,
        pair_name=m.pair_name,
        epoch=m.epoch,
        seq=m.seq,
        shape=tuple(m.slice.shape),
        dtype=m.slice.dtype,
        nbytes=m.nbytes,
        checksum=m.checksum,
        checksum_kind=m.checksum_kind,
    )
