"""The OpenAI-compatible HTTP API of the scheduler, as one ASGI app over the gRPC front's pipeline.

    POST /v1/completions, POST /v1/chat/completions   (stream: server-sent events, then `data: [DONE]`)
    POST /v1/responses   (OpenAI's Responses API, translated to and from chat: responses.py)
    GET  /v1/models, GET /health, GET /metrics
    POST /tokenize, POST /detokenize, GET /tokenizer_info   (vLLM's tokenizer routes: tokenize.py)

`build_http_app` takes the scheduler's pipeline objects (the Frontend that the gRPC servicer
calls, the worker pool, the tokenizer, telemetry). A request body is parsed by pydantic
(schemas.py), mapped to the GenerateRequests a gRPC client would send (convert.py), each
prepared by `Frontend.prepare` and streamed by `Frontend.generate`: validation, admission,
routing, migration, tracing and metrics are the gRPC path's own. What is HTTP's alone: the
W3C `traceparent` comes from the HTTP headers (a SERVER span `POST /v1/...` joins the
client's trace), `X-Request-Id` names the request, `X-Request-Timeout` (seconds) is its
deadline, a client that disconnects cancels it (KV freed as on a gRPC cancel), and errors
take OpenAI's JSON shape (errors.py).

Checks that apply to every route belong in `build_http_app`: every route is added there. API
keys (when the scheduler has TANDEM_API_KEYS_FILE) are one: auth.py.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from services.common.api_keys import ApiKeys
from shared.telemetry import Telemetry, extract_context
from shared.text import Tokenizer

from ..frontend import Frontend, Piece
from ..pool import WorkerPool
from . import convert, responses
from .auth import ApiKeyMiddleware
from .chat import ChatTemplate
from .errors import HttpError, describe, error_body, error_response, validation_error
from .reasoning import END, TokenCount
from .run import ClientDisconnected, Run, until_disconnect
from .schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .tokenize import TokenizerRoutes
from .tool_parsers import ToolParser

DONE = b"data: [DONE]\n\n"


def build_http_app(
    frontend: Frontend,
    pool: WorkerPool,
    tokenizer: Tokenizer,
    telemetry: Telemetry,
    *,
    model_name: str,
    chat_template: ChatTemplate | None,
    tool_parser: ToolParser | None = None,
    reasoning: bool = False,
    api_keys: ApiKeys | None = None,
) -> FastAPI:
    """The ASGI app; every route and exception handler is added here. `reasoning`: chat replies'
    <think> blocks go apart, as reasoning_content (reasoning.py)."""
    api = OpenAIFront(
        frontend, pool, tokenizer, telemetry, model_name=model_name, chat_template=chat_template,
        tool_parser=tool_parser, reasoning=reasoning,
    )
    app = FastAPI(title="Tandem", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(
        RequestValidationError, lambda request, exc: validation_error(exc, request.headers.get("content-type"))
    )

    def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = str(exc.detail)
        if exc.status_code == 404:  # a route of another server (/v1/embeddings, ...): say which are here
            routes = ", ".join(
                f"{'/'.join(sorted(r.methods - {'HEAD'}))} {r.path.replace(':path}', '}')}"
                for r in app.routes
                if getattr(r, "methods", None)
            )
            message = f"{request.method} {request.url.path} is not served here; this server serves {routes}"
        return JSONResponse(error_body(message, "invalid_request_error"), exc.status_code, headers=exc.headers)

    app.add_exception_handler(StarletteHTTPException, http_error)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await api.serve(request, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await api.serve(request, body)

    @app.post("/v1/responses")
    async def create_response(body: responses.ResponsesRequest, request: Request) -> Response:
        return await api.serve_responses(request, body)

    tokens = TokenizerRoutes(
        tokenizer, frontend.encode, chat_template, pool.max_model_len
    )

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Response:
        return await _answered(tokens.tokenize(body), {"text": "prompt"})

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Response:
        return await _answered(tokens.detokenize(body))

    app.get("/tokenizer_info")(tokens.tokenizer_info)
    app.get("/v1/models")(api.models)
    app.get("/v1/models/{model_id:path}")(api.model)
    app.get("/health")(api.health)
    app.get("/metrics")(api.metrics)
    if api_keys is not None:
        app.add_middleware(ApiKeyMiddleware, keys=api_keys)
    return app


class OpenAIFront:
    def __init__(
        self,
        frontend: Frontend,
        pool: WorkerPool,
        tokenizer: Tokenizer,
        telemetry: Telemetry,
        *,
        model_name: str,
        chat_template: ChatTemplate | None,
        tool_parser: ToolParser | None = None,
        reasoning: bool = False,
    ):
        self._frontend = frontend
        self._tool_parser = tool_parser
        self._reasoning = reasoning
        self._think_end = tokenizer.token_to_id(END) if reasoning else None  # </think> as one token
        self._pool = pool
        self._tokenizer = tokenizer
        self._tokens = convert.Tokens(tokenizer)
        self._telemetry = telemetry
        self._model_name = model_name
        self._chat_template = chat_template
        self._created = int(time.time())
        self._tasks: set[asyncio.Task] = set()

    # -- generation ---------------------------------------------------------------------
    async def serve_responses(self, request: Request, body: responses.ResponsesRequest) -> Response:
        """POST /v1/responses: the chat request it means, answered in the Responses shape."""
        field = responses.field_namer(body)
        try:
            chat = responses.to_chat(body)
        except Exception as e:  # noqa: BLE001 - answered in OpenAI's shape
            return error_response(e)
        return await self.serve(request, chat, answer_as=body, field=field)

    async def serve(
        self,
        request: Request,
        body: CompletionRequest | ChatCompletionRequest,
        *,
        answer_as: responses.ResponsesRequest | None = None,
        field: Callable[[str], str] = lambda f: f,
    ) -> Response:
        """One generation request; `answer_as`: a Responses request that `body` translates, whose
        answer goes back in the Responses shape, its errors named by `field`."""
        chat = isinstance(body, ChatCompletionRequest)
        route = request.url.path
        span = self._telemetry.tracer.start_span(
            f"POST {route}",
            context=extract_context(list(request.headers.items())),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": "POST", "http.route": route, "tandem.api": "openai"},
        )
        rename: Callable[[str], str] = field
        try:
            if body.model is not None and body.model != self._model_name:
                raise HttpError(
                    404,
                    f"the model {body.model!r} does not exist; this server serves {self._model_name!r}",
                    type="invalid_request_error",
                    param="model",
                    code="model_not_found",
                )
            request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
            span.set_attribute("tandem.request_id", request_id)
            timeout_s = _timeout(request.headers.get("x-request-timeout"))
            if chat:
                plan = await convert.chat_plan(
                    body,
                    request_id,
                    self._chat_template,
                    functools.partial(self._frontend.encode, add_special_tokens=False),
                    self._pool.max_model_len(),
                    self._tool_parser,
                    self._reasoning,
                )
            else:
                plan = convert.completion_plan(body, request_id)
            rename = lambda f: field(plan.openai_field(f))  # noqa: E731
            jobs = [await self._frontend.prepare(r) for r in plan.requests]
            run = Run(self._frontend, jobs, timeout_s, trace.set_span_in_context(span), self._tasks)
        except Exception as e:  # noqa: BLE001 - answered in OpenAI's shape
            return _end(span, error_response(e, rename))
        meta = _Meta(
            ("chatcmpl-" if chat else "cmpl-") + request_id,
            convert.now(),
            self._model_name,
            chat,
            plan,
            body.stream_options is not None and body.stream_options.include_usage,
            # echo: each choice's prompt as text, and its first token id (which has no logprob)
            [(self._prompt_text(r), j.prompt_token_ids[0]) for r, j in zip(plan.requests, jobs, strict=True)]
            if plan.echo
            else None,
        )
        try:
            if body.stream:
                # The first piece before the headers: an overloaded or failed request still gets its status.
                first = await until_disconnect(request, run.next())
            else:
                pieces = await until_disconnect(request, run.collect())
        except ClientDisconnected:
            run.cancel()
            return _end(span, Response(status_code=499))
        except BaseException as e:
            run.cancel()
            if not isinstance(e, Exception):
                _end(span, None)
                raise
            return _end(span, error_response(e, rename))
        headers = {"x-request-id": request_id}
        if not body.stream:
            answer = self._answer(meta, pieces)
            if answer_as is not None:
                answer = responses.response_object(answer, answer_as)
            return _end(span, JSONResponse(answer, headers=headers))
        chunks = self._chunks(meta, run, first, span, rename)
        events = _events(chunks) if answer_as is None else _response_events(chunks, answer_as, self._model_name)
        return StreamingResponse(events, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})

    def _prompt_text(self, request) -> str:
        if request.WhichOneof("prompt") == "text":
            return request.text
        return self._tokenizer.decode(request.token_ids.ids, skip_special_tokens=False)

    def _answer(self, meta: _Meta, pieces: list[list[Piece]]) -> dict[str, Any]:
        """The non-streaming response body."""
        choices = []
        counts = self._reasoning_counts(meta)
        for index, choice in enumerate(pieces):
            merged = Piece(
                "",
                "".join(p.text for p in choice),
                [],
                [lp for p in choice for lp in p.logprobs],
                [lp for p in choice for lp in p.prompt_logprobs],
            )
            text, logprobs = self._content(meta, index, merged, 0, True)
            reason = next((convert.finish_reason(p) for p in choice if p.usage is not None), None)
            entry: dict[str, Any] = {"index": index, "finish_reason": reason, "logprobs": logprobs}
            thought, thinks = None, False
            if meta.plan.reasoning is not None:
                thought, text = meta.plan.reasoning.split(text, final=True)
                for p in choice:
                    counts[index].add(p.text, p.token_ids)
                thinks = counts[index].tokens > 0
            content, calls = (
                meta.plan.tool_calls.split(text) if meta.plan.tool_calls and reason == "stop" else (text, [])
            )
            if calls:
                entry["message"] = {"role": "assistant", "content": content or None, "tool_calls": calls}
                entry["finish_reason"] = "tool_calls"
            elif meta.chat:  # a reply cut while thinking has no content
                entry["message"] = {"role": "assistant", "content": text if text or not thinks else None}
            else:
                entry["text"] = text
            if thought is not None and meta.plan.show_reasoning:
                entry["message"]["reasoning_content"] = thought or None
            choices.append(entry)
        usages = [meta.usage(next((p.usage for p in choice if p.usage is not None), None)) for choice in pieces]
        return {
            "id": meta.id,
            "object": "chat.completion" if meta.chat else "text_completion",
            "created": meta.created,
            "model": meta.model,
            "choices": choices,
            "usage": convert.usage_json(usages, meta.plan.prompt_of, _reasoning_tokens(counts)),
        }

    def _reasoning_counts(self, meta: _Meta) -> list[TokenCount] | None:
        """Each choice's counter of reasoning tokens, for the usage (None: the replies don't think)."""
        if meta.plan.reasoning is None:
            return None
        return [TokenCount(meta.plan.reasoning, self._think_end) for _ in meta.plan.requests]

    async def _chunks(
        self, meta: _Meta, run: Run, first: tuple[int, Piece] | None, span: trace.Span, rename
    ) -> AsyncIterator[dict[str, Any]]:
        """A stream's chunks: one per piece, the usage chunk when asked; an error after the
        status line went out is a last chunk {"error": ...}."""
        status = 200
        usages: list[Any] = [None] * len(meta.plan.requests)
        offsets = [0] * len(usages)
        started = [False] * len(usages)
        # tool calls or reasoning: each choice's text so far, of whose answer offsets[i] chars and of
        # whose reasoning thought[i] chars went out, and the logprobs of tokens not sent yet
        texts = [""] * len(usages)
        thought = [0] * len(usages)
        held: list[list[Any]] = [[] for _ in usages]
        parsed = meta.plan.tool_calls is not None or meta.plan.reasoning is not None
        counts = self._reasoning_counts(meta)
        try:
            item = first
            while item is not None:
                index, piece = item
                if piece.usage is not None:
                    usages[index] = meta.usage(piece.usage)
                if counts is not None:
                    counts[index].add(piece.text, piece.token_ids)
                if parsed:
                    texts[index] += piece.text
                    held[index] += piece.logprobs
                    chunk = self._parsed_chunk(
                        meta, index, piece, texts[index], held[index], offsets, thought, started
                    )
                    if chunk is not None:
                        held[index] = []
                        yield chunk
                elif (
                    piece.text
                    or piece.usage is not None
                    or meta.plan.logprobs is not None
                    or ((meta.chat or meta.echo) and not started[index])
                ):  # not for tokens whose text is held back (a split character, a possible stop string)
                    yield self._chunk(meta, index, piece, offsets, started)
                item = await run.next()
            if meta.include_usage:
                usage = convert.usage_json(usages, meta.plan.prompt_of, _reasoning_tokens(counts))
                yield {**meta.head(), "choices": [], "usage": usage}
        except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes in the stream
            status, body = describe(e, rename)
            yield body
        finally:
            run.cancel()  # the client went away (or an error): the choices still running stop
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end()

    def _parsed_chunk(
        self,
        meta: _Meta,
        index: int,
        piece: Piece,
        text: str,
        logprobs: list[Any],
        offsets: list[int],
        thought: list[int],
        started: list[bool],
    ) -> dict[str, Any] | None:
        """A chunk of a choice that may think or call tools (None: nothing to send yet). Reasoning
        goes out as reasoning_content up to a tag that may be arriving; the answer's content up to
        where a call could begin (nothing, for a constrained call); at the end, the calls in one
        delta, or the rest as content when there are none. `text`: the choice's text so far;
        `logprobs`: those of its tokens since the last chunk, which this one carries."""
        delta: dict[str, Any] = {}
        if not started[index]:
            delta["role"] = "assistant"
            started[index] = True
        reason = convert.finish_reason(piece)
        reasoning, answer = "", text
        if meta.plan.reasoning is not None:
            reasoning, answer = meta.plan.reasoning.split(text, final=reason is not None)
        if len(reasoning) > thought[index] and meta.plan.show_reasoning:
            delta["reasoning_content"] = reasoning[thought[index] :]
            thought[index] = len(reasoning)
        tools = meta.plan.tool_calls
        calls: list[dict[str, Any]] = []
        if tools is None:
            content = answer
        elif reason is None:
            content = answer[: max(offsets[index], tools.streamable(answer))]
        elif reason == "stop":
            content, calls = tools.split(answer)
        else:
            content = answer
        if len(content) > offsets[index] or ("role" in delta and "reasoning_content" not in delta):
            delta["content"] = content[offsets[index] :]
            offsets[index] = max(offsets[index], len(content))
        if calls:
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
            reason = "tool_calls"
        if not delta and reason is None:
            return None
        lps = self._logprobs(meta, Piece("", "", [], logprobs), 0) if meta.plan.logprobs is not None else None
        return meta.chunk({"index": index, "delta": delta, "logprobs": lps, "finish_reason": reason})

    def _chunk(
        self, meta: _Meta, index: int, piece: Piece, offsets: list[int], started: list[bool]
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index}
        if meta.chat:
            delta: dict[str, Any] = {}
            if not started[index]:
                delta["role"] = "assistant"
                started[index] = True
            if piece.text or "role" in delta:
                delta["content"] = piece.text
            choice["delta"] = delta
            choice["logprobs"] = self._logprobs(meta, piece, 0) if meta.plan.logprobs is not None else None
        else:
            choice["text"], choice["logprobs"] = self._content(meta, index, piece, offsets[index], not started[index])
            started[index] = True
            offsets[index] += len(choice["text"])
        choice["finish_reason"] = convert.finish_reason(piece)
        return meta.chunk(choice)

    def _content(
        self, meta: _Meta, index: int, piece: Piece, offset: int, first: bool
    ) -> tuple[str, dict[str, Any] | None]:
        """A completion choice's text and logprobs for this piece; `first`: the choice's first
        piece, which starts with the prompt when echoed; offset: the choice's text so far."""
        text = "" if meta.plan.prompt_only else piece.text
        completion = piece if not meta.plan.prompt_only else Piece("", "", [])
        logprobs = None
        if meta.echo is not None and first:
            prompt, first_token = meta.echo[index]
            text = prompt + text
            if meta.plan.logprobs is not None:
                logprobs = convert.prompt_logprobs(self._tokens, first_token, piece, meta.plan.logprobs)
                logprobs = convert.completion_logprobs(
                    self._tokens, completion, meta.plan.logprobs, len(prompt), logprobs
                )
                return text, logprobs
        if meta.plan.logprobs is not None:
            logprobs = self._logprobs(meta, completion, offset)
        return text, logprobs

    def _logprobs(self, meta: _Meta, piece: Piece, offset: int) -> dict[str, Any]:
        top_n = meta.plan.logprobs or 0
        if meta.chat:
            return convert.chat_logprobs(self._tokens, piece, top_n)
        return convert.completion_logprobs(self._tokens, piece, top_n, offset)

    # -- the other routes ---------------------------------------------------------------
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_entry()]}

    async def model(self, model_id: str) -> Response:
        """GET /v1/models/{id}: the served model, or 404 in OpenAI's shape."""
        if model_id != self._model_name:
            return error_response(
                HttpError(
                    404,
                    f"the model {model_id!r} does not exist; this server serves {self._model_name!r}",
                    type="invalid_request_error",
                    param="model",
                    code="model_not_found",
                )
            )
        return JSONResponse(self._model_entry())

    def _model_entry(self) -> dict[str, Any]:
        entry = {"id": self._model_name, "object": "model", "created": self._created, "owned_by": "tandem"}
        max_model_len = self._pool.max_model_len()
        if max_model_len:
            entry["max_model_len"] = max_model_len
        return entry

    async def health(self) -> Response:
        """200 while at least one decode worker is healthy; 503 otherwise."""
        decode = len(self._pool.healthy("decode"))
        if not decode:
            body = error_body("no healthy decode worker", "service_unavailable", None, "unavailable")
            return JSONResponse(body, status_code=503)
        return JSONResponse(
            {"status": "ok", "decode_workers": decode, "prefill_workers": len(self._pool.healthy("prefill"))}
        )

    async def metrics(self) -> Response:
        return Response(generate_latest(self._telemetry.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _answered(result: Awaitable[dict[str, Any]], fields: dict[str, str] | None = None) -> Response:
    """A route's JSON, or its error in OpenAI's shape (`fields`: internal field -> the route's)."""
    try:
        return JSONResponse(await result)
    except Exception as e:  # noqa: BLE001 - answered in OpenAI's shape
        return error_response(e, lambda name: (fields or {}).get(name, name))


class _Meta:
    """What every chunk of one response repeats."""

    __slots__ = ("id", "created", "model", "chat", "plan", "include_usage", "echo", "_head")

    def __init__(
        self,
        id: str,
        created: int,
        model: str,
        chat: bool,
        plan: convert.Plan,
        include_usage: bool,
        echo: list[tuple[str, int]] | None = None,
    ):
        self.id, self.created, self.model, self.chat = id, created, model, chat
        self.plan, self.include_usage, self.echo = plan, include_usage, echo
        self._head = {
            "id": id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
        }

    def head(self) -> dict[str, Any]:
        return self._head

    def chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        """A stream chunk of one choice (its usage null when the last chunk carries the usage)."""
        chunk = {**self._head, "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def usage(self, usage: Any) -> Any:
        """A choice's usage as the client sees it: echo with max_tokens 0 returns no completion token."""
        if usage is None or not self.plan.prompt_only:
            return usage
        out = type(usage)()
        out.CopyFrom(usage)
        out.completion_tokens = 0
        return out


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


async def _events(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """A chat or completions stream as server-sent events, ended by [DONE]."""
    async for chunk in chunks:
        yield _event(chunk)
    yield DONE


async def _response_events(
    chunks: AsyncIterator[dict[str, Any]], req: responses.ResponsesRequest, model: str
) -> AsyncIterator[bytes]:
    """A chat stream as the Responses stream: typed events, `event:` lines included."""
    translator = responses.StreamTranslator(req, model)

    def encode(event: dict[str, Any]) -> bytes:
        return f"event: {event['type']}\n".encode() + _event(event)

    for event in translator.start():
        yield encode(event)
    async for chunk in chunks:
        for event in [translator.error(chunk)] if "error" in chunk else translator.chunk(chunk):
            yield encode(event)


def _reasoning_tokens(counts: list[TokenCount] | None) -> int | None:
    return None if counts is None else sum(c.tokens for c in counts)


def _timeout(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise HttpError(
            400,
            f"x-request-timeout: expected a number of seconds > 0, got {value!r}",
            type="invalid_request_error",
            param="x-request-timeout",
            code="invalid_value",
        )
    return seconds


def _end(span: trace.Span, response: Response | None) -> Response | None:
    if response is not None:
        span.set_attribute("http.response.status_code", response.status_code)
        if response.status_code >= 500:
            span.set_status(Status(StatusCode.ERROR))
    span.end()
    return response
