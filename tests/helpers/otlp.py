"""An OTLP/gRPC trace receiver for tests: a stand-in for Jaeger's collector port.

    with OtlpReceiver() as receiver:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
        ...  # run services, shut them down (which flushes their exporters)
        spans = receiver.wait_for_spans(lambda spans: len(spans) >= 3)

It runs a synchronous grpc server on its own threads, so it serves exporters in this
process (asyncio or not) and in child processes alike. Spans are flattened into dicts
with hex ids, the form Jaeger shows and `shared.telemetry.jsonl` writes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which) if which else None


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request, context):  # noqa: N802 (the proto's name)
        self._receiver._add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """Collects every span exported to `endpoint` (plaintext gRPC on 127.0.0.1)."""

    def __init__(self) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._spans: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self.export_calls = 0

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        flat = []
        for resource_spans in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    flat.append(
                        {
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex() or None,
                            "name": s.name,
                            "kind": _KINDS.get(s.kind, str(s.kind)),
                            "service": resource.get("service.name"),
                            "start_time_unix_nano": s.start_time_unix_nano,
                            "end_time_unix_nano": s.end_time_unix_nano,
                            "status": {"code": _STATUS.get(s.status.code), "description": s.status.message},
                            "attributes": {kv.key: _value(kv.value) for kv in s.attributes},
                            "links": [
                                {
                                    "trace_id": link.trace_id.hex(),
                                    "span_id": link.span_id.hex(),
                                    "attributes": {kv.key: _value(kv.value) for kv in link.attributes},
                                }
                                for link in s.links
                            ],
                            "resource": resource,
                        }
                    )
        with self._changed:
            self.export_calls += 1
            self._spans.extend(flat)
            self._changed.notify_all()

    @property
    def spans(self) -> list[dict[str, Any]]:
        with self._changed:
            return list(self._spans)

    def wait_for_spans(
        self,
        predicate: Callable[[list[dict[str, Any]]], bool] = bool,
        timeout: float = 10.0,
    ) -> list[dict[str, Any]]:
        """Block until `predicate(spans)` holds (default: any span arrived); TimeoutError if not."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(list(self._spans)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = [s["name"] for s in self._spans]
                    raise TimeoutError(f"OTLP receiver: condition not met in {timeout}s; got spans {names}")
                self._changed.wait(remaining)
            return list(self._spans)
