"""OpenAI request bodies -> the GenerateRequests the gRPC API takes; pipeline Pieces -> OpenAI JSON.

A request becomes one `tandem.v1.GenerateRequest` per choice (each prompt times `n`), the
very message a gRPC client would send, so that everything after this point (validation,
admission, routing, tracing, metrics) is the gRPC path itself. Choice k of a seeded request
uses seed + k, so that n choices differ and each is reproducible.

Errors are `InvalidArgument`s named by the OpenAI field (`openai_field` renames the fields of
the gRPC checks: `text`/`token_ids` -> `prompt` or `messages`, ...).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import InvalidArgument
from shared.guidance import choice_grammar, hoisted, lark_grammar
from shared.pb.tandem.v1 import common_pb2, generate_pb2
from shared.text import Tokenizer

from ..relay import Piece
from .chat import ChatTemplate, TemplateError
from .reasoning import END, START, Reasoning
from .schemas import ChatCompletionRequest, ChatMessage, CompletionRequest
from .tool_parsers import ToolParser

MAX_N = 64  # choices per prompt
_U64 = 1 << 64
FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CANCELLED: "cancelled",
    common_pb2.FINISH_REASON_ERROR: "error",
}


@dataclass
class ToolCalls:
    """How a chat choice's text becomes a message with tool calls.

    - tool_choice {"type": "function", "function": {"name"}}: the output was constrained to that
      function's arguments (`name`);
    - "required": to a JSON list of {"name", "parameters"}, one or more calls;
    - "auto": free text in which `parser` finds the calls the model wrote in its own format."""

    name: str | None = None
    parser: ToolParser | None = None

    def streamable(self, text: str) -> int:
        """How many leading characters of a choice's text so far can go out as content."""
        return self.parser.streamable(text) if self.parser is not None else 0

    def split(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """(content, tool_calls in OpenAI's shape) of a finished choice; no calls when the text
        holds none (auto) or does not parse (a constrained choice that max_tokens cut)."""
        if self.parser is not None:
            content, pairs = self.parser.parse(text)
        else:
            try:
                value = json.loads(text)
            except (ValueError, RecursionError):
                return text, []
            if self.name is not None:
                pairs = [(self.name, value)]
            elif isinstance(value, list) and all(isinstance(v, dict) and "name" in v for v in value):
                pairs = [(v["name"], v.get("parameters", {})) for v in value]
            else:
                return text, []
            content = ""
        calls = [
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
            }
            for name, args in pairs
        ]
        return (content if calls else text), calls


@dataclass
class Plan:
    """What one HTTP request becomes."""

    requests: list[generate_pb2.GenerateRequest]  # one per choice; the choice index is the position
    prompt_of: list[int]  # the prompt each choice answers (usage counts each prompt once)
    logprobs: int | None  # None: none asked; 0: the sampled token's only; k: and the k most likely
    fields: dict[str, str] = field(default_factory=dict)  # gRPC field -> OpenAI field, for errors
    echo: bool = False  # completions: each choice's text (and logprobs) starts with its prompt
    prompt_only: bool = False  # echo with max_tokens 0: one token is generated, and not returned
    tool_calls: ToolCalls | None = None  # chat: the output is a tool call (tool_choice required or named)
    reasoning: Reasoning | None = None  # chat: a <think> block goes apart from the answer
    show_reasoning: bool = True  # the block goes out as reasoning_content (include_reasoning)

    def openai_field(self, name: str) -> str:
        return openai_field(name, self.fields)


def openai_field(name: str, fields: dict[str, str]) -> str:
    base, sep, rest = name.partition("[")
    return fields.get(base, base) + sep + rest


def renamed(error: InvalidArgument, fields: dict[str, str]) -> InvalidArgument:
    """The same error, named by the OpenAI field."""
    message = str(error).split(": ", 1)[-1]
    return InvalidArgument(openai_field(error.field, fields), message)


def _check_neutral(req: CompletionRequest | ChatCompletionRequest) -> None:
    """OpenAI fields without an implementation must keep their neutral values."""
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise InvalidArgument("suffix", "not supported")
        if req.best_of is not None and req.best_of != req.n:
            raise InvalidArgument("best_of", "not supported (only equal to n)")
    else:
        if req.modalities is not None and set(req.modalities) - {"text"}:
            raise InvalidArgument("modalities", "only text output is supported")
        if req.audio is not None:
            raise InvalidArgument("audio", "not supported (text output only)")


