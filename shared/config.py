"""Service configuration: the one place that reads the environment.

Each service has a dataclass whose fields are its settings. Every field names its environment
variable (`TANDEM_*`) and says what it does; `from_env()` reads them, converts them, checks
them and raises `ConfigError` with a message naming the variable. Nothing here runs at import
time, and nothing here imports torch or grpc: the scheduler loads neither.

`add_cli_args(parser, cls)` turns the same fields into command-line flags (`--port`,
`--decode-addrs`, ...), so a service's `__main__` can let flags override the environment:
`from_env(cls, overrides=vars(parser.parse_args()))`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from shared import hub
from shared.params import MAX_SPECULATIVE_TOKENS

ROLES = ("scheduler", "prefill", "decode", "draft")
DEFAULT_PORTS = {"scheduler": 50051, "prefill": 50052, "decode": 50053, "draft": 50054}
SPEC_PROPOSERS = ("auto", "none", "draft", "ngram")
KV_TRANSPORTS = ("grpc", "collective")
DTYPES = ("float32", "float16", "bfloat16")
QUANTIZATIONS = ("none", "int8")
KV_CACHE_DTYPES = ("auto", "fp8", "int8")


def auto_dtype(device: str) -> str:
    """The element type when TANDEM_DTYPE is not set: bfloat16 on CUDA, float32 on CPU."""
    return "bfloat16" if device.startswith("cuda") else "float32"


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the environment variable."""


