"""FAKE TensorRT-LLM, part 1: the classes of its API that carry no behaviour beyond their own
checks (configuration, sampling, results, the drafter's base and its view of requests), and the
toy model. Re-exported by fake_tensorrt_llm.py, whose docstring describes the contract."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
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
    """tensorrt_llm._torch.speculative.drafter.Drafter, current signature (`Drafter.__init__`)."""

    # drafter.py: drafters whose sampler rewinds by the padded draft length (TorchSampler:
    # user-provided, NGram) must set it, so that padding extends the KV capacity
    _needs_padding_kv_extension: bool = False

    def __init__(
        self,
        max_draft_len: int | None = None,
        max_total_draft_tokens: int | None = None,
        max_concurrency: int | None = None,
        draft_len_schedule: dict[int, int] | None = None,
    ) -> None:
        self.max_draft_len = max_draft_len
        self.max_total_draft_tokens = max_total_draft_tokens
        self._static_max_total_draft_tokens = max_total_draft_tokens
        self.max_concurrency = max_concurrency
        self.draft_len_schedule = draft_len_schedule

    @abstractmethod
    def prepare_draft_tokens(self, scheduled_requests, resource_manager=None) -> None: ...

    def pad_draft_tokens_for_cuda_graph(self, scheduled_requests, resource_manager=None) -> None:
        # drafter.py, `Drafter.pad_draft_tokens_for_cuda_graph` (final): zeros up to the static
        # maximum, then the KV capacity extension for drafters that ask for it
        pad_to = self._static_max_total_draft_tokens
        for req in scheduled_requests.generation_requests:
            req.py_draft_tokens_effective_len = len(req.py_draft_tokens)
            req.py_draft_tokens.extend(0 for _ in range(pad_to - len(req.py_draft_tokens)))
        if self._needs_padding_kv_extension and resource_manager is not None:
            for req in scheduled_requests.generation_requests:
                resource_manager.extend_capacity_for_tokens(req)


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
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    prompt_ignore_length: int | None = None
    min_p: float | None = None
    logprobs: int | None = None
    ignore_eos: bool = False
    detokenize: bool = True
    include_stop_str_in_output: bool = False


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
    py_draft_tokens_effective_len: int | None = None
    kv_extended: bool = False

    def get_tokens(self, beam: int) -> list[int]:
        return list(self.tokens)


@dataclass
class ScheduledRequests:
    context_requests: list[LlmRequest] = field(default_factory=list)
    generation_requests: list[LlmRequest] = field(default_factory=list)


class ResourceManager:
    """What the padding's KV extension touches (resource_manager.py, `KVCacheManager.extend_capacity_for_tokens`)."""

    def extend_capacity_for_tokens(self, req: LlmRequest) -> None:
        req.kv_extended = True
