"""Protobuf <-> engine request types (shared/params.py: no torch, so the scheduler uses it too)."""

from __future__ import annotations

from shared.params import FinishReason, Guidance, RequestOutput, SamplingParams, TokenLogprobs
from shared.pb.tandem.v1 import common_pb2, worker_pb2

DEFAULT_MAX_TOKENS = 16

FINISH_TO_PB = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}


def sampling_from_pb(
    sampling: common_pb2.SamplingParameters, stopping: common_pb2.StoppingCriteria | None = None
) -> SamplingParams:
    """Engine SamplingParams from the wire; unset optional fields take the engine's defaults."""
    stopping = stopping if stopping is not None else common_pb2.StoppingCriteria()
    return SamplingParams(
        max_tokens=stopping.max_tokens if stopping.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
        temperature=sampling.temperature if sampling.HasField("temperature") else 1.0,
        top_k=sampling.top_k,
        top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
        min_p=sampling.min_p,
        repetition_penalty=sampling.repetition_penalty if sampling.HasField("repetition_penalty") else 1.0,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        logit_bias=dict(sampling.logit_bias),
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop_token_ids=list(stopping.stop_token_ids),
        ignore_eos=stopping.ignore_eos,
        logprobs=sampling.logprobs,
        num_speculative_tokens=(
            sampling.num_speculative_tokens if sampling.HasField("num_speculative_tokens") else None
        ),
        seed_offset=sampling.seed_offset,
        prompt_logprobs=sampling.prompt_logprobs if sampling.HasField("prompt_logprobs") else None,
        guidance=guidance_from_pb(sampling.guidance) if sampling.HasField("guidance") else None,
    )


def guidance_from_pb(g: common_pb2.Guidance) -> Guidance:
    """The set kind of a Guidance message (none set: kind "", which validate refuses)."""
    kind = g.WhichOneof("kind")
    value = getattr(g, kind) if kind not in (None, "json_object") else ""
    return Guidance(kind or "", value, reasoning_start=g.reasoning_start, reasoning_end=g.reasoning_end)


def sampling_to_pb(p: SamplingParams) -> common_pb2.SamplingParameters:
    """The sampling fields a draft needs to draw as the target would (inverse of sampling_from_pb).
    Not the frequency and presence penalties: the draft does not know which of a sequence's tokens
    were generated. Its proposals are then drawn from a distribution further from the target's,
    which lowers acceptance but not exactness (verification compares against the target's own)."""
    pb = common_pb2.SamplingParameters(
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        min_p=p.min_p,
        repetition_penalty=p.repetition_penalty,
        logit_bias=p.logit_bias,
    )
    if p.seed is not None:
        pb.seed = p.seed
    return pb


def logprob_to_pb(lp: TokenLogprobs) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top=[common_pb2.TopLogprob(token_id=t, logprob=p) for t, p in lp.top],
    )


def logprob_from_pb(lp: common_pb2.TokenLogprob) -> TokenLogprobs:
    return TokenLogprobs(lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top])


def output_to_pb(out: RequestOutput, *, prefilled_by: str = "") -> worker_pb2.DecodeResponse:
    return worker_pb2.DecodeResponse(
        token_ids=out.new_token_ids,
        logprobs=[logprob_to_pb(lp) for lp in out.logprobs or []],
        finish_reason=FINISH_TO_PB[out.finish_reason],
        num_prompt_tokens=out.num_prompt_tokens,
        num_cached_tokens=out.num_cached_tokens,
        num_output_tokens=out.num_output_tokens,
        prefilled_by=prefilled_by,
        num_spec_proposed=out.num_spec_proposed,
        num_spec_accepted=out.num_spec_accepted,
        num_spec_steps=out.num_spec_steps,
        prompt_logprobs=[logprob_to_pb(lp) for lp in out.prompt_logprobs or []],
    )