def _parameters(
    req: CompletionRequest | ChatCompletionRequest, max_tokens: int | None, logprobs: int | None
) -> tuple[common_pb2.SamplingParameters, common_pb2.StoppingCriteria]:
    if not 1 <= req.n <= MAX_N:
        raise InvalidArgument("n", f"must be in [1, {MAX_N}], got {req.n}")
    if req.stream_options is not None and not req.stream:
        raise InvalidArgument("stream_options", "only allowed when stream is true")
    sampling = common_pb2.SamplingParameters()
    if req.temperature is not None:
        sampling.temperature = req.temperature
    if req.top_p is not None:
        sampling.top_p = req.top_p
    if req.top_k is not None:
        if req.top_k < -1:
            raise InvalidArgument("top_k", f"must be >= 0, or -1 for off, got {req.top_k}")
        sampling.top_k = max(req.top_k, 0)
    if req.min_p is not None:
        sampling.min_p = req.min_p
    if req.repetition_penalty is not None:
        sampling.repetition_penalty = req.repetition_penalty
    if req.presence_penalty is not None:
        sampling.presence_penalty = req.presence_penalty
    if req.frequency_penalty is not None:
        sampling.frequency_penalty = req.frequency_penalty
    for key, bias in (req.logit_bias or {}).items():
        # OpenAI's keys are token ids as strings; the engine checks them against the vocabulary
        if not (key.isascii() and key.strip().isdigit()) or int(key) >= 1 << 32:
            raise InvalidArgument("logit_bias", f"key {key!r} is not a token id")
        sampling.logit_bias[int(key)] = bias
    if req.seed is not None:
        if not -(1 << 63) <= req.seed < _U64:
            raise InvalidArgument("seed", f"must fit in 64 bits, got {req.seed}")
        sampling.seed = req.seed % _U64
    if logprobs is not None:
        if logprobs < 0:
            raise InvalidArgument("logprobs", f"must be >= 0, got {logprobs}")
        sampling.logprobs = max(logprobs, 1)  # 0: the worker returns the sampled token's with one alternative
    stopping = common_pb2.StoppingCriteria(ignore_eos=req.ignore_eos)
    if max_tokens is not None:
        if not -(1 << 31) <= max_tokens < (1 << 31):
            raise InvalidArgument("max_tokens", f"{max_tokens} is out of range")
        stopping.max_tokens = max_tokens
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    stopping.stop.extend(stops)
    for token_id in req.stop_token_ids or []:
        if not 0 <= token_id < (1 << 32):
            raise InvalidArgument("stop_token_ids", f"token id {token_id} outside the vocabulary")
        stopping.stop_token_ids.append(token_id)
    return sampling, stopping


def _structured_output(
    req: CompletionRequest | ChatCompletionRequest, sampling: common_pb2.SamplingParameters, fields: dict[str, str]
) -> None:
    """Sets sampling.guidance from the one structured-output field the request sets (OpenAI's
    response_format, or vLLM's guided_* / structured_outputs); errors in it name that field."""
    asked = {
        name: value
        for name in ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                     "structured_outputs")
        if (value := getattr(req, name)) is not None
    }
    if isinstance(asked.get("response_format"), dict) and asked["response_format"].get("type", "text") == "text":
        del asked["response_format"]  # plain text: no constraint
    if not asked:
        return
    if len(asked) > 1:
        raise InvalidArgument(sorted(asked)[1], f"set one structured-output field, not {' and '.join(sorted(asked))}")
    (name, value), = asked.items()
    fields["guidance"] = name
    g = sampling.guidance
    if name == "response_format":
        kind = value.get("type")
        if kind == "json_object":
            g.json_object = True
        elif kind == "json_schema":
            spec = value.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise InvalidArgument(name, "json_schema.schema must be a JSON Schema object")
            g.json_schema = json.dumps(schema)
        else:
            raise InvalidArgument(name, f"type must be text, json_object or json_schema, got {kind!r}")
        return
    if name == "structured_outputs":
        kinds = ("json", "regex", "choice", "grammar", "json_object")
        known = {k: v for k, v in value.items() if k in kinds and v not in (None, False)}
        if len(known) != 1:
            raise InvalidArgument(name, f"set exactly one of {', '.join(kinds)}")
        (key, value), = known.items()
        if key == "json_object":
            g.json_object = True
            return
        name = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice", "grammar": "guided_grammar"}[key]
    if name == "guided_json":
        g.json_schema = value if isinstance(value, str) else json.dumps(value)
    elif name == "guided_regex" and isinstance(value, str):
        g.regex = value
    elif name == "guided_grammar" and isinstance(value, str):
        g.lark = lark_grammar(value)
    elif name == "guided_choice" and isinstance(value, list) and value and all(isinstance(c, str) for c in value):
        g.lark = choice_grammar(value)
    else:
        raise InvalidArgument(fields["guidance"], f"{name.removeprefix('guided_')} has the wrong type")


