"""Request-level types that cross the engine boundary: sampling parameters in, outputs out.

Nothing here knows about tensors, gRPC or tokenizers, and nothing imports torch: the
scheduler validates requests with the same rules the engine uses (`check_prompt`,
`SamplingParams.validate`, `check_length`, in that order), without loading torch.
Exported again by `shared.engine`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

MAX_LOGPROBS = 20  # top-n logprobs per token, at most
MAX_SPECULATIVE_TOKENS = 16  # draft tokens verified per step, at most
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2], as OpenAI's
MAX_LOGIT_BIAS = 100.0  # a logit bias lies in [-100, 100], as OpenAI's
MAX_GUIDANCE_BYTES = 64 * 1024  # a structured-output schema, regex or grammar, at most
MAX_REASONING_TAG_BYTES = 64  # a guidance's reasoning_start / reasoning_end, at most
GUIDANCE_KINDS = ("json_schema", "json_object", "regex", "lark")


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model length
    CANCELLED = "cancelled"
    ERROR = "error"


class InvalidRequest(ValueError):
    """A request the engine cannot serve as asked; the message names the field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


def check_length(num_prompt_tokens: int, max_tokens: int, max_model_len: int | None) -> None:
    """The model-length rule (engine and scheduler): the prompt plus max_tokens must fit. A prompt
    that alone leaves no room for a generated token is blamed on the prompt, not on max_tokens.
    `max_model_len` None: not known yet (the scheduler before any decode worker told it)."""
    if max_model_len is None:
        return
    if num_prompt_tokens >= max_model_len:
        raise InvalidRequest(
            "prompt",
            f"prompt ({num_prompt_tokens} tokens) exceeds the model length {max_model_len} "
            f"(at most {max_model_len - 1} prompt tokens, to leave room for one generated token)",
        )
    if num_prompt_tokens + max_tokens > max_model_len:
        raise InvalidRequest(
            "max_tokens",
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
            f"{num_prompt_tokens + max_tokens} exceeds the model length {max_model_len}",
        )


@dataclass(frozen=True)
class Guidance:
    """Structured output: the generated text must belong to a language, and the request ends
    once the text is complete. kind: json_schema (value: the schema as JSON text), json_object
    (any JSON object; no value), regex (the whole output matches it), lark (a Lark grammar as
    llguidance reads it). Compiled by shared/guidance.py."""

    kind: str
    value: str = ""
    # a thinking model's reasoning first: reasoning_start (optional), free text, reasoning_end;
    # the language holds after it (reasoning_end empty: from the first token)
    reasoning_start: str = ""
    reasoning_end: str = ""


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. temperature == 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    # OpenAI's penalties, over the generated tokens only; 0: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int = 0  # top-n logprobs returned with each sampled token (0 = only none)
    stop: list[str] = field(default_factory=list)  # applied by the text layer, not the engine
    # draft tokens verified per step: None = the worker's default, 0 = no speculation
    num_speculative_tokens: int | None = None
    # Seeded draws for output i use index i + seed_offset. A request resumed on another worker
    # (its earlier outputs appended to its prompt) passes how many it already produced, so
    # it keeps drawing the noise it would have drawn had it never moved.
    seed_offset: int = 0
    # None: off; n: the logprob of every prompt token after the first, with the n most likely
    # alternatives (RequestOutput.prompt_logprobs, on the first output)
    prompt_logprobs: int | None = None
    guidance: Guidance | None = None  # structured output (no speculation for such a request)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidRequest naming the first bad field."""
        if self.max_tokens < 1:
            raise InvalidRequest("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest("temperature", f"must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequest("top_k", f"must be >= 0 (0 disables it), got {self.top_k}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("top_p", f"must be in (0, 1], got {self.top_p}")
        if not math.isfinite(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequest("min_p", f"must be in [0, 1], got {self.min_p}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidRequest(
                "repetition_penalty", f"must be a finite number > 0, got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise InvalidRequest(name, f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}")
        for t, bias in self.logit_bias.items():
            if not math.isfinite(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise InvalidRequest(
                    "logit_bias", f"token {t}: bias must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias}"
                )
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequest("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(
                "prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}"
            )
        g = self.guidance
        if g is not None:
            if g.kind not in GUIDANCE_KINDS:
                raise InvalidRequest("guidance", f"kind must be one of {', '.join(GUIDANCE_KINDS)}, got {g.kind!r}")
            if g.kind != "json_object" and not g.value:
                raise InvalidRequest("guidance", f"the {g.kind} is empty")
            if len(g.value.encode()) > MAX_GUIDANCE_BYTES:
                raise InvalidRequest(
                    "guidance", f"the {g.kind} is {len(g.value.encode())} bytes, more than {MAX_GUIDANCE_BYTES}"
                )
            if g.reasoning_start and not g.reasoning_end:
                raise InvalidRequest("guidance", "reasoning_start needs a reasoning_end")
            for tag, value in (("reasoning_start", g.reasoning_start), ("reasoning_end", g.reasoning_end)):
                if len(value.encode()) > MAX_REASONING_TAG_BYTES:
                    raise InvalidRequest(
                        "guidance", f"{tag} is {len(value.encode())} bytes, more than {MAX_REASONING_TAG_BYTES}"
                    )
        if self.seed_offset < 0:
            raise InvalidRequest("seed_offset", f"must be >= 0, got {self.seed_offset}")
        k = self.num_speculative_tokens
        if k is not None and not 0 <= k <= MAX_SPECULATIVE_TOKENS:
            raise InvalidRequest(
                "num_speculative_tokens", f"must be in [0, {MAX_SPECULATIVE_TOKENS}], got {k}"
            )
        if vocab_size is not None:
            for t in self.stop_token_ids:
                if not 0 <= t < vocab_size:
                    raise InvalidRequest(
                        "stop_token_ids", f"token id {t} outside the vocabulary [0, {vocab_size})"
                    )
            for t in self.logit_bias:
                if not 0 <= t < vocab_size:
                    raise InvalidRequest("logit_bias", f"token id {t} outside the vocabulary [0, {vocab_size})")


def check_prompt(
    prompt_token_ids: Sequence[int],
    vocab_size: int,
    max_model_len: int | None,
    field_name: str = "prompt_token_ids",
) -> None:
    """A prompt the model can take: not empty (else `field_name`, the prompt as the caller calls
    it), room for one generated token within the model length (check_length's prompt rule, checked
    before the ids so that a huge prompt is refused without a pass over it), every id in the
    vocabulary (`field_name`)."""
    if not prompt_token_ids:
        raise InvalidRequest(field_name, "must not be empty")
    check_length(len(prompt_token_ids), 0, max_model_len)
    for i, t in enumerate(prompt_token_ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise InvalidRequest(
                field_name, f"[{i}] {t!r} is not a token id in the vocabulary [0, {vocab_size})"
            )


@dataclass
class TokenLogprobs:
    """Logprob of the sampled token and the top-n alternatives at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one engine step produced for one request: only the new tokens."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprobs] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_output_tokens: int = 0  # total so far
    num_spec_proposed: int = 0  # draft tokens proposed for this request so far
    num_spec_accepted: int = 0  # of which the target accepted
    num_spec_steps: int = 0  # steps that verified drafts (mean accepted length = accepted / steps)
    queue_seconds: float | None = None  # add_request to first scheduled (None: not yet, or KV imported)
    # on the first output when SamplingParams.prompt_logprobs is set: prompt token i + 1 at index i
    prompt_logprobs: list[TokenLogprobs] | None = None
