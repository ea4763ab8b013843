"""Tandem <-> TensorRT-LLM types: sampling parameters in; tokens, logprobs, finish reasons,
usage out; and the context phase's DisaggregatedParams as opaque bytes for the Prefill stream.

No tensorrt_llm import: the classes come from a `TrtllmApi` (real or fake).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from shared.engine import FinishReason, SamplingParams, TokenLogprobs

from .config import ModelInfo, TrtllmApi

# CompletionOutput.finish_reason -> Tandem. "timeout" is TensorRT-LLM's own per-request time
# limit, which Tandem never sets: if it shows up the request did not end normally.
FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "cancelled": FinishReason.CANCELLED,
    "timeout": FinishReason.ERROR,
}
# How a context_only request may end and still have its KV ready for a generation_only one:
# TensorRT-LLM's own orchestrator goes on to generation on either (serve/openai_disagg_service.py,
# `OpenAIDisaggregatedService._need_gen`); newer releases report "not_finished" there.
CONTEXT_DONE = ("length", "not_finished")
HANDOFF_VERSION = 1


def sampling_params(
    api: TrtllmApi,
    params: SamplingParams,
    info: ModelInfo,
    *,
    max_tokens: int | None = None,
    num_prompt_tokens: int = 0,
):
    """TensorRT-LLM SamplingParams for a Tandem request.

    - greedy (temperature 0) is top_k=1: every TensorRT-LLM sampler honours it, while
      temperature=0 has meant different things across releases;
    - Tandem's defaults that mean "off" become None (TensorRT-LLM's runtime defaults);
    - end_id is the model's first EOS id (the worker has no tokenizer), the other EOS ids join
      stop_token_ids, and ignore_eos is passed through;
    - stop strings are not passed: the scheduler applies them to the detokenized text;
    - presence and frequency penalties count generated tokens only, as the torch engine's:
      TensorRT-LLM counts the prompt's too unless told to skip it (`prompt_ignore_length`);
      a resumed request's prompt ends with its earlier outputs (`seed_offset` of them), which count;
    - the token that ends a request stays in its output, as with the torch engine (whose last
      output token is the EOS or stop token that ended it): TensorRT-LLM strips a matched stop
      token from `token_ids` unless `include_stop_str_in_output` (executor/result.py,
      `GenerationResultBase._handle_sequence`), so it is always set.
    """
    eos = info.eos_token_ids
    stop_ids = list(params.stop_token_ids)
    if not params.ignore_eos:
        stop_ids += [t for t in eos[1:] if t not in stop_ids]
    kwargs: dict[str, Any] = dict(
        max_tokens=max_tokens if max_tokens is not None else params.max_tokens,
        end_id=eos[0] if eos else -1,
        pad_id=eos[0] if eos else 0,
        stop_token_ids=stop_ids or None,
        ignore_eos=params.ignore_eos,
        seed=params.seed,
        logprobs=params.logprobs or None,
        detokenize=False,
        include_stop_str_in_output=True,
    )
    if params.greedy:
        kwargs["top_k"] = 1
    else:
        kwargs.update(
            temperature=params.temperature,
            top_k=params.top_k or None,
            top_p=params.top_p if params.top_p < 1.0 else None,
            min_p=params.min_p or None,
        )
    if params.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = params.repetition_penalty
    if params.presence_penalty or params.frequency_penalty:
        kwargs.update(
            presence_penalty=params.presence_penalty or None,
            frequency_penalty=params.frequency_penalty or None,
            prompt_ignore_length=max(0, num_prompt_tokens - params.seed_offset),
        )
    return api.SamplingParams(**kwargs)


def finish_reason(reason: str | None) -> FinishReason:
    """A finished CompletionOutput's reason; an unknown or missing one is an error."""
    return FINISH_REASONS.get(reason or "", FinishReason.ERROR)


def token_logprobs(tokens: list[int], entries: list[Any], top_n: int) -> list[TokenLogprobs] | None:
    """Tandem logprobs of `tokens` from TensorRT-LLM's per-token entries (same length).

    An entry is `{token_id: Logprob(logprob, rank)}` (top-n plus the sampled token) or, from
    older releases, the sampled token's logprob as a float."""
    if not top_n or len(entries) < len(tokens):
        return None
    out = []
    for token, entry in zip(tokens, entries[len(entries) - len(tokens) :], strict=True):
        if isinstance(entry, dict):
            chosen = entry.get(token)
            ranked = sorted(entry.items(), key=lambda kv: (kv[1].rank or 0, -kv[1].logprob))
            top = [(t, lp.logprob) for t, lp in ranked[:top_n]]
            out.append(TokenLogprobs(token, chosen.logprob if chosen is not None else float("-inf"), top))
        else:
            out.append(TokenLogprobs(token, float(entry), []))
    return out


@dataclass(frozen=True)
class Handoff:
    """The context phase's result that the decode worker's generation_only request needs.

    TensorRT-LLM's DisaggregatedParams, minus request_type; opaque_state is the cache
    transceiver's (where and how to pull the KV) and Tandem never looks inside it."""

    first_gen_tokens: list[int]
    ctx_request_id: int
    opaque_state: bytes
    draft_tokens: list[int] | None = None

    def encode(self) -> bytes:
        return json.dumps(
            {
                "v": HANDOFF_VERSION,
                "first_gen_tokens": self.first_gen_tokens,
                "ctx_request_id": self.ctx_request_id,
                "opaque_state": base64.b64encode(self.opaque_state).decode(),
                "draft_tokens": self.draft_tokens,
            }
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> Handoff:
        try:
            raw = json.loads(data)
            if raw.get("v") != HANDOFF_VERSION:
                raise ValueError(f"version {raw.get('v')!r}, expected {HANDOFF_VERSION}")
            return cls(
                first_gen_tokens=[int(t) for t in raw["first_gen_tokens"]],
                ctx_request_id=int(raw["ctx_request_id"]),
                opaque_state=base64.b64decode(raw["opaque_state"]),
                draft_tokens=raw.get("draft_tokens"),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"malformed TensorRT-LLM handoff from the prefill worker: {e}") from None

    @classmethod
    def from_params(cls, params: Any) -> Handoff:
        if params is None or not params.first_gen_tokens or params.ctx_request_id is None:
            raise ValueError("the context-only request returned no disaggregated params")
        return cls(
            first_gen_tokens=list(params.first_gen_tokens),
            ctx_request_id=int(params.ctx_request_id),
            opaque_state=bytes(params.opaque_state or b""),
            draft_tokens=list(params.draft_tokens) if params.draft_tokens else None,
        )

    def to_params(self, api: TrtllmApi):
        return api.DisaggregatedParams(
            request_type="generation_only",
            first_gen_tokens=self.first_gen_tokens,
            ctx_request_id=self.ctx_request_id,
            opaque_state=self.opaque_state,
            draft_tokens=self.draft_tokens,
        )