def _fan_out(
    request_id: str,
    prompts: list[str | list[int]],
    n: int,
    sampling: common_pb2.SamplingParameters,
    stopping: common_pb2.StoppingCriteria,
    priority: int,
) -> tuple[list[generate_pb2.GenerateRequest], list[int]]:
    requests, prompt_of = [], []
    several = len(prompts) * n > 1
    for p, prompt in enumerate(prompts):
        for k in range(n):
            req = generate_pb2.GenerateRequest(
                request_id=f"{request_id}-{len(requests)}" if several else request_id,
                sampling=sampling,
                stopping=stopping,
                priority=priority,
            )
            if k and sampling.HasField("seed"):
                req.sampling.seed = (sampling.seed + k) % _U64
            if isinstance(prompt, str):
                req.text = prompt
            else:
                req.token_ids.ids.extend(prompt)
            requests.append(req)
            prompt_of.append(p)
    return requests, prompt_of


def _token_ids(ids: list[int], name: str) -> list[int]:
    for i, token_id in enumerate(ids):
        if not 0 <= token_id < (1 << 32):
            raise InvalidArgument(name, f"{token_id} (at {i}) is not a token id")
    return ids


def completion_plan(req: CompletionRequest, request_id: str) -> Plan:
    fields = {"text": "prompt", "token_ids": "prompt"}
    try:
        return _completion_plan(req, request_id, fields)
    except InvalidArgument as e:
        raise renamed(e, fields) from None


def _completion_plan(req: CompletionRequest, request_id: str, fields: dict[str, str]) -> Plan:
    _check_neutral(req)
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif not prompt:
        raise InvalidArgument("prompt", "must not be empty")
    elif isinstance(prompt[0], int):
        prompts = [_token_ids(prompt, "prompt")]
    else:
        prompts = [p if isinstance(p, str) else _token_ids(p, "prompt") for p in prompt]
    max_tokens, prompt_only = req.max_tokens, False
    if req.echo and max_tokens == 0:  # OpenAI's way to score a prompt alone
        max_tokens, prompt_only = 1, True
    sampling, stopping = _parameters(req, max_tokens, req.logprobs)
    _structured_output(req, sampling, fields)
    if req.echo and req.logprobs is not None:  # the prompt's tokens get theirs too
        sampling.prompt_logprobs = sampling.logprobs
    requests, prompt_of = _fan_out(request_id, prompts, req.n, sampling, stopping, req.priority)
    return Plan(requests, prompt_of, req.logprobs, fields, echo=req.echo, prompt_only=prompt_only)


async def chat_plan(
    req: ChatCompletionRequest,
    request_id: str,
    template: ChatTemplate | None,
    encode: Callable[[str], Awaitable[list[int]]],
    max_model_len: int | None,
    tool_parser: ToolParser | None = None,
    reasoning: bool = False,
) -> Plan:
    """`encode`: the rendered template's token ids, without BOS (Frontend.encode, off the event loop);
    `tool_parser`: finds tool calls in free text (tool_choice "auto"; None: auto is refused);
    `reasoning`: the model thinks between <think> and </think>, returned apart. Structured
    output and a forced tool call constrain what follows the reasoning, which the model may
    write first (Guidance.reasoning_start / _end), unless the prompt closed the block."""
    fields = {"text": "messages", "token_ids": "messages", "prompt": "messages", "logprobs": "top_logprobs"}
    if req.max_completion_tokens is not None:
        fields["max_tokens"] = "max_completion_tokens"
    try:
        return await _chat_plan(req, request_id, template, encode, max_model_len, fields, tool_parser, reasoning)
    except InvalidArgument as e:
        raise renamed(e, fields) from None