def setting(
    env: str, default: Any, help: str, *, choices: tuple[str, ...] | None = None, minimum: float | None = None
):
    """A config field read from `env`, documented by `help`."""
    meta = {"env": env, "help": help, "choices": choices, "minimum": minimum}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ServerSettings:
    """What every service's gRPC server needs."""

    host: str = setting("TANDEM_HOST", "0.0.0.0", "Interface the gRPC server binds to.")
    port: int | None = setting(
        "TANDEM_PORT",
        None,
        "Port of the gRPC server; 0 picks a free one. Default: 50051 scheduler, 50052 prefill, 50053 decode, "
        "50054 draft.",
        minimum=0,
    )
    advertise_address: str = setting(
        "TANDEM_ADVERTISE_ADDR",
        "",
        "host:port other services dial to reach this one; default 127.0.0.1:<bound port>.",
    )
    grace_period_s: float = setting(
        "TANDEM_GRACE_PERIOD_S",
        5.0,
        "On SIGTERM: seconds running requests get to finish before they are cancelled.",
        minimum=0,
    )
    tls_cert: str = setting(
        "TANDEM_TLS_CERT",
        "",
        "PEM certificate (chain) of this service: served on its port(s), and presented as the client "
        "certificate on its calls to other services. Empty (with TANDEM_TLS_KEY): plaintext, for local "
        "development only. See docs/security.md.",
    )
    tls_key: str = setting("TANDEM_TLS_KEY", "", "PEM private key of TANDEM_TLS_CERT.")
    tls_ca: str = setting(
        "TANDEM_TLS_CA",
        "",
        "PEM CA bundle of the cluster. Set: every internal hop (scheduler -> decode -> prefill, decode -> "
        "draft, worker registration, the gRPC KV stream) uses mutual TLS, and only peers with a certificate "
        "it signed are accepted. Needs TANDEM_TLS_CERT and TANDEM_TLS_KEY.",
    )
    tls_server_name: str = setting(
        "TANDEM_TLS_SERVER_NAME",
        "",
        "Name checked against the certificates of the services this one dials (e.g. one SAN every "
        "cluster certificate carries, when workers are dialled by pod IP); empty: the host of the address dialled.",
    )

    def _validate_tls(self, *, internal_only: bool = False) -> None:
        """Certificate and key come together, the CA needs both (mutual TLS presents them), the
        files exist; `internal_only` services (workers, draft) serve no public API, so a
        certificate without the CA (server TLS no peer of theirs could verify) is refused."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("TANDEM_TLS_CERT and TANDEM_TLS_KEY: set both or neither")
        if self.tls_ca and not self.tls_cert:
            raise ConfigError(
                "TANDEM_TLS_CA: mutual TLS needs this service's certificate too (TANDEM_TLS_CERT, TANDEM_TLS_KEY)"
            )
        if internal_only and self.tls_cert and not self.tls_ca:
            raise ConfigError(
                "TANDEM_TLS_CA: required with TANDEM_TLS_CERT on internal services (mutual TLS, or neither)"
            )
        for env, path in (
            ("TANDEM_TLS_CERT", self.tls_cert),
            ("TANDEM_TLS_KEY", self.tls_key),
            ("TANDEM_TLS_CA", self.tls_ca),
        ):
            if path and not os.path.isfile(path):
                raise ConfigError(f"{env}: {path} is not a file")


@dataclass(frozen=True)
class SchedulerConfig(ServerSettings):
    """The scheduler: public `Tandem` API, tokenization, routing to decode and prefill workers."""

    model: str = setting(
        "TANDEM_MODEL",
        "",
        "Model directory (Hugging Face layout), or a repo id in the local Hugging Face cache; the scheduler "
        "reads only its tokenizer files.",
    )
    model_name: str = setting(
        "TANDEM_MODEL_NAME", "", "Name reported by GetModelInfo; default: the repo id, else the model directory's name."
    )
    decode_addrs: list[str] = setting(
        "TANDEM_DECODE_ADDRS",
        [],
        "Comma-separated host:port of decode workers (more may register themselves).",
    )
    prefill_addrs: list[str] = setting(
        "TANDEM_PREFILL_ADDRS",
        [],
        "Comma-separated host:port of prefill workers; none: decode workers prefill locally.",
    )
    disagg_min_tokens: int = setting(
        "TANDEM_DISAGG_MIN_TOKENS",
        0,
        "Prompts with fewer uncached tokens than this are prefilled on the decode worker itself (0: always disaggregate).",
        minimum=0,
    )
    health_interval_s: float = setting(
        "TANDEM_HEALTH_INTERVAL_S",
        1.0,
        "Seconds between health and load checks of each worker.",
        minimum=0.05,
    )
    default_max_tokens: int = setting(
        "TANDEM_DEFAULT_MAX_TOKENS", 16, "max_tokens of requests that do not set it.", minimum=1
    )
    max_stop_strings: int = setting(
        "TANDEM_MAX_STOP_STRINGS", 16, "Most stop strings per request.", minimum=0
    )
    prefix_memory_blocks: int = setting(
        "TANDEM_PREFIX_MEMORY_BLOCKS",
        4096,
        "Prompt block hashes remembered per worker to estimate its cached prefix when routing.",
        minimum=0,
    )
    max_inflight_per_decode: int = setting(
        "TANDEM_MAX_INFLIGHT_PER_DECODE",
        64,
        "Requests the scheduler runs at once per healthy decode worker; more wait in its admission queue.",
        minimum=1,
    )
    max_queued_requests: int = setting(
        "TANDEM_MAX_QUEUED_REQUESTS",
        256,
        "Requests that may wait in the admission queue (higher priority first); past it: RESOURCE_EXHAUSTED.",
        minimum=0,
    )
    max_queued_tokens: int = setting(
        "TANDEM_MAX_QUEUED_TOKENS",
        1 << 20,
        "Prompt + max_tokens tokens that may wait in the admission queue; past it: RESOURCE_EXHAUSTED.",
        minimum=0,
    )
    worker_expiry_s: float = setting(
        "TANDEM_WORKER_EXPIRY_S",
        60.0,
        "A self-registered worker that fails its health checks and has not registered again for this long "
        "is forgotten (a pod scaled down or replaced); configured workers are never forgotten.",
        minimum=0.05,
    )
    internal_port: int = setting(
        "TANDEM_INTERNAL_PORT",
        50055,
        "With TANDEM_TLS_CA: a second port of the scheduler's gRPC server that requires a client "
        "certificate signed by the CA; workers register here (their TANDEM_SCHEDULER_ADDR), since the public "
        "port asks clients for no certificate. 0 picks a free one.",
        minimum=0,
    )
    api_keys_file: str = setting(
        "TANDEM_API_KEYS_FILE",
        "",
        "File of API keys, one per line (# comments); clients send `authorization: Bearer <key>`. "
        "Re-read when it changes (add the new key, move clients, remove the old one). Empty: no keys "
        "needed (local development).",
    )
    api_key_max_concurrency: int = setting(
        "TANDEM_API_KEY_MAX_CONCURRENCY",
        64,
        "Requests one API key may have running at once; past it: RESOURCE_EXHAUSTED (HTTP 429). 0: no limit.",
        minimum=0,
    )
    max_migrations: int = setting(
        "TANDEM_MAX_MIGRATIONS",
        2,
        "Times a request may move to another decode worker after its stream started (its worker died or "
        "stopped); it resumes from the tokens already sent. Past it: UNAVAILABLE.",
        minimum=0,
    )

    http_port: int = setting(
        "TANDEM_HTTP_PORT",
        8000,
        "Port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, "
        "/health, /metrics), bound to TANDEM_HOST beside the gRPC server; 0 turns it off.",
        minimum=0,
    )

    tool_call_parser: str = setting(
        "TANDEM_TOOL_CALL_PARSER",
        "auto",
        "How /v1/chat/completions finds tool calls in a reply for tool_choice \"auto\": hermes "
        "(<tool_call>{...}</tool_call>: Qwen2/2.5/3, Hermes), llama3_json (a reply that is {\"name\", "
        "\"parameters\"}: Llama 3.1+), auto (the one the model's chat template writes), or none (tool_choice "
        "\"auto\" is then refused; \"required\" and a named function work with any model).",
        choices=("auto", "none", "hermes", "llama3_json"),
    )

    reasoning_parser: str = setting(
        "TANDEM_REASONING_PARSER",
        "auto",
        "How /v1/chat/completions and /v1/responses return what a model writes between <think> and "
        "</think> (DeepSeek-R1 and its distills, Qwen3, QwQ): think (also named deepseek_r1 or qwen3) "
        "returns it apart, as the message's reasoning_content and a Responses reasoning item; none leaves "
        "it in the content; auto turns it on when the model's chat template writes <think>.",
        choices=("auto", "none", "think", "deepseek_r1", "qwen3"),
    )

    max_request_bytes: int = setting(
        "TANDEM_MAX_REQUEST_BYTES",
        16 << 20,
        "Largest Generate request (serialized bytes) the public API takes; a larger one is refused with "
        "INVALID_ARGUMENT naming this limit (up to 4x it; beyond that gRPC itself refuses it with "
        "RESOURCE_EXHAUSTED before it is read). A text prompt is also refused, untokenized, when its "
        "UTF-8 size exceeds what the model length could hold (max_model_len x twice the longest token's bytes).",
        minimum=1024,
    )

    def validate(self) -> None:
        if not self.model:
            raise ConfigError(
                "TANDEM_MODEL: required (the model directory; the scheduler needs its tokenizer.json)"
            )
        self._validate_tls()
        if self.api_keys_file and not os.path.isfile(self.api_keys_file):
            raise ConfigError(f"TANDEM_API_KEYS_FILE: {self.api_keys_file} is not a file")
        for env, addrs in (
            ("TANDEM_DECODE_ADDRS", self.decode_addrs),
            ("TANDEM_PREFILL_ADDRS", self.prefill_addrs),
        ):
            for addr in addrs:
                _check_address(env, addr)
        if self.http_port > 65535:
            raise ConfigError(f"TANDEM_HTTP_PORT: {self.http_port} is not a port (0 turns the HTTP API off)")
        if self.http_port and self.http_port == self.port:
            raise ConfigError(f"TANDEM_HTTP_PORT: {self.http_port} is the gRPC port (TANDEM_PORT) too")


@dataclass(frozen=True)
class EngineSettings(ServerSettings):
    """What every service that runs a model (prefill, decode, draft) needs."""

    model: str = setting(
        "TANDEM_MODEL",
        "",
        "Model directory (config.json, *.safetensors or pytorch_model*.bin, tokenizer.json), or a repo id "
        "(org/name, org/name@revision) in the local Hugging Face cache ($HF_HUB_CACHE, $HF_HOME/hub).",
    )
    model_name: str = setting(
        "TANDEM_MODEL_NAME", "", "Name reported to the scheduler; default: the repo id, else the model directory's name."
    )
    device: str = setting("TANDEM_DEVICE", "cpu", "torch device of the engine: cpu, cuda, cuda:N.")
    dtype: str = setting(
        "TANDEM_DTYPE",
        "auto",
        "Weight and KV element type; auto: bfloat16 on cuda, float32 on cpu.",
        choices=(*DTYPES, "auto"),
    )
    quantization: str = setting(
        "TANDEM_QUANTIZATION",
        "none",
        "Weights: none (TANDEM_DTYPE), or int8: every linear layer (and a tied embedding) quantized at load "
        "to int8 with one scale per output channel (on CPU, batches of more than 4 rows also round each activation "
        "row to int8 and multiply int8 x int8). An int8 checkpoint "
        "(compressed-tensors' symmetric per-channel int8 weights) loads as it is.",
        choices=QUANTIZATIONS,
    )
    kv_cache_dtype: str = setting(
        "TANDEM_KV_CACHE_DTYPE",
        "auto",
        "KV cache elements: auto (TANDEM_DTYPE), or fp8 (e4m3) / int8, each 32 elements of a head sharing a "
        "power-of-two scale: ~1.94x the tokens of bfloat16 in the same memory. Needs head_dim divisible by "
        "32. Prefill and decode workers of one deployment must agree (a mismatch is refused).",
        choices=KV_CACHE_DTYPES,
    )
    block_size: int = setting("TANDEM_BLOCK_SIZE", 16, "Tokens per KV block.", minimum=1)
    num_blocks: int | None = setting(
        "TANDEM_NUM_BLOCKS",
        None,
        "KV blocks to allocate; default: sized from TANDEM_KV_CACHE_MEMORY (cpu) or free memory (cuda).",
        minimum=1,
    )
    kv_cache_memory: int | None = setting(
        "TANDEM_KV_CACHE_MEMORY",
        None,
        "Bytes of KV cache when TANDEM_NUM_BLOCKS is not set; default: 1 GiB on cpu, "
        "TANDEM_KV_CACHE_MEMORY_FRACTION of the free memory on cuda.",
        minimum=1,
    )
    kv_cache_memory_fraction: float = setting(
        "TANDEM_KV_CACHE_MEMORY_FRACTION",
        0.85,
        "On cuda, without TANDEM_NUM_BLOCKS or TANDEM_KV_CACHE_MEMORY: share of the GPU memory still free "
        "once the weights are loaded that goes to the KV cache (the rest: activations, CUDA graphs).",
        minimum=0.01,
    )
    cuda_graphs: bool = setting(
        "TANDEM_CUDA_GRAPHS", True, "On cuda, replay decode steps as CUDA graphs (captured at start)."
    )
    max_num_seqs: int = setting("TANDEM_MAX_NUM_SEQS", 64, "Most sequences in one batch.", minimum=1)
    max_model_len: int | None = setting(
        "TANDEM_MAX_MODEL_LEN",
        None,
        "Longest sequence in tokens; default: the model's max_position_embeddings.",
        minimum=1,
    )
    torch_threads: int | None = setting(
        "TANDEM_TORCH_THREADS",
        None,
        "torch intra-op threads, so several workers on one host do not oversubscribe it.",
        minimum=1,
    )

    def __post_init__(self) -> None:
        if self.dtype == "auto":
            object.__setattr__(self, "dtype", auto_dtype(self.device))

    def _validate_engine(self) -> None:
        self._validate_tls(internal_only=True)
        if self.kv_cache_memory_fraction > 1:
            raise ConfigError(
                f"TANDEM_KV_CACHE_MEMORY_FRACTION: must be <= 1, got {self.kv_cache_memory_fraction}"
            )
        if not self.model:
            raise ConfigError("TANDEM_MODEL: required (the model directory)")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ConfigError(f"TANDEM_DEVICE: expected cpu, cuda or cuda:N, got {self.device!r}")

    def _engine_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            model=self.model,
            dtype=self.dtype,
            quantization=self.quantization,
            kv_cache_dtype=self.kv_cache_dtype,
            device=self.device,
            block_size=self.block_size,
            num_blocks=self.num_blocks,
            max_num_seqs=self.max_num_seqs,
            max_model_len=self.max_model_len,
            kv_cache_memory_fraction=self.kv_cache_memory_fraction,
            cuda_graphs=self.cuda_graphs,
        )
        if self.kv_cache_memory is not None:
            kwargs["kv_cache_memory"] = self.kv_cache_memory
        return kwargs


@dataclass(frozen=True)
class WorkerConfig(EngineSettings):
    """A prefill or decode worker: one engine, the KV transport, optional self-registration."""

    role: str = setting(
        "TANDEM_ROLE", "decode", "Worker role; set by the service entry point.", choices=("prefill", "decode")
    )
    engine: str = setting(
        "TANDEM_ENGINE",
        "torch",
        "Engine implementation: torch, or trtllm (TensorRT-LLM, its image only; see docs/deploy.md).",
        choices=("torch", "trtllm"),
    )
    max_batched_tokens: int = setting(
        "TANDEM_MAX_BATCHED_TOKENS",
        512,
        "Token budget of one engine step (longer prompts prefill in chunks).",
        minimum=1,
    )
    prefix_caching: bool = setting(
        "TANDEM_PREFIX_CACHING", True, "Reuse KV blocks of identical prompt prefixes."
    )
    kv_transport: str = setting(
        "TANDEM_KV_TRANSPORT",
        "grpc",
        "How prompt KV moves from prefill to decode workers.",
        choices=KV_TRANSPORTS,
    )
    kv_chunk_bytes: int = setting(
        "TANDEM_KV_CHUNK_BYTES",
        1 << 20,
        "Largest KV payload of one gRPC message (well under gRPC's 4 MiB limit).",
        minimum=1024,
    )
    kv_receiver_port: int = setting(
        "TANDEM_KV_RECEIVER_PORT",
        0,
        "Decode worker, collective transport: port of the KV receiver store prefill workers connect to; "
        "0 picks a free one. Its host is that of TANDEM_ADVERTISE_ADDR (default 127.0.0.1). "
        "The pair groups use torch.distributed's backend for the device: gloo on cpu, nccl on cuda.",
        minimum=0,
    )
    kv_timeout_s: float = setting(
        "TANDEM_KV_TIMEOUT_S",
        60.0,
        "Seconds one KV transfer (or forming a collective pair group) may take before the request fails.",
        minimum=1,
    )
    trtllm_kv_backend: str = setting(
        "TANDEM_TRTLLM_KV_BACKEND",
        "UCX",
        "trtllm engine: TensorRT-LLM cache transceiver backend that moves the KV between workers.",
        choices=("UCX", "NIXL", "DEFAULT"),
    )
    trtllm_max_tokens_in_buffer: int | None = setting(
        "TANDEM_TRTLLM_MAX_TOKENS_IN_BUFFER",
        None,
        "trtllm engine: cache transceiver buffer in tokens, a multiple of TANDEM_BLOCK_SIZE; "
        "default: the longest sequence up to 8192 tokens, rounded up to a block (memory formula in docs/deploy.md).",
        minimum=1,
    )
    scheduler_addr: str = setting(
        "TANDEM_SCHEDULER_ADDR",
        "",
        "host:port of the scheduler to register with; the worker registers with every IPv4 address the host "
        "resolves to (a Kubernetes headless Service names every scheduler pod); empty: do not register.",
    )
    register_interval_s: float = setting(
        "TANDEM_REGISTER_INTERVAL_S",
        5.0,
        "With TANDEM_SCHEDULER_ADDR: seconds between repeated registrations, which bring this worker back "
        "into the pool of a restarted (or replaced) scheduler; failed attempts retry sooner.",
        minimum=0.05,
    )
    spec_proposer: str = setting(
        "TANDEM_SPEC_PROPOSER",
        "auto",
        "Decode worker, speculative decoding: draft (a draft model: the draft service at TANDEM_DRAFT_ADDR, "
        "or TANDEM_DRAFT_MODEL run inside this worker), ngram (prompt lookup, no model), none; auto: draft "
        "when TANDEM_DRAFT_ADDR or TANDEM_DRAFT_MODEL is set, else none.",
        choices=SPEC_PROPOSERS,
    )
    draft_addr: str = setting("TANDEM_DRAFT_ADDR", "", "host:port of the draft service (services.draft).")
    draft_model: str = setting(
        "TANDEM_DRAFT_MODEL",
        "",
        "Decode worker (torch engine): a draft model directory to run inside this worker, on its device, "
        "instead of calling a draft service (no RPC per step; the draft shares the worker's accelerator). "
        "Its vocabulary must be the target model's.",
    )
    draft_kv_cache_memory: int = setting(
        "TANDEM_DRAFT_KV_CACHE_MEMORY",
        256 << 20,
        "With TANDEM_DRAFT_MODEL: bytes of the in-worker draft's KV cache (sequences it cannot hold are "
        "decoded without drafts).",
        minimum=1,
    )
    num_speculative_tokens: int = setting(
        "TANDEM_NUM_SPECULATIVE_TOKENS",
        4,
        f"Draft tokens verified per step when speculating (k, at most {MAX_SPECULATIVE_TOKENS}); requests "
        "may ask for another k or 0 (off). 0 here turns speculation off.",
        minimum=0,
    )
    spec_adaptive: bool = setting(
        "TANDEM_SPEC_ADAPTIVE",
        True,
        "Decode worker: choose each step's k (up to TANDEM_NUM_SPECULATIVE_TOKENS, down to 0) from the measured "
        "draft and target step costs and acceptance rate, so that speculation turns itself down in large "
        "batches or at low acceptance; 0: always the configured k.",
    )
    draft_timeout_s: float = setting(
        "TANDEM_DRAFT_TIMEOUT_S",
        0.5,
        "Deadline of one step's call to the draft service; a step whose call misses it decodes without drafts.",
        minimum=0.001,
    )
    draft_retry_s: float = setting(
        "TANDEM_DRAFT_RETRY_S",
        1.0,
        "After a failed or late draft call, decode without the draft for this many seconds, then try again.",
        minimum=0,
    )
    draft_transport: str = setting(
        "TANDEM_DRAFT_TRANSPORT",
        "stream",
        "Decode worker with a draft service: stream (its plain TCP stream for Propose and Release, when it "
        "offers one, see TANDEM_DRAFT_STREAM; else gRPC) or grpc (always gRPC).",
        choices=("stream", "grpc"),
    )
    draft_ahead: bool = setting(
        "TANDEM_DRAFT_AHEAD",
        False,
        "Decode worker with a draft service, experimental: while the target verifies a step's proposals, the draft "
        "drafts the next step after each likely outcome (Draft.ProposeAhead), so that a step whose outcome it "
        "foresaw starts without waiting for the draft. Greedy requests, batches of up to 4 speculating sequences. "
        "Off by default: on a 2-core CPU host it gained nothing (docs/benchmarks.md); meant for a draft on its own GPU.",
    )

    @property
    def speculation(self) -> str:
        """The proposer the decode worker uses: "draft", "ngram" or "none" (auto resolved)."""
        if self.num_speculative_tokens == 0:
            return "none"
        if self.spec_proposer == "auto":
            return "draft" if self.draft_addr or self.draft_model else "none"
        return self.spec_proposer

    def validate(self) -> None:
        self._validate_engine()
        if self.scheduler_addr:
            _check_address("TANDEM_SCHEDULER_ADDR", self.scheduler_addr)
        if self.draft_addr:
            _check_address("TANDEM_DRAFT_ADDR", self.draft_addr)
        if self.draft_addr and self.draft_model:
            raise ConfigError(
                "TANDEM_DRAFT_MODEL: set either it (the draft inside this worker) or TANDEM_DRAFT_ADDR "
                "(the draft service), not both"
            )
        if self.spec_proposer == "draft" and not (self.draft_addr or self.draft_model):
            raise ConfigError("TANDEM_DRAFT_ADDR or TANDEM_DRAFT_MODEL: one is required when TANDEM_SPEC_PROPOSER=draft")
        if self.draft_model and self.engine != "torch":
            raise ConfigError(
                f"TANDEM_DRAFT_MODEL: runs with the torch engine only (TANDEM_ENGINE={self.engine}); "
                "use the draft service (TANDEM_DRAFT_ADDR)"
            )
        if self.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise ConfigError(
                f"TANDEM_NUM_SPECULATIVE_TOKENS: must be <= {MAX_SPECULATIVE_TOKENS}, got {self.num_speculative_tokens}"
            )

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `shared.engine.EngineConfig` (built by the worker, which imports torch)."""
        return {
            **self._engine_kwargs(),
            "max_num_batched_tokens": self.max_batched_tokens,
            "enable_prefix_caching": self.prefix_caching,
            "num_speculative_tokens": self.num_speculative_tokens,
            "adaptive_speculation": self.spec_adaptive,
        }

    def draft_engine_kwargs(self) -> dict[str, Any]:
        """`EngineConfig` keyword arguments of the draft model run inside this worker
        (TANDEM_DRAFT_MODEL): the worker's device, element type, block size and lengths, its own
        KV memory, no prefix sharing (a draft's KV is rolled back), no quantization."""
        return {
            **self._engine_kwargs(),
            "model": self.draft_model,
            "quantization": "none",
            "kv_cache_dtype": "auto",
            "num_blocks": None,
            "kv_cache_memory": self.draft_kv_cache_memory,
            "cuda_graphs": False,
            "enable_prefix_caching": False,
        }


