"""OpenAI's Responses API (POST /v1/responses) as a translation of chat completions.

A Responses request becomes the chat request it means (`to_chat`: instructions and input items
as messages, function_call / function_call_output items as an assistant's tool calls and tool
messages, flat function tools as chat tools, text.format as response_format), and runs through
the chat route's pipeline. Its answer is translated back: a whole chat completion into a
Response object (`response_object`), a chat stream's chunks into the Responses stream's typed
events (`StreamTranslator`). Stateless: no stored responses, so `previous_response_id` is
refused. Knows nothing of the engine.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, ValidationError

from services.common.errors import InvalidArgument

from .schemas import ChatCompletionRequest

# chat field -> the Responses field a client set (for the `param` of a 400)
FIELDS = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "top_logprobs": "top_logprobs",
}


# the chat route's sampling and vLLM fields that a Responses request may carry too (as vLLM's
# Responses route takes them, with the openai SDK's extra_body), passed on as they are
PASSED_ON = (
    "top_k", "min_p", "repetition_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "priority",
    "presence_penalty", "frequency_penalty", "logit_bias", "chat_template_kwargs",
    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
)  # fmt: skip


class ResponsesRequest(BaseModel):
    """POST /v1/responses (other fields are ignored, except those PASSED_ON to the chat request)"""

    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    input: StrictStr | list[dict[str, Any]]
    instructions: StrictStr | None = None
    max_output_tokens: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: StrictBool = False
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    previous_response_id: StrictStr | None = None
    user: StrictStr | None = None
    metadata: dict[str, Any] | None = None


def field_namer(req: ResponsesRequest):
    """chat field -> the Responses field a client set, for this request."""
    offset = 1 if req.instructions else 0  # instructions are the chat request's first message

    def field(name: str) -> str:
        base, sep, rest = name.partition("[")
        if base == "messages" and sep:  # messages[i]...: input item i - offset
            index, close, tail = rest.partition("]")
            if index.isdigit() and int(index) >= offset:
                return f"input[{int(index) - offset}{close}{tail}"
            return "instructions" if index.isdigit() else "input"
        return FIELDS.get(base, base) + sep + rest

    return field


def to_chat(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion request a Responses request means (InvalidArgument names its field)."""
    if req.previous_response_id is not None:
        raise InvalidArgument(
            "previous_response_id", "responses are not stored here: send the whole conversation as input"
        )
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    if not items:
        raise InvalidArgument("input", "must not be empty")
    thought: str | None = None  # a reasoning item's text, for the assistant turn that follows it
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            if not isinstance(parts, list) or not all(
                isinstance(p, dict) and isinstance(p.get("text"), str) for p in parts
            ):
                raise InvalidArgument(f"input[{i}].content", "a reasoning item's content must be a list of {type, text}")
            thought = "".join(p["text"] for p in parts) or None
            continue
        if kind == "message":
            messages.append({"role": item.get("role"), "content": _content(item.get("content"), f"input[{i}].content")})
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)  # calls made together are one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": _content(output, f"input[{i}].output")})
        else:
            raise InvalidArgument(
                f"input[{i}]",
                f"items of type {kind!r} are not supported (message, function_call, function_call_output, reasoning)",
            )
        if thought is not None and messages[-1]["role"] == "assistant":  # templates that replay thinking read it
            messages[-1]["reasoning_content"] = thought
        thought = None
    if not messages:
        raise InvalidArgument("input", "holds no message to answer")
    body: dict[str, Any] = {
        "model": req.model,
        "messages": messages,
        "max_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stream": req.stream,
        "user": req.user,
        "tool_choice": _tool_choice(req.tool_choice),
    }
    body.update({k: v for k, v in (req.model_extra or {}).items() if k in PASSED_ON})
    if req.stream:
        body["stream_options"] = {"include_usage": True}  # the completed event carries the usage
    if req.tools:
        body["tools"] = [_tool(t, i) for i, t in enumerate(req.tools)]
    fmt = (req.text or {}).get("format")
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise InvalidArgument("text.format", "must be an object with a type")
        if fmt.get("type") == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt},
            }
        else:
            body["response_format"] = {"type": fmt.get("type")}
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as e:
        error = e.errors()[0]
        where = error["loc"][0] if error["loc"] else None
        if where in PASSED_ON:  # the client's own field, named as it sent it
            name = ".".join(str(part) for part in error["loc"])
            raise InvalidArgument(name, error["msg"]) from None
        raise InvalidArgument("input", f"not a conversation: {error['msg']} at {where}") from None


