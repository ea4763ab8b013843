"""The TensorRT-LLM engine behind a prefill or decode worker (TANDEM_ENGINE=trtllm).

`TrtllmEngine` offers the asyncio surface the services use of `shared.engine.AsyncEngine`
(`generate`, `abort`, `stats`, `shutdown`, `.engine` for GetInfo) over `tensorrt_llm.LLM`,
plus the two halves of a disaggregated request:

  prefill worker:  prefill(...)            -> a `context_only` request; returns the first
                                              token and the Handoff (DisaggregatedParams)
                   ... the Handoff travels to the decode worker in the Prefill stream ...
  decode worker:   generate_prefilled(...) -> a streaming `generation_only` request; the
                                              cache transceiver (UCX/NIXL) pulls the KV from
                                              the prefill worker's GPU itself

Cancelling an iteration aborts the request (`RequestOutput.abort()`), which frees its blocks.
The decode side owns the transfer's outcome: when the KV never arrives, TensorRT-LLM's
`kv_transfer_timeout_ms` frees the blocks on both sides and the request fails here with
KvTransferTimeout. Outputs are Tandem `RequestOutput`s with only the new tokens.

Knows nothing of gRPC or protobuf (services/common/trtllm_workers.py does).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from shared.engine import (
    EngineStats,
    FinishReason,
    InvalidRequest,
    RequestOutput,
    SamplingParams,
    TokenLogprobs,
)
from shared.kv.errors import KvTransferError, KvTransferTimeout
from shared.params import check_length

from .trtllm_config import ModelInfo, TrtllmApi, TrtllmSettings, check, engine_facade, llm_kwargs, load_api
from .trtllm_convert import Handoff, finish_reason, sampling_params, token_logprobs
from .trtllm_draft import remote_drafter

log = logging.getLogger(__name__)


@dataclass
class PrefillResult:
    """The context phase of one request: its first token, and what the decode side needs."""

    first: RequestOutput  # the first token (with its logprobs), not finished
    handoff: Handoff


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
        self.info = info
        self.engine = engine_facade(info, settings)
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
            drafter = remote_drafter(api.Drafter, draft_client_factory, settings.num_speculative_tokens)
        return cls(api.LLM(**llm_kwargs(api, settings, drafter)), api, settings, info, **kwargs)

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
                sampling_params(self.api, params, self.info, max_tokens=max_tokens),
                streaming=streaming,
                disaggregated_params=disaggregated_params,
            )
        except ValueError as e:  # TensorRT-LLM's argument checks (lengths, ...)
            raise InvalidRequest("prompt", str(e)) from None
        self._requests[request_id] = result
        return result

    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest naming the field, before TensorRT-LLM sees the request."""
        if not prompt:
            raise InvalidRequest("prompt", "empty")
        if any(not 0 <= t < self.info.vocab_size for t in prompt):
            raise InvalidRequest("prompt", f"token ids outside the vocabulary [0, {self.info.vocab_size})")
        params.validate(self.info.vocab_size)
        check_length(len(prompt), params.max_tokens, self.engine.max_model_len)

    async def abort(self, request_id: str) -> None:
        result = self._requests.pop(request_id, None)
        if result is not None and not result.finished:
            result.abort()

    async def generate(
        self, request_id: str, prompt: list[int], params: SamplingParams, *, hold_kv: bool = False
    ) -> AsyncIterator[RequestOutput]:
        """Prefill and decode here (a context_and_generation request), streaming new tokens."""
        if hold_kv:
            raise InvalidRequest(
                "hold_kv", "the trtllm engine moves KV with its cache transceiver: use prefill()"
            )
        result = self._submit(request_id, prompt, params)
        async for out in self._stream(request_id, result, prompt, params, already=0):
            yield out

    async def prefill(self, request_id: str, prompt: list[int], params: SamplingParams) -> PrefillResult:
        """The context phase: the first token, and the Handoff for the decode worker.

        After it returns, TensorRT-LLM holds the prompt's KV until a decode worker pulls it or
        kv_transfer_timeout_ms passes; a cancel before then aborts the context request."""
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
            if finish_reason(out.finish_reason).value in ("cancelled", "error") or not out.token_ids:
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
            return PrefillResult(first, handoff)
        finally:
            if done:
                self._requests.pop(request_id, None)  # the KV is the transceiver's now
            else:
                await asyncio.shield(self.abort(request_id))

    async def generate_prefilled(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        handoff: Handoff,
        *,
        num_cached_tokens: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Decode a request prefilled elsewhere: a generation_only request whose KV the cache
        transceiver pulls. Yields from the *second* token on (the first came with the handoff).

        If the first token already ended the request, the KV is still pulled (so that the
        prefill worker frees it now, not at the transfer timeout) and nothing is yielded."""
        first = handoff.first_gen_tokens
        ends_at_first = first_token_finish(params, first, self.info.eos_token_ids) is not None
        result = self._submit(
            request_id,
            prompt,
            params,
            disaggregated_params=handoff.to_params(self.api),
            max_tokens=max(params.max_tokens, len(first) + 1) if ends_at_first else None,
        )
        if ends_at_first:
            try:
                await self._first_update(result)  # the transfer is done once anything comes back
            finally:
                await asyncio.shield(self.abort(request_id))
            return
        async for out in self._stream(
            request_id,
            result,
            prompt,
            params,
            already=len(first),
            num_cached_tokens=num_cached_tokens,
            generation_only=True,
        ):
            yield out

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
