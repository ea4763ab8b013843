"""Finished spans as JSON lines, for users without Jaeger (`python -m tools.traces show ...`).

One object per span per line:
  {"trace_id": 32 hex, "span_id": 16 hex, "parent_span_id": 16 hex | null, "name",
   "kind": "SERVER" | "CLIENT" | "INTERNAL" | ..., "service", "start_time_unix_nano",
   "end_time_unix_nano", "duration_ms", "status": {"code": "UNSET" | "OK" | "ERROR",
   "description"}, "attributes": {...}, "events": [{"name", "time_unix_nano", "attributes"}]}

Several services may append to the same file: each export is one `write` on a file
opened with O_APPEND, which Linux does not interleave with other appends.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    start, end = span.start_time or 0, span.end_time or 0
    return {
        "trace_id": trace.format_trace_id(context.trace_id),
        "span_id": trace.format_span_id(context.span_id),
        "parent_span_id": trace.format_span_id(span.parent.span_id) if span.parent else None,
        "name": span.name,
        "kind": span.kind.name,
        "service": span.resource.attributes.get(SERVICE_NAME),
        "start_time_unix_nano": start,
        "end_time_unix_nano": end,
        "duration_ms": (end - start) / 1e6,
        "status": {"code": span.status.status_code.name, "description": span.status.description},
        "attributes": _plain(span.attributes),
        "events": [
            {"name": event.name, "time_unix_nano": event.timestamp, "attributes": _plain(event.attributes)}
            for event in span.events
        ],
    }


def _plain(attributes) -> dict[str, Any]:
    # OTel keeps sequence values as tuples; JSON wants lists.
    return {k: list(v) if isinstance(v, tuple) else v for k, v in (attributes or {}).items()}


class JsonLinesSpanExporter(SpanExporter):
    """Appends each exported batch to `path`, one JSON object per span."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._path = os.fspath(path)
        self._lock = threading.Lock()
        self._fd: int | None = None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        data = "".join(json.dumps(span_to_dict(s), separators=(",", ":")) + "\n" for s in spans)
        try:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                os.write(self._fd, data.encode())
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # every export is written straight through


def read_spans(paths: Iterable[str | os.PathLike]) -> Iterator[dict[str, Any]]:
    """Span dicts from JSON-lines files; a torn last line (a writer still running) is skipped."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue
