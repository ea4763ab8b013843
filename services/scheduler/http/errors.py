"""Errors of the HTTP API in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

The pipeline raises the same exceptions for both fronts (services/common/errors.py); their gRPC
status code picks the HTTP one, so both fronts answer alike:

    INVALID_ARGUMENT 400 (param: the field)   RESOURCE_EXHAUSTED 429 (+ Retry-After)
    UNAVAILABLE      503                      DEADLINE_EXCEEDED  504
    NOT_FOUND        404                      anything else      500 (logged with its traceback)

A failed call to a worker passes its code through, as on the gRPC front.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
from fastapi.exceptions import RequestValidationError
from starlette.responses import JSONResponse

from services.common.errors import InvalidArgument, status_of

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 429 tells the client to wait
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_exceeded"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}


class HttpError(Exception):
    """An error with its HTTP status, type and param, raised by the HTTP layer itself."""

    def __init__(
        self, status: int, message: str, *, type: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def describe(exc: BaseException, rename: Callable[[str], str] = lambda f: f) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error body) for an exception of the pipeline or of this layer."""
    if isinstance(exc, HttpError):
        return exc.status, error_body(str(exc), exc.type, exc.param, exc.code or exc.type)
    code, details = status_of(exc)
    status, kind = _STATUS.get(code, (500, "internal_error"))
    if status == 500:
        log.error("HTTP request failed", exc_info=exc)
    param = None
    if isinstance(exc, InvalidArgument):
        param = rename(exc.field)
        details = f"{param}: {details.split(': ', 1)[-1]}"
    elif status == 400 and ": " in details:  # a worker's INVALID_ARGUMENT names the field first
        param = rename(details.split(": ", 1)[0])
    return status, error_body(details, kind, param, code.name.lower())


def error_response(exc: BaseException, rename: Callable[[str], str] = lambda f: f) -> JSONResponse:
    status, body = describe(exc, rename)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None
    return JSONResponse(body, status_code=status, headers=headers)


def validation_error(exc: RequestValidationError, content_type: str | None = None) -> JSONResponse:
    """pydantic's complaint about a body -> 400 naming the first bad field (FastAPI would say 422).
    `content_type`: the request's, to say so when a JSON body was sent as something else (curl -d
    sends application/x-www-form-urlencoded, which FastAPI does not parse as JSON)."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request body", "type": ""}
    loc = [part for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        why = (first.get("ctx") or {}).get("error") or first.get("msg")
        return JSONResponse(error_body(f"the body is not valid JSON: {why}", "invalid_request_error"), 400)
    if not loc and first.get("type") in ("model_attributes_type", "dict_type"):
        message = "request body: must be a JSON object"
        if content_type and "json" not in content_type:
            message += f", sent with Content-Type: application/json (this one came as {content_type})"
        return JSONResponse(error_body(message, "invalid_request_error", None, "invalid_value"), 400)
    param = _param(loc)
    message = f"{param}: {first.get('msg')}" if param else f"request body: {first.get('msg')}"
    return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_value"), 400)


def _param(loc: list) -> str | None:
    """('messages', 0, 'role') -> 'messages[0].role'; the type tags pydantic puts in unions are dropped."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i == 0:
            out = str(part)
        elif loc[0] == "messages" and isinstance(loc[i - 1], int) and i == 2:
            out += f".{part}"  # a message's own field
        else:
            break  # a union member's tag (str, list[int], ...) or deeper detail
    return out or None
