"""FAKE TensorRT-LLM, part 2: `LLM` (the executor loop, the cache transceiver) and its
`RequestOutput`. Re-exported by fake_tensorrt_llm.py, whose docstring describes the contract."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fake_tensorrt_llm_types import (
    CacheTransceiverConfig,
    CompletionOutput,
    DisaggregatedParams,
    KvCacheConfig,
    LlmRequest,
    Logprob,
    RequestError,
    ResourceManager,
    SamplingParams,
    ScheduledRequests,
    UserProvidedDecodingConfig,
    _logprob_row,
    next_token,
)

# -- the cache transceiver: contexts held for transfer, by instance -----------------------------

_ids = itertools.count(1)
_instances: dict[int, LLM] = {}


@dataclass
class _HeldContext:
    prompt_len: int
    blocks: int
    timer: asyncio.TimerHandle | None = None


class RequestOutput:
    """tensorrt_llm.llmapi.RequestOutput: one request's state, updated as responses arrive."""

    def __init__(
        self,
        llm: LLM,
        request_id: int,
        prompt: list[int],
        params: SamplingParams,
        streaming: bool,
        disagg: DisaggregatedParams | None,
    ):
        self._llm = llm
        self.request_id = request_id
        self.prompt_token_ids = prompt
        self.sampling_params = params
        self.disaggregated_params = disagg
        self.outputs = [CompletionOutput(0)]
        self.cached_tokens = 0
        self._streaming = streaming
        self._done = False
        self._aborted = False
        self._updates: asyncio.Queue = asyncio.Queue()

    @property
    def finished(self) -> bool:
        return self._done

    def abort(self) -> None:
        self._aborted = True
        self._llm.num_aborts += 1
        self._llm._expire(self.request_id)  # a context held for transfer is given up: its blocks go back

    def aborted(self) -> bool:
        return self._aborted

    def __aiter__(self) -> RequestOutput:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        update = await self._updates.get()
        if isinstance(update, BaseException):
            self._done = True
            raise update
        out = self.outputs[0]
        out._last_token_ids_len = len(out.token_ids)
        out._last_logprobs_len = len(out.logprobs)
        tokens, logprobs, finish, disagg = update
        first_update = not out.token_ids
        out.token_ids.extend(tokens)
        out.logprobs.extend(logprobs)
        gen_only = self.disaggregated_params is not None and self.disaggregated_params.request_type == "generation_only"
        if gen_only and self._streaming and first_update:
            # executor/result.py, `GenerationResultBase._handle_sequence`: "in PD, the first
            # token should be ignored in streaming mode": the diff skips first_gen_tokens
            out._last_token_ids_len = 1
        if disagg is not None:
            out.disaggregated_params = disagg
        if finish is not None:
            out.finish_reason = finish
            self._done = True
            p = self.sampling_params
            if finish == "stop" and out.stop_reason is not None and not p.include_stop_str_in_output:
                # executor/result.py, `GenerationResultBase._handle_sequence`: a matched stop
                # word (stop_token_ids count as one-token stop words) is cut from token_ids
                out.token_ids = out.token_ids[:-1]
        return self

    async def aresult(self) -> RequestOutput:
        while not self._done:
            await self.__anext__()
        return self


