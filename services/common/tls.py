"""Transport security of every gRPC port and channel, from the TLS settings of shared/config.py.

Every server port and every channel between services is made here, so one place decides:

- no TANDEM_TLS_CERT: plaintext (local development, `make run`); a warning says so at start.
- TANDEM_TLS_CERT + TANDEM_TLS_KEY: the service serves TLS with them (the public APIs).
- + TANDEM_TLS_CA: mutual TLS on every internal hop. Worker and draft ports require a client
  certificate signed by the CA; channels to other services trust only that CA and present
  this service's certificate. The scheduler's public port asks for no client certificate
  (API clients have none); its internal port (TANDEM_INTERNAL_PORT) requires one, and worker
  registration is accepted only there (`peer_certificate`).

What this module does not know: API keys (services/common/api_keys.py), and the collective
KV transport, which is not gRPC (shared/kv/README.md, docs/security.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from shared.config import ConfigError

log = logging.getLogger(__name__)


def _read(env: str, path: str) -> bytes | None:
    if not path:
        return None
    try:
        data = open(path, "rb").read()
    except OSError as e:
        raise ConfigError(f"{env}: cannot read {path}: {e.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{env}: {path} is not PEM")
    return data


@dataclass(frozen=True)
class Tls:
    """The PEM material of one service; `Tls()` is plaintext."""

    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    server_name: str = ""  # checked against the peers' certificates instead of the dialled host

    @classmethod
    def from_config(cls, config) -> Tls:
        """From the TANDEM_TLS_* fields of a service's config (ConfigError naming a bad file)."""
        return cls(
            cert=_read("TANDEM_TLS_CERT", config.tls_cert),
            key=_read("TANDEM_TLS_KEY", config.tls_key),
            ca=_read("TANDEM_TLS_CA", config.tls_ca),
            server_name=config.tls_server_name,
        )

    @property
    def enabled(self) -> bool:
        """This service serves TLS."""
        return self.cert is not None

    @property
    def mutual(self) -> bool:
        """Internal hops use mutual TLS (a CA is set, with this service's certificate)."""
        return self.ca is not None and self.cert is not None

    # -- servers ------------------------------------------------------------------------------
    def server_credentials(self, *, require_client_cert: bool) -> grpc.ServerCredentials | None:
        """None: plaintext. `require_client_cert` (with a CA): only peers with a certificate the CA
        signed complete the handshake; without it, clients are not asked for one."""
        if not self.enabled:
            return None
        require = require_client_cert and self.mutual
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.ca if require else None,
            require_client_auth=require,
        )

    def add_port(self, server: grpc.aio.Server, bind: str, *, require_client_cert: bool) -> int:
        """Bind `bind` (host:port) on `server` with these credentials; returns the port (0: failed)."""
        creds = self.server_credentials(require_client_cert=require_client_cert)
        if creds is None:
            return server.add_insecure_port(bind)
        return server.add_secure_port(bind, creds)

    # -- channels between services ----------------------------------------------------------
    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """None: plaintext. With a CA: trust only it, and present this service's certificate."""
        if not self.mutual:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def _options(
        self, options: Sequence[tuple[str, object]], server_name: str = ""
    ) -> list[tuple[str, object]]:
        options = list(options)
        name = self.server_name or server_name
        if self.mutual and name:
            options.append(("grpc.ssl_target_name_override", name))
        return options

    def aio_channel(
        self, target: str, *, options=(), interceptors=(), server_name: str = ""
    ) -> grpc.aio.Channel:
        """An asyncio channel to another Tandem service. `server_name`: the name its certificate
        must carry when `target` does not name it (an IP address resolved from that name); the
        TANDEM_TLS_SERVER_NAME setting wins over it."""
        creds = self.channel_credentials()
        if creds is None:
            return grpc.aio.insecure_channel(
                target, options=list(options), interceptors=list(interceptors) or None
            )
        return grpc.aio.secure_channel(
            target,
            creds,
            options=self._options(options, server_name),
            interceptors=list(interceptors) or None,
        )

    def channel(self, target: str, *, options=()) -> grpc.Channel:
        """A blocking channel to another Tandem service (the decode worker's draft client)."""
        creds = self.channel_credentials()
        if creds is None:
            return grpc.insecure_channel(target, options=list(options))
        return grpc.secure_channel(target, creds, options=self._options(options))

    # -- start-up ---------------------------------------------------------------------------
    def log_mode(self, service: str, *, public: bool = False) -> None:
        """One line at start saying how this service's traffic is protected (a warning when not)."""
        if not self.enabled:
            log.warning(
                "%s: TLS is OFF: plaintext gRPC, anyone who reaches the port can call it "
                "(local development only; set TANDEM_TLS_CERT, TANDEM_TLS_KEY, TANDEM_TLS_CA)",
                service,
            )
        elif not self.mutual:
            log.warning(
                "%s: TLS on the public port, but no TANDEM_TLS_CA: internal hops are plaintext and "
                "worker registration is unauthenticated",
                service,
            )
        else:
            log.info(
                "%s: %s, mutual TLS on internal hops", service, "TLS on the public port" if public else "TLS"
            )


PLAINTEXT = Tls()


def peer_certificate(context: grpc.aio.ServicerContext) -> str | None:
    """The common name of the client certificate the peer of this call presented and the
    server verified against its CA; None when it presented none (or none was asked for)."""
    auth = context.auth_context() or {}
    if not auth.get("x509_pem_cert"):
        return None
    names = auth.get("x509_common_name") or auth.get("x509_subject") or [b"?"]
    return names[0].decode(errors="replace")
