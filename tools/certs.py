"""A development certificate authority and one certificate per service, for TLS and mutual TLS.

    python -m tools.certs                      # -> deploy/certs/ (what `make certs` runs)
    python -m tools.certs --out DIR --san tandem.example.com --days 30

Writes `ca.pem` (the CA certificate: TANDEM_TLS_CA of every service), `ca.key` (the CA's key:
keep it away from the services), for each service `<name>.pem` / `<name>.key`
(TANDEM_TLS_CERT / TANDEM_TLS_KEY), and, unless it exists, `api-keys` with one random API key
(TANDEM_API_KEYS_FILE of the scheduler; clients send it as `authorization: Bearer <key>`). Every service certificate is valid as a server and as a
client (it is served on the service's port and presented on its calls to other services),
and names the service (compose's host name), `localhost`, `127.0.0.1`, `::1` and any
`--san`. Keys are ECDSA P-256, written readable by the owner only.

For development and tests only: production certificates come from the cluster's own CA
(cert-manager, Vault, ...), mounted the way docs/security.md describes.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICES = ("scheduler", "prefill", "decode", "draft")
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tandem"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class Authority:
    """A CA that signs service certificates."""

    def __init__(self, common_name: str = "Tandem development CA", days: int = 365):
        self.key = _key()
        self.days = days
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, common_name: str, sans: Sequence[str]) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for a service named `common_name`, valid as server and client."""
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=self.days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_san([common_name, *sans]), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(
        self, out: Path, names: Iterable[str], sans: Sequence[str] = ()
    ) -> dict[str, tuple[Path, Path]]:
        """ca.pem, ca.key and <name>.pem/<name>.key for each name; returns {name: (cert, key)}."""
        out.mkdir(parents=True, exist_ok=True)
        _write(out / "ca.pem", self.cert_pem)
        _write(out / "ca.key", _pem_key(self.key), private=True)
        paths = {}
        for name in names:
            cert, key = self.issue(name, [*DEFAULT_SANS, *sans])
            _write(out / f"{name}.pem", cert)
            _write(out / f"{name}.key", key, private=True)
            paths[name] = (out / f"{name}.pem", out / f"{name}.key")
        return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.certs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="deploy/certs", help="output directory (default deploy/certs)")
    parser.add_argument(
        "--san", action="append", default=[], help="extra DNS name or IP on every certificate"
    )
    parser.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    parser.add_argument(
        "--name",
        action="append",
        default=[],
        help=f"certificate to issue (default: {', '.join(SERVICES)}, client)",
    )
    args = parser.parse_args(argv)
    names = args.name or [*SERVICES, "client"]
    out = Path(args.out)
    Authority(days=args.days).write(out, names, args.san)
    print(f"wrote {out}/ca.pem, ca.key and {', '.join(f'{n}.pem/.key' for n in names)}")
    keys = out / "api-keys"
    if not keys.exists():
        _write(
            keys,
            f"# one API key per line (TANDEM_API_KEYS_FILE)\ntandem-dev-{secrets.token_urlsafe(24)}\n".encode(),
            private=True,
        )
        print(f"wrote {keys} (one random development key)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