class LLM:
    """tensorrt_llm.LLM with the PyTorch backend, minus the GPU."""

    _ARGS = {
        "tokenizer",
        "skip_tokenizer_init",
        "trust_remote_code",
        "tensor_parallel_size",
        "dtype",
        "backend",
        "kv_cache_config",
        "cache_transceiver_config",
        "disable_overlap_scheduler",
        "speculative_config",
        "max_batch_size",
        "max_num_tokens",
        "max_seq_len",
        "enable_iter_perf_stats",
        "enable_chunked_prefill",
    }

    def __init__(self, model: str, **kwargs: Any) -> None:
        extra = set(kwargs) - self._ARGS
        if extra:
            raise ValueError(
                f"Failed to parse the arguments for the LLM constructor: extra fields not permitted: {sorted(extra)}"
            )
        self.model = model
        self.args = kwargs
        self.kv_cache_config: KvCacheConfig = kwargs.get("kv_cache_config") or KvCacheConfig()
        self.transceiver: CacheTransceiverConfig | None = kwargs.get("cache_transceiver_config")
        tpb = self.kv_cache_config.tokens_per_block
        if self.transceiver is not None and self.transceiver.max_tokens_in_buffer is not None:
            if self.transceiver.max_tokens_in_buffer % tpb:
                # what the real executor dies of at start-up (cpp/.../cacheTransBuffer.cpp)
                raise RuntimeError(
                    "[TensorRT-LLM][ERROR] Assertion failed: maxNumTokens.value() % tokensPerBlock == 0"
                )
        config = Path(model) / "config.json"
        self.vocab_size = json.loads(config.read_text())["vocab_size"] if config.is_file() else 512
        self.max_seq_len = kwargs.get("max_seq_len") or 2048
        self.max_num_tokens = kwargs.get("max_num_tokens") or 8192  # llm_args.py default
        self.chunked_prefill = bool(kwargs.get("enable_chunked_prefill", False))
        # what a finished context_only request reports: "not_finished" in current releases,
        # "length" in older ones (tests set either; serve/openai_disagg_service.py accepts both)
        self.context_finish_reason = "not_finished"
        self.overlap = not kwargs.get("disable_overlap_scheduler", False)
        spec = kwargs.get("speculative_config")
        self.drafter = spec.drafter if isinstance(spec, UserProvidedDecodingConfig) else None
        self.max_draft_len = spec.max_draft_len if isinstance(spec, UserProvidedDecodingConfig) else 0
        self.total_blocks = (self.kv_cache_config.max_tokens or 64 * tpb) // tpb
        self.used_blocks = 0
        self.held: dict[int, _HeldContext] = {}
        self.instance = next(_ids)
        self.num_aborts = 0
        self.step_s = 0.001  # the fake's time per generation step (tests slow it down to cancel mid-way)
        self.num_drafted = self.num_accepted = 0
        self.drafter_batches: list[int] = []  # generation requests per drafter call, one call per step
        self.resource_manager = ResourceManager()
        self.requests: list[RequestOutput] = []
        self._tasks: set[asyncio.Task] = set()
        self._waiting: list[tuple[RequestOutput, list[int], asyncio.Future]] = []  # the next step's requests
        self._executor: asyncio.Task | None = None
        self._shutdown = False
        _instances[self.instance] = self

    # -- public API ---------------------------------------------------------------------------
    def generate_async(
        self,
        inputs,
        sampling_params: SamplingParams | None = None,
        *,
        streaming: bool = False,
        disaggregated_params: DisaggregatedParams | None = None,
        **unused,
    ) -> RequestOutput:
        if self._shutdown:
            raise RuntimeError("LLM is shut down")
        if unused:
            raise TypeError(f"generate_async() got unexpected keyword arguments {sorted(unused)}")
        prompt = inputs["prompt_token_ids"] if isinstance(inputs, dict) else inputs
        if not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
            raise TypeError("The inputs must be type str or list of int")
        params = sampling_params or SamplingParams()
        if params.end_id is None and self.args.get("skip_tokenizer_init"):
            raise ValueError(
                "tokenizer is required to reset end_id if it is None, or you can explicitly specify the end_id for sampling_params"
            )
        gen_only = disaggregated_params is not None and disaggregated_params.request_type == "generation_only"
        if not self.chunked_prefill and not gen_only and len(prompt) > self.max_num_tokens:
            # llmapi/llm.py, `LLM._check_arguments` (PyTorch backend): RequestError in current
            # releases (ValueError in older ones), unless chunked prefill is on
            raise RequestError(
                f"The sum of prompt length ({float(len(prompt))}), query length (0) should not exceed "
                f"max_num_tokens ({self.max_num_tokens})"
            )
        if len(prompt) + params.max_tokens > self.max_seq_len:
            # the executor refuses a request whose sequence cannot fit max_seq_len
            raise ValueError(
                f"The sum of prompt length ({len(prompt)}) and max_tokens ({params.max_tokens}) should not exceed max_seq_len ({self.max_seq_len})"
            )
        result = RequestOutput(self, next(_ids), list(prompt), params, streaming, disaggregated_params)
        self.requests.append(result)
        if self._executor is None:
            self._executor = asyncio.get_running_loop().create_task(self._executor_loop())
        task = asyncio.get_running_loop().create_task(self._run(result))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return result

    def get_stats(self, timeout: float = 2) -> list[dict]:
        return [
            {
                "numActiveRequests": sum(not r.finished for r in self.requests),
                "kvCacheStats": {
                    "maxNumBlocks": self.total_blocks,
                    "freeNumBlocks": self.total_blocks - self.used_blocks,
                    "usedNumBlocks": self.used_blocks,
                    "tokensPerBlock": self.kv_cache_config.tokens_per_block,
                },
            }
        ]

    def shutdown(self) -> None:
        self._shutdown = True
        for task in [*self._tasks, *([self._executor] if self._executor else [])]:
            task.cancel()
        _instances.pop(self.instance, None)

    # -- the executor -------------------------------------------------------------------------
    def _blocks(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.kv_cache_config.tokens_per_block)

    def _allocate(self, n: int) -> None:
        if self.used_blocks + n > self.total_blocks:
            raise RequestError(f"out of KV blocks ({self.total_blocks - self.used_blocks} free, {n} needed)")
        self.used_blocks += n

    async def _run(self, r: RequestOutput) -> None:
        kind = r.disaggregated_params.request_type if r.disaggregated_params else "context_and_generation"
        blocks = 0
        try:
            if kind in ("context_only", "generation_only") and self.transceiver is None:
                raise RequestError("disaggregated requests need cache_transceiver_config")
            pending: list[int] = []  # tokens the next update carries besides the new ones
            if kind == "generation_only":
                blocks = await self._receive(r)
                # the first token came from the context server: token_ids start with it, it
                # arrives with the first update, and is not part of that update's diff
                tokens = list(r.disaggregated_params.first_gen_tokens)
                pending = list(tokens)
                finish = self._finish(r, tokens)
                if finish:
                    await r._updates.put((pending, self._lps(r, pending), finish, None))
                    return
            else:
                if kind == "context_only" and self.overlap:
                    raise RequestError("context-only requests need disable_overlap_scheduler=True")
                blocks = self._blocks(len(r.prompt_token_ids))
                self._allocate(blocks)
                await asyncio.sleep(0.001)  # the context phase
                if r._aborted:
                    await r._updates.put(([], [], "cancelled", None))
                    return
                tokens = [next_token(r.prompt_token_ids, self.vocab_size)]
                if kind == "context_only":
                    self._hold(r, blocks)
                    blocks = 0  # now the transceiver's
                    disagg = DisaggregatedParams(
                        request_type="context_only",
                        first_gen_tokens=tokens,
                        ctx_request_id=r.request_id,
                        opaque_state=f"fake-{self.transceiver.backend}:{self.instance}:{r.request_id}".encode(),
                        draft_tokens=None,
                    )
                    # executor/result.py: a context-only request ends at its first token
                    await r._updates.put((tokens, self._lps(r, tokens), self.context_finish_reason, disagg))
                    return
                finish = self._finish(r, tokens)
                # a streaming request's first update is its first generated token: the response of
                # its context step (_torch/pyexecutor/py_executor.py, `PyExecutor._handle_responses`)
                await r._updates.put((tokens, self._lps(r, tokens), finish, None))
                if finish:
                    return
            while True:
                if r._aborted:
                    await r._updates.put(([], [], "cancelled", None))
                    return
                seq = r.prompt_token_ids + tokens
                new = await self._next_step(r, seq)
                if r._aborted:
                    await r._updates.put(([], [], "cancelled", None))
                    return
                grown = self._blocks(len(seq) + len(new)) - self._blocks(len(seq))
                self._allocate(grown)
                blocks += grown
                out: list[int] = []
                finish = None
                for t in new:
                    out.append(t)
                    finish = self._finish(r, tokens + out)
                    if finish:
                        break
                tokens += out
                await r._updates.put((pending + out, self._lps(r, pending + out), finish, None))
                pending = []
                if finish:
                    return
        except RequestError as e:
            await r._updates.put(e)
        finally:
            self.used_blocks -= blocks

    async def _next_step(self, r: RequestOutput, seq: list[int]) -> list[int]:
        """Wait for the executor's next step; returns this request's new tokens."""
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append((r, seq, fut))
        return await fut

    async def _executor_loop(self) -> None:
        """_torch/pyexecutor/py_executor.py, `PyExecutor._executor_loop` (overlap scheduler off):
        one step for every scheduled generation request, the drafter called once per step."""
        while True:
            await asyncio.sleep(self.step_s)
            batch, self._waiting = self._waiting, []
            if not batch:
                continue
            try:
                results = await self._step(batch)
            except RequestError as e:
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, _, fut), new in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(new)

    async def _step(self, batch: list[tuple[RequestOutput, list[int], asyncio.Future]]) -> list[list[int]]:
        """One target step: each request's next token, or its accepted drafts plus one."""
        if self.drafter is None:
            return [[next_token(seq, self.vocab_size)] for _, seq, _ in batch]
        requests = [
            LlmRequest(r.request_id, list(seq), len(r.prompt_token_ids), r.sampling_params.max_tokens)
            for r, seq, _ in batch
        ]
        scheduled = ScheduledRequests(generation_requests=requests)

        def draft() -> None:
            # py_executor.py: prepare_draft_tokens, then the base class's padding, synchronously
            self.drafter.prepare_draft_tokens(scheduled, self.resource_manager)
            self.drafter.pad_draft_tokens_for_cuda_graph(scheduled, self.resource_manager)

        await asyncio.to_thread(draft)
        self.drafter_batches.append(len(requests))
        out = []
        for request, (_, seq, _) in zip(requests, batch, strict=True):
            drafts = list(request.py_draft_tokens or [])
            if len(drafts) > self.max_draft_len:
                raise RequestError(f"{len(drafts)} draft tokens exceed max_draft_len={self.max_draft_len}")
            effective = request.py_draft_tokens_effective_len
            if effective is not None and effective < len(drafts) and not request.kv_extended:
                # TorchSampler rewinds the KV by the padded draft length: without the capacity
                # extension (Drafter._needs_padding_kv_extension) the request's KV is corrupt
                raise RequestError("padded draft tokens without KV capacity extension")
            accepted: list[int] = []
            for d in drafts[:effective]:  # the padding is never verified (py_draft_tokens_effective_len)
                if d != next_token(seq + accepted, self.vocab_size):
                    break
                accepted.append(d)
            self.num_drafted += effective if effective is not None else len(drafts)
            self.num_accepted += len(accepted)
            out.append(accepted + [next_token(seq + accepted, self.vocab_size)])
        return out

    def _finish(self, r: RequestOutput, tokens: list[int]) -> str | None:
        p = r.sampling_params
        if not p.ignore_eos and tokens[-1] == p.end_id:
            # END_ID: the sampled EOS stays in token_ids (the sampler appends before it checks)
            return "stop"
        if tokens[-1] in (p.stop_token_ids or []):
            r.outputs[0].stop_reason = tokens[-1]  # stripped at the end unless include_stop_str_in_output
            return "stop"
        if len(tokens) >= p.max_tokens:
            return "length"
        return None

    def _lps(self, r: RequestOutput, tokens: list[int]) -> list[dict[int, Logprob]]:
        n = r.sampling_params.logprobs
        return [_logprob_row(t, self.vocab_size, n) for t in tokens] if n else []

    # -- cache transceiver ----------------------------------------------------------------------
    def _hold(self, r: RequestOutput, blocks: int) -> None:
        held = _HeldContext(len(r.prompt_token_ids), blocks)
        if self.transceiver.kv_transfer_timeout_ms is not None:  # None: held until pulled, maybe forever
            timeout_s = self.transceiver.kv_transfer_timeout_ms / 1000
            held.timer = asyncio.get_running_loop().call_later(timeout_s, self._expire, r.request_id)
        self.held[r.request_id] = held

    def _expire(self, ctx_request_id: int) -> None:
        held = self.held.pop(ctx_request_id, None)
        if held is not None:  # nobody pulled the KV in time: the blocks go back
            self.used_blocks -= held.blocks

    async def _receive(self, r: RequestOutput) -> int:
        """Pull the context's KV from the instance that holds it (the cache transceiver)."""
        d = r.disaggregated_params
        if not d.first_gen_tokens or d.ctx_request_id is None or not d.opaque_state:
            raise RequestError("generation_only needs first_gen_tokens, ctx_request_id and opaque_state")
        backend, instance, ctx_id = d.opaque_state.decode().removeprefix("fake-").split(":")
        if backend != self.transceiver.backend:
            raise RequestError(
                f"cache transceiver backends differ: context {backend}, generation {self.transceiver.backend}"
            )
        if int(ctx_id) != d.ctx_request_id:
            raise RequestError("opaque_state does not belong to ctx_request_id")
        loop = asyncio.get_running_loop()
        timeout_ms = self.transceiver.kv_transfer_timeout_ms
        deadline = loop.time() + (timeout_ms / 1000 if timeout_ms is not None else float("inf"))
        while True:
            source = _instances.get(int(instance))
            held = source.held.pop(d.ctx_request_id, None) if source is not None else None
            if held is not None:
                break
            if r._aborted:
                raise RequestError("aborted while waiting for the KV cache transfer")
            if loop.time() > deadline:
                raise RequestError("KV cache transfer timed out")
            await asyncio.sleep(0.005)
        if held.timer is not None:
            held.timer.cancel()
        source.used_blocks -= held.blocks
        if held.prompt_len != len(r.prompt_token_ids):
            raise RequestError("KV cache transfer: the prompt differs from the context request's")
        blocks = self._blocks(len(r.prompt_token_ids) + 1)
        self._allocate(blocks)
        return blocks


def transfer_pending() -> int:
    """Contexts held for transfer across every fake instance (0 when none is stuck)."""
    return sum(len(llm.held) for llm in _instances.values())


def shutdown_all() -> None:
    """Shut every fake LLM down (tests: no held context outlives its test)."""
    for llm in list(_instances.values()):
        llm.shutdown()