@dataclass(frozen=True)
class DraftConfig(EngineSettings):
    """The draft service: a small model proposing tokens for the decode workers' speculation.
    Its TANDEM_MODEL is the draft model, whose vocabulary must be the target model's."""

    role: ClassVar[str] = "draft"

    idle_timeout_s: float = setting(
        "TANDEM_DRAFT_IDLE_TIMEOUT_S",
        60.0,
        "Free a sequence's state when no call mentioned it for this long (its decode worker died or forgot).",
        minimum=0.1,
    )
    ahead_rows: int = setting(
        "TANDEM_DRAFT_AHEAD_ROWS",
        5,
        "Draft.ProposeAhead: how many outcomes of a call's verification the draft drafts ahead (split among its "
        "sequences), likeliest first: all proposals accepted, then each proposal's runner-up, then the next "
        "runner-ups. The rows of one forward pass: on a GPU nearly free, on a CPU each costs.",
        minimum=1,
    )

    stream: bool = setting(
        "TANDEM_DRAFT_STREAM",
        True,
        "Serve Draft.Propose and Draft.Release on a plain TCP stream too (services/common/draft_stream.py), "
        "beside gRPC: a decode worker's call per step then costs one socket wake-up each way instead of gRPC's "
        "thread hand-offs. Bound to TANDEM_HOST; advertised through Worker.GetInfo. Not served when TLS is on "
        "(decode workers then call over gRPC with TLS).",
    )
    stream_port: int = setting(
        "TANDEM_DRAFT_STREAM_PORT",
        0,
        "Port of the stream transport (TANDEM_DRAFT_STREAM); 0 picks a free one. Fix it where only declared "
        "ports are reachable (a Kubernetes Service).",
        minimum=0,
    )

    def validate(self) -> None:
        self._validate_engine()
        if self.stream_port > 65535:
            raise ConfigError(f"TANDEM_DRAFT_STREAM_PORT: {self.stream_port} is not a port")
        if self.stream_port and self.stream_port == self.port:
            raise ConfigError(f"TANDEM_DRAFT_STREAM_PORT: {self.stream_port} is the gRPC port (TANDEM_PORT) too")

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `shared.engine.EngineConfig` for the draft model."""
        # a draft's KV is rolled back into blocks a prefix cache would share: no sharing
        return {**self._engine_kwargs(), "enable_prefix_caching": False}


def _check_address(env: str, addr: str) -> None:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{env}: expected host:port, got {addr!r}")


def _parse(env: str, raw: str, typ: Any) -> Any:
    """Convert the text of an environment variable (or CLI flag) to the field's type."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if raw.strip() == "":
            return None
        (typ,) = [a for a in args if a is not type(None)]
        origin = typing.get_origin(typ)
    if origin is list:
        return [item.strip() for item in raw.split(",") if item.strip()]
    if typ is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{env}: expected true or false, got {raw!r}")
    if typ is int:
        try:
            return int(raw.strip())
        except ValueError:
            raise ConfigError(f"{env}: expected an integer, got {raw!r}") from None
    if typ is float:
        try:
            return float(raw.strip())
        except ValueError:
            raise ConfigError(f"{env}: expected a number, got {raw!r}") from None
    return raw.strip()


