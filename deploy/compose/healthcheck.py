"""Container health check: exit 0 when the service's gRPC health service answers SERVING.

    python deploy/compose/healthcheck.py            # dials 127.0.0.1:$TANDEM_PORT
    python deploy/compose/healthcheck.py host:port
    python deploy/compose/healthcheck.py --service tandem.v1.Tandem   # one service's status

docker-compose.yml runs it in every Tandem container (`healthcheck.test`), so a container is
healthy exactly when its server is up and not shutting down (the server reports NOT_SERVING
during its grace period). It asks for the overall status (service name ""), which every
Tandem server sets (`--service NAME` asks for one service's instead: the Kubernetes readiness
probe of the scheduler asks for tandem.v1.Tandem). Exit 1 otherwise, with the reason on stderr (shown by `docker inspect`).

With TLS on (TANDEM_TLS_CERT), it dials the way the service's peers do: TLS verified against
TANDEM_TLS_CA, presenting the service's own certificate (workers require one), and checking the
server's certificate for TANDEM_TLS_SERVER_NAME, or for 127.0.0.1 when that is not set. The
health service needs no API key.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    service = ""
    if "--service" in argv:
        i = argv.index("--service")
        if i + 1 >= len(argv):
            print("healthcheck: --service needs a name", file=sys.stderr)
            return 1
        service = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
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
        with _channel(grpc, target) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2.0
            )
    except grpc.RpcError as e:
        print(f"healthcheck: {target}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        print(f"healthcheck: {target}: {status}", file=sys.stderr)
        return 1
    return 0


def _channel(grpc, target: str):
    cert = os.environ.get("TANDEM_TLS_CERT", "").strip()
    if not cert:
        return grpc.insecure_channel(target)

    def read(env: str) -> bytes | None:
        path = os.environ.get(env, "").strip()
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    ca = read("TANDEM_TLS_CA")
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=read("TANDEM_TLS_KEY") if ca else None,
        certificate_chain=read("TANDEM_TLS_CERT") if ca else None,
    )
    name = os.environ.get("TANDEM_TLS_SERVER_NAME", "").strip()
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return grpc.secure_channel(target, creds, options=options)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
