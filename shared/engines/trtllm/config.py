"""TensorRT-LLM engine (TANDEM_ENGINE=trtllm): settings, start-up checks, and the LLM's arguments.

Nothing here imports tensorrt_llm at module level: `load_api()` does, in the worker process of
the TensorRT-LLM image only, and tests pass a fake with the same names instead
(tests/fakes/fake_tensorrt_llm.py). The CPU test suite never imports the real package.

The known traps of TensorRT-LLM's disaggregated serving are settled here, before the LLM is
built, with a message naming the Tandem variable to change:
- `CacheTransceiverConfig.max_tokens_in_buffer` must be a multiple of `tokens_per_block`
  (TANDEM_BLOCK_SIZE); otherwise the executor dies at start-up on a C++ assertion
  (`maxNumTokens % tokensPerBlock == 0`, cacheTransBuffer.cpp). The same holds for
  `max_num_tokens` (TANDEM_MAX_BATCHED_TOKENS), and tokens_per_block is a power of two.
  Its default is bounded (DEFAULT_MAX_TOKENS_IN_BUFFER): a buffer the size of the longest
  sequence costs tokens x layers x 2 x kv_heads x head_dim x dtype bytes, 16 GiB for a
  128k-context Llama-3-8B (see docs/deploy.md).
- the LLM API refuses a prompt longer than `max_num_tokens` unless chunked prefill is on
  (llmapi/llm.py, `LLM._check_arguments`): `enable_chunked_prefill=True`, so a prompt up to
  the model length is prefilled in TANDEM_MAX_BATCHED_TOKENS pieces, as with the torch engine.
- the prefill side runs with `disable_overlap_scheduler=True`: context-only requests are
  not supported by the overlap scheduler. So does a decode side with the remote drafter:
  user-provided drafting is not among the modes that support the overlap scheduler
  (_torch/speculative/interface.py, `SpeculativeDecodingMode.support_overlap_scheduler`),
  and the drafter must see each step's accepted tokens before proposing.
- `kv_transfer_timeout_ms` is always set (from TANDEM_KV_TIMEOUT_S): without it, a context
  whose KV no decode worker ever pulls (the decode side gave up, or died) keeps its blocks
  on the prefill worker for good.
- the cache transceiver backend is UCX, NIXL or DEFAULT; MPI is refused (deprecated, and it
  needs every worker in one MPI world, which separate containers are not).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config import ConfigError

KV_BACKENDS = ("UCX", "NIXL", "DEFAULT")
# tokens; the transfer buffer bound when TANDEM_TRTLLM_MAX_TOKENS_IN_BUFFER is unset
DEFAULT_MAX_TOKENS_IN_BUFFER = 8192
_API_NAMES = (
    "LLM",
    "SamplingParams",
    "DisaggregatedParams",
    "KvCacheConfig",
    "CacheTransceiverConfig",
    "UserProvidedDecodingConfig",
    "Drafter",
    "RequestError",
)


@dataclass(frozen=True)
class TrtllmApi:
    """The TensorRT-LLM classes the adapter uses, from the real package or from a fake."""

    LLM: Any
    SamplingParams: Any
    DisaggregatedParams: Any
    KvCacheConfig: Any
    CacheTransceiverConfig: Any
    UserProvidedDecodingConfig: Any
    Drafter: Any
    RequestError: Any

    @classmethod
    def from_namespace(cls, ns: Any) -> TrtllmApi:
        return cls(**{name: getattr(ns, name) for name in _API_NAMES})


def load_api() -> TrtllmApi:
    """Import TensorRT-LLM (slow: CUDA, MPI); only the trtllm image has it."""
    try:
        from tensorrt_llm._torch.speculative.drafter import Drafter
        from tensorrt_llm.llmapi import (
            LLM,
            CacheTransceiverConfig,
            DisaggregatedParams,
            KvCacheConfig,
            RequestError,
            SamplingParams,
            UserProvidedDecodingConfig,
        )
    except ImportError as e:
        raise ConfigError(
            f"TANDEM_ENGINE=trtllm: tensorrt_llm cannot be imported ({e}); run the worker in the image of "
            "deploy/compose/Dockerfile.trtllm (nvcr.io/nvidia/tensorrt-llm/release, see docs/deploy.md)"
        ) from None
    return TrtllmApi(
        LLM=LLM,
        SamplingParams=SamplingParams,
        DisaggregatedParams=DisaggregatedParams,
        KvCacheConfig=KvCacheConfig,
        CacheTransceiverConfig=CacheTransceiverConfig,
        UserProvidedDecodingConfig=UserProvidedDecodingConfig,
        Drafter=Drafter,
        RequestError=RequestError,
    )


@dataclass(frozen=True)
class ModelInfo:
    """What the worker reports about the model (GetInfo), read from config.json without loading it."""

    name: str
    vocab_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    eos_token_ids: list[int] = field(default_factory=list)


def read_model_info(model_dir: str) -> ModelInfo:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"TANDEM_MODEL: missing file {path} (expected a Hugging Face checkpoint directory)")
    raw = json.loads(path.read_text())
    text = raw.get("text_config", raw)  # multimodal checkpoints nest the language model's
    heads = text.get("num_attention_heads", 1)
    eos = _ids(text.get("eos_token_id", raw.get("eos_token_id")))
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        eos = _ids(json.loads(gen.read_text()).get("eos_token_id")) or eos
    return ModelInfo(
        name=Path(model_dir).name,
        vocab_size=text["vocab_size"],
        num_layers=text.get("num_hidden_layers", 0),
        num_kv_heads=text.get("num_key_value_heads", heads),
        head_dim=text.get("head_dim") or text.get("hidden_size", 0) // heads,
        max_position_embeddings=text.get("max_position_embeddings", 2048),
        eos_token_ids=eos,
    )


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


@dataclass(frozen=True)
class TrtllmSettings:
    """The worker settings the TensorRT-LLM engine uses (a view of shared.config.WorkerConfig)."""

    model: str
    role: str  # "prefill" | "decode"
    dtype: str = "bfloat16"
    tokens_per_block: int = 32  # TANDEM_BLOCK_SIZE
    max_num_seqs: int = 64
    max_batched_tokens: int = 512
    max_model_len: int | None = None
    prefix_caching: bool = True
    kv_timeout_s: float = 60.0
    kv_backend: str = "UCX"  # TANDEM_TRTLLM_KV_BACKEND
    max_tokens_in_buffer: int | None = None  # TANDEM_TRTLLM_MAX_TOKENS_IN_BUFFER
    num_speculative_tokens: int = 0  # > 0 with a draft service: UserProvidedDecodingConfig
    draft_addr: str = ""
    draft_retry_s: float = 2.0  # TANDEM_DRAFT_RETRY_S: how long a failed draft is left alone

    @classmethod
    def from_worker_config(cls, config: Any) -> TrtllmSettings:
        return cls(
            model=config.model,
            role=config.role,
            dtype=config.dtype,
            tokens_per_block=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_batched_tokens=config.max_batched_tokens,
            max_model_len=config.max_model_len,
            prefix_caching=config.prefix_caching,
            kv_timeout_s=config.kv_timeout_s,
            kv_backend=getattr(config, "trtllm_kv_backend", "UCX"),
            max_tokens_in_buffer=getattr(config, "trtllm_max_tokens_in_buffer", None),
            # the draft service only: TensorRT-LLM's drafter hook is how it plugs in
            num_speculative_tokens=config.num_speculative_tokens if _speculation(config) == "draft" else 0,
            draft_addr=getattr(config, "draft_addr", "") or "",
            draft_retry_s=getattr(config, "draft_retry_s", 2.0),
        )


def _speculation(config: Any) -> str:
    speculation = getattr(config, "speculation", "none")
    if speculation == "ngram":
        raise ConfigError(
            "TANDEM_SPEC_PROPOSER: ngram is a torch-engine proposer; with TANDEM_ENGINE=trtllm use draft or none"
        )
    return speculation


def check(settings: TrtllmSettings, info: ModelInfo) -> TrtllmSettings:
    """Validate the settings against TensorRT-LLM's rules; returns them with defaults resolved.

    Raises ConfigError naming the variable, before TensorRT-LLM can fail less clearly."""
    tpb = settings.tokens_per_block
    if tpb < 2 or tpb & (tpb - 1):
        raise ConfigError(
            f"TANDEM_BLOCK_SIZE: TensorRT-LLM's tokens_per_block must be a power of two > 1, got {tpb}"
        )
    if settings.max_batched_tokens % tpb:
        raise ConfigError(
            f"TANDEM_MAX_BATCHED_TOKENS: {settings.max_batched_tokens} is not a multiple of TANDEM_BLOCK_SIZE={tpb} "
            f"(TensorRT-LLM's max_num_tokens); use {_round_up(settings.max_batched_tokens, tpb)}"
        )
    if settings.kv_backend not in KV_BACKENDS:
        why = " (MPI is deprecated and needs one MPI world across workers)" if settings.kv_backend == "MPI" else ""
        raise ConfigError(
            f"TANDEM_TRTLLM_KV_BACKEND: expected one of {', '.join(KV_BACKENDS)}, got {settings.kv_backend!r}{why}"
        )
    if settings.role not in ("prefill", "decode"):
        raise ConfigError(f"TANDEM_ROLE: expected prefill or decode, got {settings.role!r}")
    max_seq_len = settings.max_model_len or info.max_position_embeddings
    buffer = settings.max_tokens_in_buffer
    if buffer is None:
        # the longest sequence, up to a bound: the buffer is GPU memory held for good, and a
        # model-length buffer of a long-context model costs gigabytes (docs/deploy.md)
        buffer = _round_up(min(max_seq_len, DEFAULT_MAX_TOKENS_IN_BUFFER), tpb)
    elif buffer < 1 or buffer % tpb:
        raise ConfigError(
            f"TANDEM_TRTLLM_MAX_TOKENS_IN_BUFFER: {buffer} is not a positive multiple of TANDEM_BLOCK_SIZE={tpb}: "
            f"TensorRT-LLM's cache transceiver requires max_tokens_in_buffer % tokens_per_block == 0 "
            f"(use {_round_up(max(buffer, 1), tpb)})"
        )
    if settings.num_speculative_tokens and not settings.draft_addr:
        raise ConfigError(
            "TANDEM_DRAFT_ADDR: required when TANDEM_NUM_SPECULATIVE_TOKENS > 0 with the trtllm engine"
        )
    return TrtllmSettings(
        **{**settings.__dict__, "max_model_len": max_seq_len, "max_tokens_in_buffer": buffer}
    )


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def llm_kwargs(api: TrtllmApi, settings: TrtllmSettings, drafter: Any = None) -> dict[str, Any]:
    """Keyword arguments of `tensorrt_llm.LLM` for a checked `settings` (see `check`)."""
    kwargs: dict[str, Any] = dict(
        model=settings.model,
        backend="pytorch",
        dtype=settings.dtype,
        # Tandem sends token ids and detokenizes in the scheduler: no tokenizer in the worker,
        # so every request names its end_id (see convert.sampling_params)
        skip_tokenizer_init=True,
        max_batch_size=settings.max_num_seqs,
        max_num_tokens=settings.max_batched_tokens,
        max_seq_len=settings.max_model_len,
        # prompts longer than max_num_tokens are prefilled in pieces instead of refused
        # (LLM._check_arguments raises RequestError for them without it)
        enable_chunked_prefill=True,
        kv_cache_config=api.KvCacheConfig(
            enable_block_reuse=settings.prefix_caching,
            tokens_per_block=settings.tokens_per_block,
        ),
        cache_transceiver_config=api.CacheTransceiverConfig(
            backend=settings.kv_backend,
            max_tokens_in_buffer=settings.max_tokens_in_buffer,
            kv_transfer_timeout_ms=int(settings.kv_timeout_s * 1000),
        ),
        # iteration stats feed GetLoad (free KV blocks) and the worker's Prometheus gauges
        enable_iter_perf_stats=True,
    )
    if settings.role == "prefill":
        kwargs["disable_overlap_scheduler"] = True
    if drafter is not None and settings.role == "decode":
        kwargs["speculative_config"] = api.UserProvidedDecodingConfig(
            max_draft_len=settings.num_speculative_tokens, drafter=drafter
        )
        # the executor turns it off for user-provided drafting anyway; say so plainly
        kwargs["disable_overlap_scheduler"] = True
    return kwargs