def _content(content: Any, name: str) -> Any:
    """A message's content: a string, or input_text / output_text parts as chat's text parts."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidArgument(name, "must be a string or a list of text parts")
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise InvalidArgument(f"{name}[{j}]", f"only text parts are supported, got {kind!r}")
        parts.append({"type": "text", "text": part.get("text")})
    return parts


def _tool(tool: dict[str, Any], i: int) -> dict[str, Any]:
    """A Responses function tool (flat) as a chat tool (nested under "function")."""
    if tool.get("type") != "function":
        raise InvalidArgument(f"tools[{i}]", f"only function tools are supported, got {tool.get('type')!r}")
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {
            "reasoning_tokens": (usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
        },
        "total_tokens": usage["total_tokens"],
    }


def _envelope(response_id: str, req: ResponsesRequest, model: str, created: int) -> dict[str, Any]:
    """The fields of a Response that restate the request."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "model": model,
        "status": "in_progress",
        "output": [],
        "error": None,
        "incomplete_details": None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "tools": req.tools or [],
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
        "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        "text": req.text or {"format": {"type": "text"}},
        "previous_response_id": None,
        "store": False,
        "metadata": req.metadata or {},
        "usage": None,
    }


def _message_item(text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"msg_{uuid.uuid4().hex}",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def _reasoning_item(text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": f"rs_{uuid.uuid4().hex}",
        "status": status,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    }


def _call_item(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": f"fc_{uuid.uuid4().hex}",
        "call_id": call["id"],
        "name": call["function"]["name"],
        "arguments": call["function"]["arguments"],
        "status": status,
    }


def _finish(response: dict[str, Any], finish_reason: str | None) -> None:
    if finish_reason == "length":
        response["status"] = "incomplete"
        response["incomplete_details"] = {"reason": "max_output_tokens"}
    else:
        response["status"] = "completed"


def response_object(chat: dict[str, Any], req: ResponsesRequest) -> dict[str, Any]:
    """A whole chat completion as a Response."""
    response = _envelope(f"resp_{chat['id'].removeprefix('chatcmpl-')}", req, chat["model"], chat["created"])
    choice = chat["choices"][0]
    message = choice["message"]
    if message.get("reasoning_content"):
        response["output"].append(_reasoning_item(message["reasoning_content"]))
    if message.get("content"):
        response["output"].append(_message_item(message["content"]))
    response["output"] += [_call_item(call) for call in message.get("tool_calls") or []]
    _finish(response, choice["finish_reason"])
    response["usage"] = _usage(chat.get("usage"))
    return response


class StreamTranslator:
    """A chat stream's chunks -> the Responses stream's events, each with its sequence_number."""

    def __init__(self, req: ResponsesRequest, model: str):
        self._response = _envelope(f"resp_{uuid.uuid4().hex}", req, model, int(time.time()))
        self._seq = 0
        self._message: dict[str, Any] | None = None  # the output item text goes to, while open
        self._text = ""
        self._reasoning: dict[str, Any] | None = None  # the reasoning item, while open
        self._thought = ""
        self._finish: str | None = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response=dict(self._response)),
            self._event("response.in_progress", response=dict(self._response)),
        ]

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """The events for one chat chunk (the usage-only chunk ends the response)."""
        events: list[dict[str, Any]] = []
        if not chunk.get("choices"):  # the last chunk: usage
            self._response["usage"] = _usage(chunk.get("usage"))
            events += self._close_reasoning()
            events += self._close_message()
            _finish(self._response, self._finish)
            kind = "response.incomplete" if self._response["status"] == "incomplete" else "response.completed"
            return [*events, self._event(kind, response=self._response)]
        choice = chunk["choices"][0]
        delta = choice.get("delta") or {}
        if delta.get("reasoning_content"):
            events += self._open_reasoning()
            self._thought += delta["reasoning_content"]
            events.append(self._event(
                "response.reasoning_text.delta", item_id=self._reasoning["id"],
                output_index=len(self._response["output"]) - 1, content_index=0, delta=delta["reasoning_content"],
            ))
        if delta.get("content"):
            events += self._close_reasoning()
            events += self._open_message()
            self._text += delta["content"]
            events.append(self._event(
                "response.output_text.delta", item_id=self._message["id"],
                output_index=len(self._response["output"]) - 1, content_index=0, delta=delta["content"], logprobs=[],
            ))
        for call in delta.get("tool_calls") or []:
            events += self._close_reasoning()
            events += self._close_message()
            item = _call_item(call, "in_progress")
            index = len(self._response["output"])
            self._response["output"].append(item)
            events.append(self._event("response.output_item.added", output_index=index, item={**item, "arguments": ""}))
            events.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                      output_index=index, delta=item["arguments"]))
            events.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                      output_index=index, arguments=item["arguments"]))
            item["status"] = "completed"
            events.append(self._event("response.output_item.done", output_index=index, item=item))
        if choice.get("finish_reason") is not None:
            self._finish = choice["finish_reason"]
        return events

    def error(self, body: dict[str, Any]) -> dict[str, Any]:
        error = body.get("error", {})
        return self._event("error", code=error.get("code"), message=error.get("message"), param=error.get("param"))

    def _open_reasoning(self) -> list[dict[str, Any]]:
        if self._reasoning is not None:
            return []
        self._reasoning = _reasoning_item("", "in_progress")
        index = len(self._response["output"])
        self._response["output"].append(self._reasoning)
        return [
            self._event("response.output_item.added", output_index=index, item=dict(self._reasoning, content=[])),
            self._event("response.content_part.added", item_id=self._reasoning["id"], output_index=index,
                        content_index=0, part={"type": "reasoning_text", "text": ""}),
        ]

    def _close_reasoning(self) -> list[dict[str, Any]]:
        if self._reasoning is None:
            return []
        item, self._reasoning = self._reasoning, None
        index = self._response["output"].index(item)
        part = {"type": "reasoning_text", "text": self._thought}
        item["content"], item["status"] = [part], "completed"
        events = [
            self._event("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                        text=self._thought),
            self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                        part=part),
            self._event("response.output_item.done", output_index=index, item=item),
        ]
        self._thought = ""
        return events

    def _open_message(self) -> list[dict[str, Any]]:
        if self._message is not None:
            return []
        self._message = _message_item("", "in_progress")
        self._message["content"] = []
        index = len(self._response["output"])
        self._response["output"].append(self._message)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            self._event("response.output_item.added", output_index=index, item=dict(self._message, content=[])),
            self._event("response.content_part.added", item_id=self._message["id"], output_index=index,
                        content_index=0, part=part),
        ]

    def _close_message(self) -> list[dict[str, Any]]:
        if self._message is None:
            return []
        message, self._message = self._message, None
        index = self._response["output"].index(message)
        part = {"type": "output_text", "text": self._text, "annotations": [], "logprobs": []}
        message["content"], message["status"] = [part], "completed"
        events = [
            self._event("response.output_text.done", item_id=message["id"], output_index=index, content_index=0,
                        text=self._text, logprobs=[]),
            self._event("response.content_part.done", item_id=message["id"], output_index=index, content_index=0,
                        part=part),
            self._event("response.output_item.done", output_index=index, item=message),
        ]
        self._text = ""
        return events
