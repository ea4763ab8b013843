"""A FAKE of TensorRT-LLM's LLM API, for testing Tandem's trtllm adapter on CPU.

It runs no model and imports nothing of tensorrt_llm: a deterministic toy next-token rule
stands in for the network, an in-process registry for the cache transceiver. What it does
reproduce is the documented contract of the real API (tensorrt_llm 1.x, PyTorch backend), as
read from its sources (tensorrt_llm/llmapi/llm.py, executor/result.py, sampling_params.py,
disaggregated_params.py, llmapi/llm_args.py, _torch/speculative/drafter.py):

- `LLM(model, **kwargs)`: unknown keyword arguments are rejected (LlmArgs forbids extras);
  `generate_async(inputs, sampling_params, streaming=..., disaggregated_params=...)` is a plain
  method returning a `RequestOutput` at once; the `RequestOutput` is an async iterator that
  yields *itself* after each update, with cumulative `outputs[0].token_ids` /
  `logprobs` (one `{token_id: Logprob}` dict per token) and `token_ids_diff`; `abort()` ends
  the request with `finish_reason == "cancelled"`; errors surface as `RequestError`.
- `skip_tokenizer_init=True` requires `SamplingParams.end_id` (there is no tokenizer to ask).
- Disaggregation: a `context_only` request answers once, with `finished` and
  `outputs[0].disaggregated_params` (`first_gen_tokens`, `ctx_request_id`, `opaque_state`,
  `draft_tokens`); its KV blocks stay held until a `generation_only` request on a peer pulls
  them through the cache transceiver, or `kv_transfer_timeout_ms` passes (then they are freed
  and the peer's request fails). A `generation_only` request's `token_ids` start with
  `first_gen_tokens` (its diff skips it, as the real result does in streaming mode).
- Traps of the real one, which the adapter must avoid: `max_tokens_in_buffer` that is not a
  multiple of `tokens_per_block` fails start-up with the C++ assertion of cacheTransBuffer;
  a `context_only` request needs `disable_overlap_scheduler=True` on its LLM; a context or
  generation request needs a `cache_transceiver_config`.
- `UserProvidedDecodingConfig(max_draft_len, drafter)`: each generation step calls
  `drafter.prepare_draft_tokens(scheduled_requests, resource_manager)` on the executor's
  thread (not the event loop) with `LlmRequest`-like objects (`request_id`, `get_tokens(0)`,
  `py_orig_prompt_len`, `py_max_new_tokens`, `py_draft_tokens`), then verifies the drafts.
- `get_stats(timeout)` returns iteration-stats dicts with `kvCacheStats`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# -- configuration classes (same names and fields as tensorrt_llm.llmapi) ---------------------

_BACKENDS = ("DEFAULT", "UCX", "NIXL", "MOONCAKE", "MPI")


@dataclass(kw_only=True)
class KvCacheConfig:
    enable_block_reuse: bool = True
    max_tokens: int | None = None
    free_gpu_memory_fraction: float | None = 0.9
    tokens_per_block: int = 32
    dtype: str = "auto"


@dataclass(kw_only=True)
class CacheTransceiverConfig:
    backend: str | None = None
    max_tokens_in_buffer: int | None = None
    kv_transfer_timeout_ms: int | None = 60000

    def __post_init__(self) -> None:
        if self.backend is not None and self.backend not in _BACKENDS:
            raise ValueError(f"backend: input should be one of {_BACKENDS}, got {self.backend!r}")
        if self.kv_transfer_timeout_ms is not None and self.kv_transfer_timeout_ms <= 0:
            raise ValueError("kv_transfer_timeout_ms: input should be greater than 0")


class Drafter(ABC):
    """tensorrt_llm._torch.speculative.drafter.Drafter."""

    def __init__(self, max_concurrency: int | None = None) -> None:
        self.max_concurrency = max_concurrency

    @abstractmethod
    def prepare_draft_tokens(self, scheduled_requests, resource_manager=None) -> None: ...


@dataclass(kw_only=True)
class UserProvidedDecodingConfig:
    max_draft_len: int
    drafter: Any
    resource_manager: Any = None


@dataclass(kw_only=True)
class SamplingParams:
    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    stop_token_ids: list[int] | None = None
    n: int = 1
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    logprobs: int | None = None
    ignore_eos: bool = False
    detokenize: bool = True


@dataclass(kw_only=True)
class DisaggregatedParams:
    request_type: str | None = None
    first_gen_tokens: list[int] | None = None
    ctx_request_id: int | None = None
    opaque_state: bytes | None = None
    draft_tokens: list[int] | None = None

    def __post_init__(self) -> None:
        if self.request_type is not None and self.request_type not in (
            "context_only",
            "generation_only",
            "context_and_generation",
        ):
            raise ValueError(f"Unknown request type: {self.request_type}")


class RequestError(RuntimeError):
    """tensorrt_llm.executor.utils.RequestError: a request failed inside the executor."""


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    disaggregated_params: DisaggregatedParams | None = None
    _last_token_ids_len: int = 0
    _last_logprobs_len: int = 0

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def token_ids_diff(self) -> list[int]:
        return self.token_ids[self._last_token_ids_len :]

    @property
    def logprobs_diff(self) -> list[dict[int, Logprob]]:
        return self.logprobs[self._last_logprobs_len :]


# -- the toy model ----------------------------------------------------------------------------


def next_token(tokens: list[int], vocab_size: int) -> int:
    """The fake network's greedy choice after `tokens` (deterministic, depends on the whole context)."""
    return (31 * tokens[-1] + 7 * len(tokens) + sum(tokens[-4:])) % vocab_size


