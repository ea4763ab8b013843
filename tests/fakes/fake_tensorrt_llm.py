"""A FAKE of TensorRT-LLM's LLM API, for testing Tandem's trtllm adapter on CPU.

It runs no model and imports nothing of tensorrt_llm: a deterministic toy next-token rule
stands in for the network, an in-process registry for the cache transceiver. What it does
reproduce is the contract of the real API (tensorrt_llm 1.2, PyTorch backend), as read from
its sources; each rule below names, beside its code, the real file and function it models
(tensorrt_llm/llmapi/llm.py, llmapi/llm_args.py, executor/result.py, sampling_params.py,
disaggregated_params.py, _torch/pyexecutor/py_executor.py, _torch/speculative/drafter.py,
serve/openai_disagg_service.py). Summary:

- `LLM(model, **kwargs)`: unknown keyword arguments are rejected (LlmArgs forbids extras);
  `generate_async(inputs, sampling_params, streaming=..., disaggregated_params=...)` is a plain
  method returning a `RequestOutput` at once; the `RequestOutput` is an async iterator that
  yields *itself* after each update, with cumulative `outputs[0].token_ids` /
  `logprobs` (one `{token_id: Logprob}` dict per token) and `token_ids_diff`; `abort()` ends
  the request with `finish_reason == "cancelled"`; errors surface as `RequestError`.
- `skip_tokenizer_init=True` requires `SamplingParams.end_id` (there is no tokenizer to ask).
- A prompt longer than `max_num_tokens` is refused with `RequestError` at submission unless
  `enable_chunked_prefill` (generation-only requests are not checked).
- A stop token matched from `stop_token_ids` is stripped from `token_ids` unless
  `include_stop_str_in_output`; an EOS (`end_id`) stays.
- A streaming request's first update carries its first generated token.
- Disaggregation: a `context_only` request answers once, with `finished`, finish reason
  `not_finished` (or `length` in older releases: the real orchestrator goes on to generation on
  either) and `outputs[0].disaggregated_params` (`first_gen_tokens`, `ctx_request_id`, `opaque_state`,
  `draft_tokens`); its KV blocks stay held until a `generation_only` request on a peer pulls
  them through the cache transceiver, or `kv_transfer_timeout_ms` passes (then they are freed
  and the peer's request fails). A `generation_only` request's `token_ids` start with
  `first_gen_tokens`, which arrives with the first streamed update (its diff skips it, as the
  real result does in streaming mode).
- Traps of the real one, which the adapter must avoid: `max_tokens_in_buffer` that is not a
  multiple of `tokens_per_block` fails start-up with the C++ assertion of cacheTransBuffer;
  a `context_only` request needs `disable_overlap_scheduler=True` on its LLM; a context or
  generation request needs a `cache_transceiver_config`.
- `UserProvidedDecodingConfig(max_draft_len, drafter)`: the executor loop runs one step for
  all generation requests; per step it calls `drafter.prepare_draft_tokens(scheduled_requests,
  resource_manager)` once, synchronously, off the event loop, with every generation request
  (`LlmRequest`-like: `request_id`, `get_tokens(0)`, `py_orig_prompt_len`,
  `py_max_new_tokens`, `py_draft_tokens`), then `pad_draft_tokens_for_cuda_graph` pads the
  drafts with zeros to the static maximum, then verifies them. A drafter must call
  `Drafter.__init__(max_draft_len, max_total_draft_tokens, ...)`, and padded drafts need
  `_needs_padding_kv_extension` (the verifying TorchSampler rewinds by the padded length).
- `get_stats(timeout)` returns iteration-stats dicts with `kvCacheStats`.
"""


from .fake_tensorrt_llm_executor import LLM, RequestOutput, shutdown_all, transfer_pending
from .fake_tensorrt_llm_types import (
    CacheTransceiverConfig,
    CompletionOutput,
    DisaggregatedParams,
    Drafter,
    KvCacheConfig,
    LlmRequest,
    Logprob,
    RequestError,
    ResourceManager,
    SamplingParams,
    ScheduledRequests,
    UserProvidedDecodingConfig,
    next_token,
)

__all__ = [
    "LLM", "CacheTransceiverConfig", "CompletionOutput", "DisaggregatedParams", "Drafter", "KvCacheConfig",
    "LlmRequest", "Logprob", "RequestError", "RequestOutput", "ResourceManager", "SamplingParams",
    "ScheduledRequests", "UserProvidedDecodingConfig", "next_token", "shutdown_all", "transfer_pending",
]
