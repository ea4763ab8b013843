"""Security pieces without processes: the TLS settings and their checks, the development CA,
API keys (file, rotation, constant-time check, per-key limit, never logged), and the binding of
the collective KV transport's rendezvous port. The same pieces across real processes:
tests/e2e/test_security_e2e.py."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from services.common.api_keys import ApiKeys, TooManyRequests, Unauthenticated, key_id
from services.common.tls import PLAINTEXT, Tls
from shared.config import ConfigError, DraftConfig, SchedulerConfig, WorkerConfig, from_env
from tools.certs import Authority
from tools.certs import main as certs_main

KEY = "k-" + "7" * 30


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    Authority().write(out, ["scheduler", "decode"])
    return out


# -- settings ----------------------------------------------------------------------------------


def _tls_env(certs, name="decode", ca=True) -> dict[str, str]:
    env = {
        "TANDEM_MODEL": "/m",
        "TANDEM_TLS_CERT": str(certs / f"{name}.pem"),
        "TANDEM_TLS_KEY": str(certs / f"{name}.key"),
    }
    if ca:
        env["TANDEM_TLS_CA"] = str(certs / "ca.pem")
    return env


def test_tls_settings_are_checked_at_start(certs):
    config = from_env(WorkerConfig, _tls_env(certs), {"role": "decode"})
    tls = Tls.from_config(config)
    assert tls.enabled and tls.mutual
    cases = [
        (
            WorkerConfig,
            {"TANDEM_MODEL": "/m", "TANDEM_TLS_CERT": str(certs / "decode.pem")},
            "set both or neither",
        ),
        (
            WorkerConfig,
            {"TANDEM_MODEL": "/m", "TANDEM_TLS_CA": str(certs / "ca.pem")},
            "TANDEM_TLS_CA: mutual TLS",
        ),
        # an internal service with a certificate but no CA: no peer of its could verify it
        (WorkerConfig, _tls_env(certs, ca=False), "TANDEM_TLS_CA: required"),
        (DraftConfig, _tls_env(certs, ca=False), "TANDEM_TLS_CA: required"),
        (WorkerConfig, {**_tls_env(certs), "TANDEM_TLS_KEY": str(certs / "nope.key")}, "TANDEM_TLS_KEY: "),
        (
            SchedulerConfig,
            {"TANDEM_MODEL": "/m", "TANDEM_API_KEYS_FILE": "/nonexistent"},
            "TANDEM_API_KEYS_FILE",
        ),
    ]
    for cls, env, message in cases:
        with pytest.raises(ConfigError, match=message):
            from_env(cls, env, {"role": "decode"} if cls is WorkerConfig else None)
    # the scheduler may serve public TLS without a CA (internal hops then plaintext, and it says so)
    assert not Tls.from_config(from_env(SchedulerConfig, _tls_env(certs, "scheduler", ca=False))).mutual


def test_a_file_that_is_not_pem_is_a_config_error(tmp_path, certs):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    config = from_env(WorkerConfig, {**_tls_env(certs), "TANDEM_TLS_CA": str(bad)}, {"role": "decode"})
    with pytest.raises(ConfigError, match="TANDEM_TLS_CA: .* is not PEM"):
        Tls.from_config(config)


def test_plaintext_says_so_in_a_warning(caplog):
    with caplog.at_level(logging.INFO):
        PLAINTEXT.log_mode("decode")
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "TLS is OFF" in record.getMessage()
    assert PLAINTEXT.server_credentials(require_client_cert=True) is None
    assert PLAINTEXT.channel_credentials() is None


# -- the development CA ------------------------------------------------------------------------


def test_make_certs_writes_a_ca_and_service_certificates(tmp_path):
    assert certs_main(["--out", str(tmp_path), "--san", "tandem.example"]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in ("scheduler", "prefill", "decode", "draft", "client"):
        cert = x509.load_pem_x509_certificate((tmp_path / f"{name}.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert {name, "localhost", "tandem.example"} <= set(san.get_values_for_type(x509.DNSName))
        assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku)
        assert os.stat(tmp_path / f"{name}.key").st_mode & 0o077 == 0  # owner only
        key = (tmp_path / f"{name}.key").read_bytes()
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        assert isinstance(load_pem_private_key(key, None), ec.EllipticCurvePrivateKey)


# -- API keys ----------------------------------------------------------------------------------


def _bump(path):
    """Make a rewrite visible even on file systems with coarse modification times."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_keys_from_a_file_with_comments_and_rotation(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# clients of team a\n{KEY}\n\n  {KEY}-next  \n")
    keys = ApiKeys(str(path))
    assert keys.authenticate(f"Bearer {KEY}") == key_id(KEY)
    assert keys.authenticate(f"bearer {KEY}-next") == key_id(f"{KEY}-next")  # the scheme is case-insensitive
    for header, message in [
        (None, "missing API key"),
        ("", "missing API key"),
        (KEY, "malformed"),
        (f"Basic {KEY}", "malformed"),
        ("Bearer ", "malformed"),
        (f"Bearer {KEY}x", "invalid API key"),
        ("Bearer # clients of team a", "invalid API key"),  # comments are not keys
    ]:
        with pytest.raises(Unauthenticated, match=message):
            keys.authenticate(header)
    # rotation: the old key removed, a new one added, no restart
    path.write_text(f"{KEY}-next\n{KEY}-newest\n")
    _bump(path)
    with pytest.raises(Unauthenticated):
        keys.authenticate(f"Bearer {KEY}")
    assert keys.authenticate(f"Bearer {KEY}-newest")
    # the file atomically replaced (a Kubernetes secret update): read again
    new = tmp_path / "keys.new"
    new.write_text(f"{KEY}\n")
    os.replace(new, path)
    assert keys.authenticate(f"Bearer {KEY}")
    with pytest.raises(Unauthenticated):
        keys.authenticate(f"Bearer {KEY}-next")


