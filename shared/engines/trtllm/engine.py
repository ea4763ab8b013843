"""The TensorRT-LLM engine behind a prefill or decode worker (TANDEM_ENGINE=trtllm).

`TrtllmEngine` implements the engine interface (shared/engine/interface.py) over
`tensorrt_llm.LLM`; its KV hand-off is KV_HANDOFF_ENGINE:

  prefill worker:  prefill(...)        -> a `context_only` request; returns the first token and
                                          the Handoff (DisaggregatedParams) as bytes
                   ... the handoff travels to the decode worker in the Prefill stream ...
  decode worker:   reserve(...)        -> validation only: TensorRT-LLM allocates the blocks
                                          when the generation request arrives
                   add_prefilled(...)  -> a streaming `generation_only` request; the cache
                                          transceiver (UCX/NIXL) pulls the KV from the prefill
                                          worker's GPU itself

Cancelling an iteration aborts the request (`RequestOutput.abort()`), which frees its blocks.
The decode side owns the transfer's outcome: when the KV never arrives, TensorRT-LLM's
`kv_transfer_timeout_ms` frees the blocks on both sides and the request fails here with
KvTransferTimeout. Outputs are Tandem `RequestOutput`s with only the new tokens.

Submission errors of the LLM API (`ValueError` from argument checks, `RequestError` from
`LLM._check_arguments` in current releases) become InvalidRequest naming the prompt.
Knows nothing of gRPC or protobuf.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

from shared.engine import (
    KV_HANDOFF_ENGINE,
    EngineInfo,
    EngineStats,
    FinishReason,
    FirstToken,
    InvalidRequest,
    KvPieceIn,
    Prefilled,
    PrefillOutput,
    RequestOutput,
    Reservation,
    SamplingParams,
    TokenLogprobs,
)
from shared.kv.errors import KvTransferError, KvTransferTimeout
from shared.params import check_length

from .config import ModelInfo, TrtllmApi, TrtllmSettings, check, llm_kwargs, load_api
from .convert import CONTEXT_DONE, Handoff, finish_reason, sampling_params, token_logprobs
from .drafter import remote_drafter

log = logging.getLogger(__name__)


class TrtllmEngine:
    def __init__(
        self,
        llm: Any,
        api: TrtllmApi,
        settings: TrtllmSettings,
        info: ModelInfo,
        *,
        stats_interval_s: float = 1.0,
    ):
        self.llm = llm
        self.api = api
        self.settings = settings
        self.model = info
        self.max_model_len = settings.max_model_len or info.max_position_embeddings
        self._requests: dict[str, Any] = {}  # Tandem request id -> TensorRT-LLM RequestOutput
        self._stats = EngineStats(0, 0, 0, 0, 0, 0, 0, 0)
        self._stats_interval_s = stats_interval_s
        self._stopped = threading.Event()
        self._stats_thread = threading.Thread(target=self._poll_stats, name="trtllm-stats", daemon=True)

    @classmethod
    def build(
        cls,
        settings: TrtllmSettings,
        info: ModelInfo,
        *,
        api: TrtllmApi | None = None,
        draft_client_factory: Any = None,
        drafter: Any = None,
        **kwargs: Any,
    ) -> TrtllmEngine:
        """Check the settings (ConfigError), then load the model into a TensorRT-LLM LLM.

        With `draft_client_factory` and settings.num_speculative_tokens > 0 (decode role), the
        draft service proposes tokens through TensorRT-LLM's user-provided drafter hook."""
        settings = check(settings, info)
        api = api if api is not None else load_api()
        if drafter is None and draft_client_factory is not None and settings.num_speculative_tokens:
            drafter = remote_drafter(
                api.Drafter, draft_client_factory, settings.num_speculative_tokens, settings.draft_retry_s
            )
        return cls(api.LLM(**llm_kwargs(api, settings, drafter)), api, settings, info, **kwargs)

    def info(self) -> EngineInfo:
        return EngineInfo(
            model_name=self.model.name,
            vocab_size=self.model.vocab_size,
            max_model_len=self.max_model_len,
            block_size=self.settings.tokens_per_block,
            num_layers=self.model.num_layers,
            num_kv_heads=self.model.num_kv_heads,
            head_dim=self.model.head_dim,
            kv_dtype=self.settings.dtype,
            eos_token_ids=tuple(self.model.eos_token_ids),
            kv_handoff=KV_HANDOFF_ENGINE,
        )

    def set_proposer(self, proposer: Any) -> None:
        if proposer is not None:
            raise ValueError("the trtllm engine speculates through its drafter, set when it is built")

    def start(self) -> TrtllmEngine:
        self._stats_thread.start()
        return self

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        self.llm.shutdown()

    # -- load -------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """Latest snapshot: requests in flight, KV blocks from TensorRT-LLM's iteration stats."""
        return self._stats

    def _poll_stats(self) -> None:
        while not self._stopped.wait(self._stats_interval_s):
            try:
                self.refresh_stats()
            except Exception:  # noqa: BLE001 - stats are best effort; serving goes on
                log.debug("trtllm iteration stats unavailable", exc_info=True)

    def refresh_stats(self) -> EngineStats:
        kv = {}
        for stat in self.llm.get_stats(timeout=0.5) or []:  # oldest first; keep the newest
            kv = stat.get("kvCacheStats") or kv
        tpb = kv.get("tokensPerBlock", self.settings.tokens_per_block)
        reused, missed = kv.get("reusedBlocks", 0), kv.get("missedBlocks", 0)
        old = self._stats
        self._stats = EngineStats(
            num_waiting=0,  # TensorRT-LLM queues internally; in flight counts as running
            num_running=len(self._requests),
            num_free_blocks=kv.get("freeNumBlocks", old.num_free_blocks),
            num_total_blocks=kv.get("maxNumBlocks", old.num_total_blocks),
            num_cached_blocks=0,
            prefix_cache_hit_tokens=reused * tpb or old.prefix_cache_hit_tokens,
            prefix_cache_query_tokens=(reused + missed) * tpb or old.prefix_cache_query_tokens,
            num_preemptions=0,
        )
        return self._stats

    # -- requests -------------------------------------------------------------------------------
    def _submit(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        *,
        max_tokens: int | None = None,
        disaggregated_params: Any = None,
        streaming: bool = True,
    ):
        self.validate(prompt, params)
        if request_id in self._requests:
            raise InvalidRequest("request_id", f"{request_id!r} is already running on this worker")
        try:
            result = self.llm.generate_async(
                prompt,
                sampling_params(self.api, params, self.model, max_tokens=max_tokens, num_prompt_tokens=len(prompt)),
                streaming=streaming,
                disaggregated_params=disaggregated_params,
            )
        except (ValueError, self.api.RequestError) as e:  # the LLM API's argument checks (lengths, ...)
            raise InvalidRequest("prompt", f"refused by TensorRT-LLM: {e}") from None
        self._requests[request_id] = result
        return result

    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest naming the field, before TensorRT-LLM sees the request."""
        if not prompt:
            raise InvalidRequest("prompt", "empty")
        if any(not 0 <= t < self.model.vocab_size for t in prompt):
            raise InvalidRequest("prompt", f"token ids outside the vocabulary [0, {self.model.vocab_size})")
        params.validate(self.model.vocab_size)
        if params.prompt_logprobs is not None:
            raise InvalidRequest("prompt_logprobs", "not supported by the TensorRT-LLM engine (TANDEM_ENGINE=torch has them)")
        if params.guidance is not None:
            raise InvalidRequest("guidance", "structured output is not supported by the TensorRT-LLM engine (TANDEM_ENGINE=torch has it)")
        if params.repetition_penalty != 1.0 and (params.presence_penalty or params.frequency_penalty):
            # its kernel counts one set of seen tokens for all three penalties: with the prompt
            # left out for OpenAI's two, the repetition penalty would skip it too
            raise InvalidRequest(
                "repetition_penalty", "cannot be combined with presence_penalty or frequency_penalty on the "
                "TensorRT-LLM engine (TANDEM_ENGINE=torch takes all three)"
            )
        if params.logit_bias:
            raise InvalidRequest("logit_bias", "not supported by the TensorRT-LLM engine (TANDEM_ENGINE=torch has it)")
        check_length(len(prompt), params.max_tokens, self.max_model_len)

    async def abort(self, request_id: str) -> None:
        result = self._requests.pop(request_id, None)
        if result is not None and not result.finished:
            result.abort()

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Prefill and decode here (a context_and_generation request), streaming new tokens."""
        result = self._submit(request_id, prompt, params)
        async for out in self._stream(request_id, result, prompt, params, already=0):
            yield out

    async def prefill(self, request_id: str, prompt: list[int], params: SamplingParams) -> PrefillOutput:
        """The context phase: the first token (EOS and stop tokens ignored, as with the torch
        engine: the decode side decides), and the encoded Handoff for the decode worker.

        After it returns, TensorRT-LLM holds the prompt's KV until a decode worker pulls it or
        kv_transfer_timeout_ms passes; a cancel before then aborts the context request."""
        params = dataclasses.replace(params, max_tokens=1, ignore_eos=True, stop_token_ids=[])
        done = False
        try:
            result = self._submit(
                request_id,
                prompt,
                params,
                max_tokens=1,
                streaming=False,
                disaggregated_params=self.api.DisaggregatedParams(request_type="context_only"),
            )
            try:
                await result.aresult()
            except self.api.RequestError as e:
                raise KvTransferError(f"TensorRT-LLM context phase failed: {e}") from None
            out = result.outputs[0]
            if out.finish_reason not in CONTEXT_DONE or not out.token_ids:
                raise KvTransferError(f"TensorRT-LLM context phase ended with {out.finish_reason!r}")
            handoff = Handoff.from_params(out.disaggregated_params)
            first_token = out.token_ids[0]
            first = RequestOutput(
                request_id=request_id,
                new_token_ids=[first_token],
                logprobs=token_logprobs([first_token], list(out.logprobs or [])[:1], params.logprobs),
                num_prompt_tokens=len(prompt),
                num_cached_tokens=_cached_tokens(result),
                num_output_tokens=1,
            )
            done = True
            return PrefillOutput(first, handoff=handoff.encode())
        finally:
            if done:
                self._requests.pop(request_id, None)  # the KV is the transceiver's now
            else:
                await asyncio.shield(self.abort(request_id))

    async def reserve(self, request_id: str, prompt: list[int], params: SamplingParams) -> Reservation | None:
        """Validation only: TensorRT-LLM allocates the blocks when the generation_only request
        arrives (and fails it when it cannot)."""
        self.validate(prompt, params)
        if request_id in self._requests:
            raise InvalidRequest("request_id", f"{request_id!r} is already running on this worker")
        return Reservation(request_id, list(prompt), params)

    async def import_kv(self, reservation: Reservation, pieces: Sequence[KvPieceIn]) -> None:
        raise KvTransferError("the trtllm engine takes no KV tensors: its cache transceiver moves the KV")

    async def release(self, reservation: Reservation) -> None:
        await self.abort(reservation.request_id)

    async def add_prefilled(self, reservation: Reservation, first: FirstToken, handoff: bytes = b"") -> Prefilled:
        """Decode a request prefilled elsewhere: a generation_only request whose KV the cache
        transceiver pulls. Its outputs start at the *second* token (the first came with the handoff).

        If the first token already ends the request, the KV is still pulled (so that the
        prefill worker frees it now, not at the transfer timeout) before this returns."""
        try:
            decoded = Handoff.decode(handoff)
        except ValueError as e:
            raise KvTransferError(str(e)) from None
        rid, prompt, params = reservation.request_id, reservation.prompt_token_ids, reservation.params
        tokens = decoded.first_gen_tokens
        finish = first_token_finish(params, tokens, self.model.eos_token_ids)
        result = self._submit(
            rid,
            prompt,
            params,
            disaggregated_params=decoded.to_params(self.api),
            max_tokens=max(params.max_tokens, len(tokens) + 1) if finish is not None else None,
        )
        if finish is not None:
            try:
                await self._first_update(result)  # the transfer is done once anything comes back
            finally:
                await asyncio.shield(self.abort(rid))
            return Prefilled(finish, _no_outputs())
        outputs = self._stream(
            rid, result, prompt, params, already=len(tokens), num_cached_tokens=first.num_cached_tokens,
            generation_only=True,
        )
        return Prefilled(None, outputs)

    async def _first_update(self, result: Any) -> None:
        try:
            await result.__anext__()
        except StopAsyncIteration:
            pass
        except self.api.RequestError as e:
            raise _transfer_error(e) from None

    async def _stream(
        self,
        request_id: str,
        result: Any,
        prompt: list[int],
        params: SamplingParams,
        *,
        already: int,
        num_cached_tokens: int | None = None,
        generation_only: bool = False,
    ) -> AsyncIterator[RequestOutput]:
        """Tandem outputs from a streaming TensorRT-LLM result; `already` tokens were emitted before.

        The cursor is our own (`token_ids[emitted:]`), so it does not matter whether a release
        counts the handoff's first token in its streamed diff."""
        emitted = already
        finished = False
        try:
            async for update in _updates(result):
                out = update.outputs[0]
                new = list(out.token_ids[emitted:])
                done = update.finished or out.finish_reason is not None
                if not new and not done:
                    continue
                emitted += len(new)
                lps: list[TokenLogprobs] | None = token_logprobs(
                    new, list(out.logprobs or []), params.logprobs
                )
                finished = done
                yield RequestOutput(
                    request_id=request_id,
                    new_token_ids=new,
                    finished=done,
                    finish_reason=finish_reason(out.finish_reason) if done else None,
                    logprobs=lps,
                    num_prompt_tokens=len(prompt),
                    num_cached_tokens=num_cached_tokens
                    if num_cached_tokens is not None
                    else _cached_tokens(update),
                    num_output_tokens=emitted,
                )
                if done:
                    return
        except self.api.RequestError as e:
            if generation_only and emitted == already:
                raise _transfer_error(e) from None
            raise KvTransferError(f"TensorRT-LLM request failed: {e}") from None
        finally:
            if finished:
                self._requests.pop(request_id, None)
            else:  # cancelled, failed or abandoned: abort frees its blocks
                await asyncio.shield(self.abort(request_id))


def first_token_finish(
    params: SamplingParams, first: list[int], eos_token_ids: list[int]
) -> FinishReason | None:
    """Whether the prefill worker's first token(s) already end the request, and why."""
    if first[-1] in params.stop_token_ids or (first[-1] in eos_token_ids and not params.ignore_eos):
        return FinishReason.STOP
    if params.max_tokens <= len(first):
        return FinishReason.LENGTH
    return None


async def _no_outputs() -> AsyncIterator[RequestOutput]:
    return
    yield  # an async generator that yields nothing


async def _updates(result: Any) -> AsyncIterator[Any]:
    async for update in result:
        yield update


def _transfer_error(e: Exception) -> Exception:
    text = str(e)
    if "timed out" in text.lower() or "timeout" in text.lower():
        return KvTransferTimeout(f"TensorRT-LLM KV transfer timed out: {text}")
    return KvTransferError(f"TensorRT-LLM KV transfer failed: {text}")


def _cached_tokens(result: Any) -> int:
    # Prompt tokens served from TensorRT-LLM's block reuse, where the release reports it.
    return int(getattr(result, "cached_tokens", 0) or 0)
