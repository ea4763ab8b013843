"""Container health check: exit 0 when the service's gRPC health service answers SERVING.

    python deploy/compose/healthcheck.py            # dials 127.0.0.1:$TANDEM_PORT
    python deploy/compose/healthcheck.py host:port

docker-compose.yml runs it in every Tandem container (`healthcheck.test`), so a container is
healthy exactly when its server is up and not shutting down (the server reports NOT_SERVING
during its grace period). It asks for the overall status (service name ""), which every
Tandem server sets. Exit 1 otherwise, with the reason on stderr (shown by `docker inspect`).
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    if argv:
        target = argv[0]
    else:
        port = os.environ.get("TANDEM_PORT", "").strip()
        if not port.isdigit():
            print(f"healthcheck: TANDEM_PORT is {port!r}; pass host:port instead", file=sys.stderr)
            return 1
        target = f"127.0.0.1:{port}"

    import grpc  # imported here: --help-like misuse above answers without loading grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(target) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
    except grpc.RpcError as e:
        print(f"healthcheck: {target}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        print(f"healthcheck: {target}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