async def _chat_plan(
    req: ChatCompletionRequest,
    request_id: str,
    template: ChatTemplate | None,
    encode: Callable[[str], Awaitable[list[int]]],
    max_model_len: int | None,
    fields: dict[str, str],
    tool_parser: ToolParser | None,
    reasoning: bool,
) -> Plan:
    _check_neutral(req)
    tool_calls, guidance = _tool_choice(req, tool_parser)
    template_kwargs = req.chat_template_kwargs
    if req.tools:  # as transformers' apply_chat_template(tools=...) gives them to the template
        template_kwargs = {"tools": req.tools, **(template_kwargs or {})}
    text = render_messages(template, req.messages, req.add_generation_prompt, template_kwargs)
    prompt = await encode(text)
    if not prompt:
        raise InvalidArgument("messages", "the chat template rendered them as an empty prompt")
    if req.max_completion_tokens is not None and req.max_tokens is not None:
        raise InvalidArgument("max_completion_tokens", "set max_completion_tokens or max_tokens, not both")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None and max_model_len:  # OpenAI's default: as many as fit
        if len(prompt) >= max_model_len:
            raise InvalidArgument(
                "messages", f"the prompt ({len(prompt)} tokens) fills the model length {max_model_len}"
            )
        max_tokens = max_model_len - len(prompt)
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidArgument("top_logprobs", "requires logprobs: true")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    sampling, stopping = _parameters(req, max_tokens, logprobs)
    _structured_output(req, sampling, fields)
    if guidance is not None:
        if sampling.HasField("guidance"):
            raise InvalidArgument("tool_choice", f"a tool call cannot also follow {fields['guidance']}")
        sampling.guidance.json_schema = json.dumps(guidance)
        fields["guidance"] = "tools"
    split = None
    if reasoning:
        split = Reasoning.for_prompt(text)
        if sampling.HasField("guidance") and not split.closed_in_prompt:
            # as vLLM applies structured output: after the reasoning, which the model may write
            # first (opening the block itself unless the prompt opened it)
            sampling.guidance.reasoning_end = END
            sampling.guidance.reasoning_start = "" if split.open_in_prompt else START
    requests, prompt_of = _fan_out(request_id, [prompt], req.n, sampling, stopping, req.priority)
    return Plan(
        requests, prompt_of, logprobs, fields, tool_calls=tool_calls, reasoning=split,
        show_reasoning=req.include_reasoning,
    )


def _tool_choice(
    req: ChatCompletionRequest, parser: ToolParser | None
) -> tuple[ToolCalls | None, dict[str, Any] | None]:
    """How the choices' text becomes tool calls, and the JSON schema that constrains the output
    (tool_choice "required" or a named function; None for "auto"); (None, None) for no tools or
    tool_choice "none". "auto" without a parser for the model's own call format is refused."""
    tools, choice = req.tools or [], req.tool_choice
    schemas: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise InvalidArgument(f"tools[{i}]", 'must be {"type": "function", "function": {"name", "parameters"}}')
        name, parameters = function.get("name"), function.get("parameters", {"type": "object"})
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"tools[{i}].function.name", "must be a non-empty string")
        if not isinstance(parameters, dict):
            raise InvalidArgument(f"tools[{i}].function.parameters", "must be a JSON Schema object")
        schemas[name] = parameters
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return None, None
    if not tools:
        raise InvalidArgument("tool_choice", "needs tools")
    if choice == "auto":
        if parser is None:
            raise InvalidArgument(
                "tool_choice",
                "auto needs a parser for this model's tool-call format, and its chat template writes none "
                "Tandem knows (TANDEM_TOOL_CALL_PARSER: hermes, llama3_json); set tool_choice to \"required\" "
                'or {"type": "function", "function": {"name": ...}}, which make the output a call, or "none"',
            )
        return ToolCalls(parser=parser), None
    if choice == "required":
        # each tool's parameters nest under the list's items, so their definitions move to its root
        calls, defs = [], {}
        for i, (name, schema) in enumerate(schemas.items()):
            parameters, own = hoisted(schema, f"tool{i}.")
            defs.update(own)
            calls.append({"type": "object", "properties": {"name": {"const": name}, "parameters": parameters},
                          "required": ["name", "parameters"], "additionalProperties": False})
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        return ToolCalls(None), ({**schema, "$defs": defs} if defs else schema)
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise InvalidArgument(
            "tool_choice", 'must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
        )
    if name not in schemas:
        raise InvalidArgument("tool_choice", f"names {name!r}, which is not one of the tools")
    return ToolCalls(name), schemas[name]


