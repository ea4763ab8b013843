"""The engine interface: everything a prefill or decode worker may ask of an engine.

Two engines implement `EngineClient`: Tandem's own (`shared.engine.AsyncEngine`) and
TensorRT-LLM's (`shared.engines.trtllm.TrtllmEngine`). A service holds an `EngineClient` and
uses nothing else of the engine; the typed dataclasses below are all that cross. No grpc, no
protobuf, no torch at import time.

Disaggregation in the engine's terms:

  prefill worker   prefill(request_id, prompt, params) -> PrefillOutput
                     samples the first token only (EOS and stop tokens ignored: whether it ends
                     the request is the decode side's call) and then either
                     - exports the prompt's KV and releases its blocks ("export and release";
                       PrefillOutput.kv, a tensor), or
                     - keeps the KV for the engine's own transfer (PrefillOutput.handoff, bytes).
  decode worker    reserve(request_id, prompt, params) -> Reservation | None (None: no room)
                   import_kv(reservation, pieces)    KV that travelled as tensors
                   add_prefilled(reservation, first, handoff) -> Prefilled
                   release(reservation)              on any failure or cancel before the end

How the KV travels is a strategy of the services (services/decode/handoff.py), chosen by
`EngineInfo.kv_handoff`: KV_HANDOFF_TENSORS (gRPC chunks, or a torch.distributed collective;
shared/kv) or KV_HANDOFF_ENGINE (the engine moves it itself from the handoff bytes:
TensorRT-LLM's cache transceiver).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from shared.params import FinishReason, RequestOutput, SamplingParams, TokenLogprobs

if TYPE_CHECKING:
    from .engine import EngineStats
    from .spec import Proposer

KV_HANDOFF_TENSORS = "tensors"  # the KV leaves the prefill engine as a tensor (shared/kv moves it)
KV_HANDOFF_ENGINE = "engine"  # the engine moves the KV itself; opaque handoff bytes travel instead


@dataclass(frozen=True)
class EngineInfo:
    """What the engine serves, and the KV geometry a peer's KV must have."""

    model_name: str
    vocab_size: int
    max_model_len: int
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: str  # dtype name of the KV tensors that travel ("bfloat16", ..., or "fp8" / "int8": 8-bit caches)
    eos_token_ids: tuple[int, ...] = ()
    kv_handoff: str = KV_HANDOFF_TENSORS
    kv_width: int = 0  # last dim of the KV tensors that travel; 0: head_dim (8-bit caches: head_dim + head_dim / 32)


@dataclass
class PrefillOutput:
    """The context phase of one request on a prefill worker."""

    first: RequestOutput  # the first token (with its logprobs), finished
    kv: Any = None  # torch.Tensor [num_layers, 2, num_prompt_tokens, num_kv_heads, head_dim], blocks released
    handoff: bytes = b""  # KV_HANDOFF_ENGINE: what the decode side's engine needs to pull the KV


@dataclass
class KvPieceIn:
    """One piece of a prompt's KV arriving on the decode side."""

    tensor: Any  # [n_layers, 2, n_tokens, num_kv_heads, head_dim]
    layer_start: int = 0
    token_start: int = 0


@dataclass
class Reservation:
    """Room for one prefilled request on the decode side; `handle` is the engine's own."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    handle: Any = field(default=None, repr=False)


@dataclass
class FirstToken:
    """The prefill worker's first token of a request."""

    token_id: int
    logprob: TokenLogprobs | None = None
    num_cached_tokens: int = 0  # prompt tokens the prefill worker found in its prefix cache


@dataclass
class Prefilled:
    """A prefilled request added to the decode engine.

    `finish` is set when the first token already ended it (the reservation is then freed and
    `outputs` yields nothing); otherwise `outputs` streams from the *second* token on."""

    finish: FinishReason | None
    outputs: AsyncIterator[RequestOutput]


class EngineClient(Protocol):
    """The asyncio surface of an engine, as the services use it."""

    def info(self) -> EngineInfo: ...

    def stats(self) -> EngineStats:
        """Latest load snapshot (never blocks)."""
        ...

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest(field, message) for a request this engine would refuse."""
        ...

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Prefill and decode here, streaming new tokens. Leaving the iteration aborts it."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def set_proposer(self, proposer: Proposer | None) -> None:
        """Speculate with this per-step proposer (engines that take one; None: off)."""
        ...

    async def prefill(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> PrefillOutput: ...

    async def reserve(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> Reservation | None:
        """Validate and make room for a prompt prefilled elsewhere; None when there is none."""
        ...

    async def import_kv(self, reservation: Reservation, pieces: Sequence[KvPieceIn]) -> None: ...

    async def add_prefilled(
        self, reservation: Reservation, first: FirstToken, handoff: bytes = b""
    ) -> Prefilled: ...

    async def release(self, reservation: Reservation) -> None:
        """Free what the reservation holds (running or not); never touches a newer request
        that reuses the id."""
        ...

    def shutdown(self, timeout: float = 5.0) -> None: ...