def from_env(cls: type, env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None):
    """Build `cls` from the environment (os.environ unless `env` is given), then apply overrides.

    Overrides (e.g. parsed CLI flags) win over the environment; None values are ignored. Raises
    ConfigError naming the variable of the first bad setting.
    """
    env = os.environ if env is None else env
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        name, meta = f.name, f.metadata
        if name in overrides:
            value = overrides[name]
            if isinstance(value, str):
                value = _parse(f"--{name.replace('_', '-')}", value, hints[name])
        elif meta.get("env") in env:
            value = _parse(meta["env"], env[meta["env"]], hints[name])
        else:
            continue
        _check_value(meta.get("env", name), value, meta)
        values[name] = value
    _resolve_models(cls, values, env)
    config = cls(**values)
    if config.port is None:
        role = "scheduler" if isinstance(config, SchedulerConfig) else config.role
        config = dataclasses.replace(config, port=DEFAULT_PORTS[role])
    config.validate()
    return config


def _resolve_models(cls: type, values: dict[str, Any], env: Mapping[str, str]) -> None:
    """A model (or draft model) named by a Hugging Face repo id loads from its snapshot in the
    local cache (shared/hub.py), and the served model name defaults to the repo id."""
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}
    for name in ("model", "draft_model"):
        if not values.get(name):
            continue
        try:
            values[name], repo_id = hub.resolve(values[name], env)
        except hub.ModelNotFound as e:
            raise ConfigError(f"{meta[name]['env']}: {e}") from None
        if repo_id and name == "model" and "model_name" in meta and not values.get("model_name"):
            values["model_name"] = repo_id