def render_messages(
    template: ChatTemplate | None,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    chat_template_kwargs: dict[str, Any] | None,
) -> str:
    """The conversation as the model's chat template writes it (InvalidArgument "messages[...]")."""
    if template is None:
        raise InvalidArgument(
            "messages",
            "this model has no chat template (chat_template.jinja, or chat_template in "
            "tokenizer_config.json); use /v1/completions with a prompt",
        )
    if not messages:
        raise InvalidArgument("messages", "must not be empty")
    rendered = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidArgument(
                        f"messages[{i}].content[{j}]", "only text parts are supported ({type: text, text})"
                    )
                texts.append(part["text"])
            content = "".join(texts)
        entry = {**message.model_dump(exclude_none=True), "content": content or ""}
        if isinstance(entry.get("tool_calls"), list):  # templates read a call's arguments as a dict
            entry["tool_calls"] = [_arguments_as_dict(call) for call in entry["tool_calls"]]
        rendered.append(entry)
    try:
        return template.render(rendered, add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {}))
    except TemplateError as e:
        raise InvalidArgument("messages", f"the chat template refused them: {e}") from None


def _arguments_as_dict(call: Any) -> Any:
    """An assistant message's tool call with its JSON-text arguments parsed, as vLLM passes them."""
    function = call.get("function") if isinstance(call, dict) else None
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        try:
            return {**call, "function": {**function, "arguments": json.loads(function["arguments"])}}
        except ValueError:
            pass
    return call


# -- responses --------------------------------------------------------------------------------


class Tokens:
    """Token ids -> their text, for logprobs (cached: the same ids come back often)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def bytes(self, token_id: int) -> list[int]:
        """The token's own bytes (a piece of a UTF-8 character included, whose text is U+FFFD),
        so that a choice's tokens' bytes join into its text, as OpenAI's `bytes` field promises."""
        text = self.text(token_id)
        if "\ufffd" not in text:
            return list(text.encode("utf-8"))
        return list(self._tokenizer.token_bytes(token_id))


def prompt_logprobs(tokens: Tokens, first_token_id: int, piece: Piece, top_n: int) -> dict[str, Any]:
    """The prompt's part of an echoed completion's `logprobs` (the prompt's first token has none,
    null as in OpenAI's answers); add the completion's with completion_logprobs(..., offset=its end)."""
    first = tokens.text(first_token_id)
    out: dict[str, Any] = {"tokens": [first], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [0]}
    return completion_logprobs(tokens, Piece("", "", [], piece.prompt_logprobs), top_n, len(first), out)


def completion_logprobs(
    tokens: Tokens, piece: Piece, top_n: int, offset: int, out: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The `logprobs` of a completion choice for this piece's tokens (appended to `out`, if given);
    offset: text length before them."""
    if out is None:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in piece.logprobs:
        token = tokens.text(lp.token_id)
        out["tokens"].append(token)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append(
            {tokens.text(t.token_id): t.logprob for t in lp.top[:top_n]} if top_n else None
        )
        out["text_offset"].append(offset)
        offset += len(token)
    return out


def chat_logprobs(tokens: Tokens, piece: Piece, top_n: int) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        token = tokens.text(token_id)
        return {"token": token, "logprob": logprob, "bytes": tokens.bytes(token_id)}

    return {
        "content": [
            {
                **entry(lp.token_id, lp.logprob),
                "top_logprobs": [entry(t.token_id, t.logprob) for t in lp.top[:top_n]],
            }
            for lp in piece.logprobs
        ]
    }


def usage_json(
    usages: list[common_pb2.Usage | None], prompt_of: list[int], reasoning_tokens: int | None = None
) -> dict[str, Any]:
    """Summed over choices; each prompt's tokens (and cached tokens) counted once, as OpenAI does for n.
    `reasoning_tokens`: of the completion tokens, those of the choices' reasoning (None: the
    model does not think, and the usage does not say)."""
    prompt = cached = completion = 0
    seen: set[int] = set()
    for usage, p in zip(usages, prompt_of, strict=True):
        if usage is None:
            continue
        completion += usage.completion_tokens
        if p not in seen:
            seen.add(p)
            prompt += usage.prompt_tokens
            cached += usage.cached_tokens
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    if reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


def finish_reason(piece: Piece) -> str | None:
    return FINISH_REASONS.get(piece.finish_reason)


def now() -> int:
    return int(time.time())
