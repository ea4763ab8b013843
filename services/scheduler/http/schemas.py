"""Request bodies of the OpenAI-compatible API, as pydantic models.

Only the shapes are checked here (types, which fields exist); the values go through the same
checks as a gRPC request (services/scheduler/frontend.py, validation.py) once mapped
(convert.py). Fields of OpenAI's API that Tandem does not implement are declared too, so that
setting one to anything but its neutral value is refused (400 naming it), never silently
ignored. Unknown fields are ignored, as OpenAI's own server does.

Extensions beyond OpenAI's fields, as vLLM names them: top_k (-1 or 0: off), min_p,
repetition_penalty, ignore_eos, stop_token_ids, priority, and structured output's
guided_json, guided_regex, guided_choice, guided_grammar and structured_outputs.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class _Common(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: StrictInt | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    priority: StrictInt = 0
    user: StrictStr | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[StrictStr, float] | None = None  # token id (as a string) -> bias
    # structured output: OpenAI's response_format, or vLLM's fields (at most one of them)
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None  # a Lark grammar (llguidance's dialect)
    structured_outputs: dict[str, Any] | None = None  # vLLM's newer form: {json | regex | choice | grammar}


PromptType = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(_Common):
    """POST /v1/completions"""

    prompt: PromptType
    logprobs: StrictInt | None = None  # top-n alternatives per token; 0: the sampled token's only
    echo: StrictBool = False
    # OpenAI fields without an implementation: only their neutral values are accepted.
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None


class ChatMessage(BaseModel):
    """One message; fields beyond role and content (name, tool_calls, ...) reach the template as they are."""

    model_config = ConfigDict(extra="allow")

    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Common):
    """POST /v1/chat/completions"""

    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None  # with tool_choice "required" or a named function (convert._tool_choice)
    tool_choice: Any = None
    include_reasoning: StrictBool = True  # vLLM's: false leaves a thinking model's reasoning_content out
    # OpenAI fields without an implementation: only their neutral values are accepted.
    modalities: list[StrictStr] | None = None
    audio: dict[str, Any] | None = None


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's): a prompt, or messages rendered by the chat template."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    # default: True for a prompt (BOS as a completion gets it), False for messages (the template writes them)
    add_special_tokens: StrictBool | None = None
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: StrictBool = False


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's)."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    tokens: list[StrictInt]