def _logprob_row(chosen: int, vocab_size: int, top: int) -> dict[int, Logprob]:
    row = {chosen: Logprob(-0.25, 1)}
    for r in range(1, top):
        row[(chosen + r) % vocab_size] = Logprob(-0.25 - r, r + 1)
    return row


# -- scheduled requests as the drafter sees them ----------------------------------------------


@dataclass
class LlmRequest:
    request_id: int
    tokens: list[int]
    py_orig_prompt_len: int
    py_max_new_tokens: int
    py_draft_tokens: list[int] = field(default_factory=list)

    def get_tokens(self, beam: int) -> list[int]:
        return list(self.tokens)


@dataclass
class ScheduledRequests:
    context_requests: list[LlmRequest] = field(default_factory=list)
    generation_requests: list[LlmRequest] = field(default_factory=list)


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
        out.token_ids.extend(tokens)
        out.logprobs.extend(logprobs)
        if disagg is not None:
            out.disaggregated_params = disagg
        if finish is not None:
            out.finish_reason = finish
            self._done = True
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
        self.requests: list[RequestOutput] = []
        self._tasks: set[asyncio.Task] = set()
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
        if len(prompt) + params.max_tokens > self.max_seq_len:
            raise ValueError(
                f"The sum of prompt length ({len(prompt)}) and max_tokens ({params.max_tokens}) should not exceed max_seq_len ({self.max_seq_len})"
            )
        result = RequestOutput(self, next(_ids), list(prompt), params, streaming, disaggregated_params)
        self.requests.append(result)
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
        for task in list(self._tasks):
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
            if kind == "generation_only":
                blocks = await self._receive(r)
                # the first token came from the context server: token_ids start with it, and it
                # is not part of the first streamed diff
                tokens = list(r.disaggregated_params.first_gen_tokens)
                r.outputs[0].token_ids = list(tokens)
                r.outputs[0].logprobs = self._lps(r, tokens)
                finish = self._finish(r, tokens)
                if finish:
                    await r._updates.put(([], [], finish, None))
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
                    await r._updates.put((tokens, self._lps(r, tokens), "length", disagg))
                    return
                finish = self._finish(r, tokens)
                await r._updates.put((tokens, self._lps(r, tokens), finish, None))
                if finish:
                    return
            while True:
                await asyncio.sleep(self.step_s)
                if r._aborted:
                    await r._updates.put(([], [], "cancelled", None))
                    return
                seq = r.prompt_token_ids + tokens
                new = await self._step(r, seq, len(tokens))
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
                await r._updates.put((out, self._lps(r, out), finish, None))
                if finish:
                    return
        except RequestError as e:
            await r._updates.put(e)
        finally:
            self.used_blocks -= blocks

    async def _step(self, r: RequestOutput, seq: list[int], num_generated: int) -> list[int]:
        """One target step: the next token, or the accepted drafts plus one (speculation)."""
        if self.drafter is None:
            return [next_token(seq, self.vocab_size)]
        request = LlmRequest(r.request_id, list(seq), len(r.prompt_token_ids), r.sampling_params.max_tokens)
        await asyncio.to_thread(
            self.drafter.prepare_draft_tokens, ScheduledRequests(generation_requests=[request]), None
        )
        drafts = list(request.py_draft_tokens or [])
        if len(drafts) > self.max_draft_len:
            raise RequestError(f"{len(drafts)} draft tokens exceed max_draft_len={self.max_draft_len}")
        accepted: list[int] = []
        for d in drafts:
            if d != next_token(seq + accepted, self.vocab_size):
                break
            accepted.append(d)
        self.num_drafted += len(drafts)
        self.num_accepted += len(accepted)
        return accepted + [next_token(seq + accepted, self.vocab_size)]

    def _finish(self, r: RequestOutput, tokens: list[int]) -> str | None:
        p = r.sampling_params
        if not p.ignore_eos and tokens[-1] == p.end_id:
            return "stop"
        if tokens[-1] in (p.stop_token_ids or []):
            r.outputs[0].stop_reason = tokens[-1]
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
