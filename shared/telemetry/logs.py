"""Structured logging with structlog: one JSON object per line, correlated with traces.

Every line carries `timestamp` (ISO 8601, UTC), `level`, `service`, `event`, and when known
`request_id` (bound with `bind_request_id`, or by the gRPC server interceptor from the
`x-request-id` metadata) and `trace_id`/`span_id` of the current OpenTelemetry span in
Jaeger's hex form, so a log line leads straight to its trace. On a TTY the same events are
rendered for humans. Records from the standard `logging` module (grpc, the OTel SDK) go
through the same processors.

This module does not choose where the logs are shipped: it writes to stderr.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import structlog

from shared.telemetry.tracing import current_trace_ids

REQUEST_ID_KEY = "request_id"


def add_trace_ids(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: `trace_id` (32 hex) and `span_id` (16 hex) of the current span."""
    ids = current_trace_ids()
    if ids is not None:
        event_dict.setdefault("trace_id", ids[0])
        event_dict.setdefault("span_id", ids[1])
    return event_dict


_LEADING_KEYS = ("timestamp", "level", "service", "event", "request_id", "trace_id", "span_id")


def _leading_keys_first(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    # JSON objects are unordered, but people read these lines too: fixed fields first.
    ordered = {key: event_dict.pop(key) for key in _LEADING_KEYS if key in event_dict}
    ordered.update(event_dict)
    return ordered


def _add_service(service: str):
    def add_service(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        event_dict.setdefault("service", service)
        return event_dict

    return add_service


def configure_logging(
    service: str,
    *,
    json: bool | None = None,
    level: str = "info",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog (and route stdlib `logging`) for this process.

    json=None chooses JSON unless `stream` (default stderr) is a TTY. Calling it again
    replaces the previous configuration, which is what tests do.
    """
    stream = stream if stream is not None else sys.stderr
    if json is None:
        json = not (hasattr(stream, "isatty") and stream.isatty())
    numeric_level = logging.getLevelName(level.upper())

    shared_processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_service(service),
        add_trace_ids,
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=hasattr(stream, "isatty") and stream.isatty())
    )
    final = [structlog.processors.dict_tracebacks, _leading_keys_first, renderer] if json else [renderer]

    structlog.configure(
        processors=[
            *shared_processors,
            structlog.processors.StackInfoRenderer(),
            *final,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(shared_processors, final, stream, numeric_level)


_HANDLER_NAME = "tandem-structlog"
_OWN_LOGGERS = ("services", "shared", "tools")


def _route_stdlib_logging(shared_processors, final, stream: TextIO, level: int) -> None:
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared_processors],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(level, logging.INFO))  # DEBUG from grpc/urllib3 internals is noise
    for ours in _OWN_LOGGERS:  # Tandem's own stdlib loggers follow the configured level
        logging.getLogger(ours).setLevel(level)


def get_logger(name: str | None = None, **initial: Any) -> Any:
    """A structlog logger; `initial` values are bound to every event it logs."""
    logger = structlog.get_logger(name) if name else structlog.get_logger()
    return logger.bind(**initial) if initial else logger


@contextmanager
def bind_request_id(request_id: str | None) -> Iterator[None]:
    """Every log line in this block (this task and tasks it starts) carries `request_id`."""
    if request_id is None:
        yield
        return
    with structlog.contextvars.bound_contextvars(**{REQUEST_ID_KEY: request_id}):
        yield


def current_request_id() -> str | None:
    return structlog.contextvars.get_contextvars().get(REQUEST_ID_KEY)