def test_a_missing_keys_file_refuses_every_key(tmp_path, caplog):
    path = tmp_path / "keys"
    path.write_text(f"{KEY}\n")
    keys = ApiKeys(str(path))
    assert keys.authenticate(f"Bearer {KEY}")
    path.unlink()
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            with pytest.raises(Unauthenticated):
                keys.authenticate(f"Bearer {KEY}")
    assert len([r for r in caplog.records if "unreadable" in r.getMessage()]) == 1  # once, not per request
    path.write_bytes(b"\xff\xfe" + KEY.encode())  # not UTF-8: refused, and its bytes not logged
    with caplog.at_level(logging.ERROR), pytest.raises(Unauthenticated):
        keys.authenticate(f"Bearer {KEY}")
    path.write_text(f"{KEY}\n")
    assert keys.authenticate(f"Bearer {KEY}")


def test_keys_are_never_logged(tmp_path, caplog):
    path = tmp_path / "keys"
    path.write_text(f"{KEY}\n")
    with caplog.at_level(logging.DEBUG):
        keys = ApiKeys(str(path), max_concurrency=1)
        kid = keys.authenticate(f"Bearer {KEY}")
        with pytest.raises(Unauthenticated):
            keys.authenticate("Bearer wrong-key-1234567890")
        with keys.slot(kid), pytest.raises(TooManyRequests):
            with keys.slot(kid):
                pass
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert KEY not in text and "wrong-key-1234567890" not in text
    assert key_id("wrong-key-1234567890") in text  # named by its hash id only
    assert len(kid) == 12 and kid not in KEY


def test_per_key_concurrency_limit(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"{KEY}\n{KEY}-b\n")
    keys = ApiKeys(str(path), max_concurrency=2)
    a, b = key_id(KEY), key_id(f"{KEY}-b")
    with keys.slot(a), keys.slot(a):
        with pytest.raises(TooManyRequests, match="TANDEM_API_KEY_MAX_CONCURRENCY=2"):
            with keys.slot(a):
                pass
        with keys.slot(b):  # another key has its own slots
            assert (keys.running(a), keys.running(b)) == (2, 1)
    assert keys.running(a) == 0
    with pytest.raises(RuntimeError):  # a failing call gives its slot back too
        with keys.slot(a):
            raise RuntimeError
    assert keys.running(a) == 0
    unlimited = ApiKeys(str(path), max_concurrency=0)
    with unlimited.slot(a), unlimited.slot(a), unlimited.slot(a):
        assert unlimited.running(a) == 3


# -- collective KV transport -------------------------------------------------------------------


def _other_local_address() -> str | None:
    """An address of this machine that is not loopback (None: it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


def test_the_kv_rendezvous_port_listens_on_its_host_only():
    """torch.distributed's TCPStore listens on every interface by default; the receiver binds it to
    the host it advertises (here loopback), so another interface of the machine refuses it."""
    from shared.kv.collective_receiver import CollectiveKvReceiver

    other = _other_local_address()
    if other is None:
        pytest.skip("this machine has no non-loopback address")
    receiver = CollectiveKvReceiver("127.0.0.1", 0, timeout_s=5)
    try:
        socket.create_connection(("127.0.0.1", receiver.port), timeout=5).close()
        with pytest.raises(OSError):
            socket.create_connection((other, receiver.port), timeout=5).close()
    finally:
        receiver.close()
