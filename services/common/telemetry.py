"""Telemetry for one service instance: the one built by `__main__`, or a quiet default.

`__main__` builds telemetry from the environment (exporters, JSON logs, /metrics) and hands it
to the app. Apps built without one (tests, several services in one process) get their own
tracer provider and metric registry with no exporter, no server and no global state, so
that the code paths that record spans and metrics are the same everywhere.

Only request-carrying RPCs are traced: health checks, load polls and reflection would put a
root span in the trace store every second per worker. Draft.Release is housekeeping sent when
a decode worker has no sequence left (no request's trace to join), so it is left out too.
"""

from __future__ import annotations

import grpc

from shared.telemetry import Telemetry, TelemetryConfig, setup_telemetry

TRACED_SERVICES = (
    "/tandem.v1.Tandem/",
    "/tandem.v1.Decode/",
    "/tandem.v1.Prefill/",
    "/tandem.v1.Scheduler/",
    "/tandem.v1.Draft/",
)
UNTRACED_METHODS = ("/tandem.v1.Draft/Release",)


def quiet_telemetry(service_name: str) -> Telemetry:
    return setup_telemetry(TelemetryConfig(service_name=service_name), set_global=False, configure_logs=False)


class _OnlyTraced(grpc.aio.ServerInterceptor):
    """Applies `inner` to the methods of TRACED_SERVICES only."""

    def __init__(self, inner: grpc.aio.ServerInterceptor):
        self._inner = inner

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(TRACED_SERVICES) and method not in UNTRACED_METHODS:
            return await self._inner.intercept_service(continuation, handler_call_details)
        return await continuation(handler_call_details)


def traced_server_interceptors(telemetry: Telemetry) -> list[grpc.aio.ServerInterceptor]:
    return [_OnlyTraced(i) for i in telemetry.server_interceptors()]