def _check_value(env: str, value: Any, meta: Mapping[str, Any]) -> None:
    choices, minimum = meta.get("choices"), meta.get("minimum")
    if choices is not None and value not in choices:
        raise ConfigError(f"{env}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    if minimum is not None and value is not None and value < minimum:
        raise ConfigError(f"{env}: must be >= {minimum}, got {value!r}")


def add_cli_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of `cls` (as strings, parsed by from_env); unset flags stay None."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta = f.metadata
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            default=None,
            metavar=meta["env"],
            help=f"{meta['help']} (env {meta['env']})",
        )


def telemetry_from_env(
    default_service_name: str, env: Mapping[str, str] | None = None, host: str = "127.0.0.1"
):
    """Telemetry settings (OTEL_*, TANDEM_LOG_*, TANDEM_METRICS_PORT, ...), see shared/telemetry/config.py.
    `host`: the service's TANDEM_HOST, which its metrics server binds to as well."""
    from shared.telemetry.config import TelemetryConfig

    try:
        return TelemetryConfig.from_env(
            os.environ if env is None else env, default_service_name=default_service_name, metrics_host=host
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None


def describe(cls: type) -> str:
    """A table of the settings of `cls`: variable, default, meaning (for --help and docs)."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append(f"{f.metadata['env']:<28} {default!r:<12} {f.metadata['help']}")
    return "\n".join(rows)
