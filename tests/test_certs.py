"""Certificate fixtures: what they contain, what verifies, and a real mutual-TLS handshake."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fixtures.certs import (
    CertificateAuthority,
    IssuedCert,
    Validity,
    forge,
    parse_spiffe_id,
    spiffe_id,
)

TENANT_A = spiffe_id("cluster.local", "tenant-a", "rag-api")
TENANT_B = spiffe_id("cluster.local", "tenant-b", "rag-api")
TIMEOUT = 5.0


@pytest.fixture(scope="module")
def root() -> CertificateAuthority:
    """The mesh root every genuine certificate chains to."""
    return CertificateAuthority.create_root("mesh root A")


@pytest.fixture(scope="module")
def other_root() -> CertificateAuthority:
    """An unrelated root (another cluster, or an attacker)."""
    return CertificateAuthority.create_root("mesh root B")


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A private temporary directory, removed after the test."""
    with tempfile.TemporaryDirectory(prefix="certs-") as directory:
        yield Path(directory)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _client_verifier(ca: CertificateAuthority) -> verification.ClientVerifier:
    return verification.PolicyBuilder().store(verification.Store([ca.certificate])).time(_now()).build_client_verifier()


def _server_verifier(ca: CertificateAuthority, name: str) -> verification.ServerVerifier:
    builder = verification.PolicyBuilder().store(verification.Store([ca.certificate])).time(_now())
    return builder.build_server_verifier(verification.DNSName(name))


def _ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension:
    return cert.extensions.get_extension_for_class(kind)


# --- contents ---------------------------------------------------------------------------------


def test_root_is_a_self_signed_ca(root):
    cert = root.certificate
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "mesh root A"
    constraints = _ext(cert, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = _ext(cert, x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert _ext(cert, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    cert.verify_directly_issued_by(cert)
    assert x509.load_pem_x509_certificate(root.cert_pem) == cert


def test_workload_cert_is_an_istio_style_svid(root):
    issued = root.issue_workload(TENANT_A)
    cert = issued.certificate
    assert cert.subject == x509.Name([])
    san = _ext(cert, x509.SubjectAlternativeName)
    assert san.critical  # required when the subject is empty
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [TENANT_A]
    assert san.value.get_values_for_type(x509.DNSName) == []
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    constraints = _ext(cert, x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    aki = _ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == _ext(root.certificate, x509.SubjectKeyIdentifier).value.digest
    assert cert.issuer == root.certificate.subject


def test_server_cert_names_hosts_and_serves_only(root):
    issued = root.issue_server(["gateway.tenant-a.example", "localhost"], ip_addresses=["127.0.0.1"])
    cert = issued.certificate
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gateway.tenant-a.example"
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gateway.tenant-a.example", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not _ext(cert, x509.BasicConstraints).value.ca


def test_chain_is_leaf_then_issuing_ca(root):
    issued = root.issue_workload(TENANT_A)
    assert x509.load_pem_x509_certificates(issued.chain_pem) == [issued.certificate, root.certificate]
    assert issued.chain_pem == issued.cert_pem + root.cert_pem


def test_private_key_matches_certificate(root):
    issued = root.issue_workload(TENANT_A)
    key = serialization.load_pem_private_key(issued.key_pem, password=None)
    assert key.public_key() == issued.certificate.public_key()


# --- verification -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Verify:
    leaf: str
    build: Callable[[CertificateAuthority, CertificateAuthority], IssuedCert]
    error: str | None = None  # None: must verify under root A

    def __str__(self) -> str:
        outcome = "accepted" if self.error is None else f"rejected ({self.error})"
        return f"{self.leaf} is {outcome} under root A"


VERIFY_CASES = [
    Verify("workload from root A", lambda a, b: a.issue_workload(TENANT_A)),
    Verify("workload from root B", lambda a, b: b.issue_workload(TENANT_A), "candidates exhausted"),
    Verify("workload naming root A signed with B's key", lambda a, b: forge(a, b, TENANT_A), "signature does not match"),
    Verify("expired workload", lambda a, b: a.issue_workload(TENANT_A, validity=Validity.expired()),
           "not valid at validation time"),
    Verify("not yet valid workload", lambda a, b: a.issue_workload(TENANT_A, validity=Validity.not_yet_valid()),
           "not valid at validation time"),
    Verify("server cert as a client", lambda a, b: a.issue_server(["localhost"]), "EKU"),
]


@pytest.mark.parametrize("case", VERIFY_CASES, ids=str)
def test_client_verification(root, other_root, case):
    leaf = case.build(root, other_root).certificate
    verifier = _client_verifier(root)
    if case.error is None:
        verified = verifier.verify(leaf, [])
        assert verified.subjects == [x509.UniformResourceIdentifier(TENANT_A)]
        assert verified.chain == [leaf, root.certificate]
    else:
        with pytest.raises(verification.VerificationError, match=case.error):
            verifier.verify(leaf, [])


def test_server_cert_verifies_for_its_names_only(root, other_root):
    issued = root.issue_server(["localhost"])
    assert _server_verifier(root, "localhost").verify(issued.certificate, []) == [issued.certificate, root.certificate]
    with pytest.raises(verification.VerificationError):
        _server_verifier(root, "gateway.example").verify(issued.certificate, [])
    with pytest.raises(verification.VerificationError):
        _server_verifier(other_root, "localhost").verify(issued.certificate, [])


def test_forged_cert_fails_only_on_the_signature(root, other_root):
    genuine, forged = root.issue_workload(TENANT_A), forge(root, other_root, TENANT_A)
    assert forged.certificate.issuer == genuine.certificate.issuer
    assert _ext(forged.certificate, x509.AuthorityKeyIdentifier) == _ext(genuine.certificate, x509.AuthorityKeyIdentifier)
    assert _ext(forged.certificate, x509.SubjectAlternativeName) == _ext(genuine.certificate, x509.SubjectAlternativeName)
    genuine.certificate.verify_directly_issued_by(root.certificate)
    with pytest.raises(InvalidSignature):
        forged.certificate.verify_directly_issued_by(root.certificate)


# --- validity windows -------------------------------------------------------------------------


def test_default_validity_covers_now(root):
    cert = root.issue_workload(TENANT_A).certificate
    assert cert.not_valid_before_utc <= _now() < cert.not_valid_after_utc


def test_expired_and_not_yet_valid_windows(root):
    expired = root.issue_workload(TENANT_A, validity=Validity.expired()).certificate
    future = root.issue_server(["localhost"], validity=Validity.not_yet_valid()).certificate
    assert expired.not_valid_after_utc < _now()
    assert future.not_valid_before_utc > _now()


def test_explicit_window_is_used_as_given(root):
    start = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    end = datetime.datetime(2030, 1, 2, tzinfo=datetime.timezone.utc)
    cert = root.issue_workload(TENANT_A, not_before=start, not_after=end).certificate
    assert (cert.not_valid_before_utc, cert.not_valid_after_utc) == (start, end)
    old_root = CertificateAuthority.create_root("old", validity=Validity.expired())
    assert old_root.certificate.not_valid_after_utc < _now()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"validity": Validity.expired(), "not_after": _now()}, "not both", id="validity and not_after"),
        pytest.param({"not_before": _now(), "not_after": _now() - datetime.timedelta(1)}, "must be after",
                     id="window ends before it starts"),
        pytest.param({"not_before": datetime.datetime(2030, 1, 1)}, "timezone-aware", id="naive datetime"),
    ],
)
def test_bad_validity_is_refused(root, kwargs, message):
    with pytest.raises(ValueError, match=message):
        root.issue_workload(TENANT_A, **kwargs)


# --- identities and names ---------------------------------------------------------------------


def test_spiffe_id_helper_builds_and_parses():
    assert TENANT_A == "spiffe://cluster.local/ns/tenant-a/sa/rag-api"
    assert parse_spiffe_id(TENANT_A) == ("cluster.local", "tenant-a", "rag-api")


@pytest.mark.parametrize(
    "bad",
    [
        "cluster.local/ns/a/sa/b",
        "http://cluster.local/ns/a/sa/b",
        "spiffe://cluster.local/ns/a",
        "spiffe://cluster.local/ns/a/sa/b/extra",
        "spiffe://cluster.local/ns/a/sa/b/",
        "spiffe://cluster.local/ns//sa/b",
        "spiffe://cluster.local/namespace/a/sa/b",
        "spiffe://Cluster.Local/ns/a/sa/b",
        "spiffe://cluster.local:8080/ns/a/sa/b",
        "spiffe:///ns/a/sa/b",
        "spiffe://cluster.local/ns/../sa/b",
        "spiffe://cluster.local/ns/a b/sa/b",
    ],
)
def test_bad_spiffe_id_is_refused(root, bad):
    with pytest.raises(ValueError, match="invalid SPIFFE ID"):
        root.issue_workload(bad)


def test_spiffe_id_helper_validates_its_parts():
    with pytest.raises(ValueError, match="trust domain"):
        spiffe_id("Cluster.Local", "a", "b")
    with pytest.raises(ValueError, match="namespace"):
        spiffe_id("cluster.local", "a/b", "c")


@pytest.mark.parametrize(
    ("names", "message"),
    [
        pytest.param("localhost", "list of names", id="a string, not a list"),
        pytest.param([], "at least one", id="no names"),
        pytest.param(["bad_name.example"], "invalid DNS name", id="underscore"),
        pytest.param(["-lead.example"], "invalid DNS name", id="leading dash"),
        pytest.param(["*"], "wildcard", id="bare wildcard"),
        pytest.param(["a.*.example"], "invalid DNS name", id="inner wildcard"),
    ],
)
def test_bad_server_names_are_refused(root, names, message):
    with pytest.raises(ValueError, match=message):
        root.issue_server(names)


def test_wildcard_server_name_is_allowed(root):
    cert = root.issue_server(["*.tenant-a.example"]).certificate
    assert _ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == ["*.tenant-a.example"]


# --- files ------------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_issued_cert_files_and_key_permissions(root, scratch):
    issued = root.issue_workload(TENANT_A)
    files = issued.write(scratch, "tenant-a")
    assert (files.cert.read_bytes(), files.key.read_bytes(), files.chain.read_bytes()) == (
        issued.cert_pem,
        issued.key_pem,
        issued.chain_pem,
    )
    assert _mode(files.key) == 0o600
    assert _mode(files.cert) & 0o600 == 0o600
    assert _mode(files.cert) & 0o022 == 0


def test_ca_files_and_key_permissions(root, scratch):
    files = root.write(scratch, "root")
    assert files.cert.read_bytes() == root.cert_pem
    assert files.key.read_bytes() == root.key_pem
    assert _mode(files.key) == 0o600


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name file descriptors")
def test_key_bytes_are_never_written_to_a_readable_file(root, scratch, monkeypatch):
    stale = scratch / "tenant-a.key"
    stale.write_bytes(b"old")
    stale.chmod(0o644)  # a leftover, world-readable key file is overwritten
    modes_while_writing: dict[str, set[int]] = {}
    real_write = os.write

    def spy(fd: int, data: bytes) -> int:
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        modes_while_writing.setdefault(name, set()).add(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    files = root.issue_workload(TENANT_A).write(scratch, "tenant-a")
    root.write(scratch, "root")
    monkeypatch.undo()
    assert files.key == stale
    assert modes_while_writing["tenant-a.key"] == {0o600}
    assert modes_while_writing["root.key"] == {0o600}
    assert _mode(files.key) == 0o600


# --- a real mutual-TLS handshake --------------------------------------------------------------


@dataclass
class ServerSide:
    error: BaseException | None = None
    peer_uris: list[str] | None = None


def _serve_once(listener: socket.socket, context: ssl.SSLContext, side: ServerSide) -> None:
    try:
        conn, _ = listener.accept()
    except OSError as error:
        side.error = error
        return
    with conn:
        conn.settimeout(TIMEOUT)
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                peer = tls.getpeercert()
                side.peer_uris = [value for kind, value in peer.get("subjectAltName", ()) if kind == "URI"]
                tls.sendall(tls.recv(64))
        except OSError as error:  # ssl.SSLError is an OSError
            side.error = error


def _mtls_exchange(scratch: Path, server_ca: CertificateAuthority, client: IssuedCert) -> tuple[ServerSide, bytes | BaseException]:
    """One TLS connection on 127.0.0.1: the server trusts only ``server_ca`` and requires a
    client certificate. Returns what the server saw and the client's echo (or error)."""
    server_files = server_ca.issue_server(["localhost"]).write(scratch, "server")
    client_files = client.write(scratch, "client")

    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.minimum_version = ssl.TLSVersion.TLSv1_2
    server_context.verify_mode = ssl.CERT_REQUIRED
    server_context.verify_flags |= ssl.VERIFY_X509_STRICT
    server_context.load_verify_locations(cadata=server_ca.cert_pem.decode())
    server_context.load_cert_chain(server_files.chain, server_files.key)

    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.verify_flags |= ssl.VERIFY_X509_STRICT
    client_context.load_verify_locations(cadata=server_ca.cert_pem.decode())
    client_context.load_cert_chain(client_files.chain, client_files.key)

    side = ServerSide()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        server = threading.Thread(target=_serve_once, args=(listener, server_context, side), name="mtls-server")
        server.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as raw:
                with client_context.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"ping")
                    result: bytes | BaseException = tls.recv(64)
        except OSError as error:
            result = error
        finally:
            server.join(TIMEOUT * 2)
    assert not server.is_alive(), "TLS server thread did not finish"
    return side, result


@dataclass(frozen=True)
class Handshake:
    client: str
    build: Callable[[CertificateAuthority, CertificateAuthority], IssuedCert]
    accepted: bool
    server_error: str = ""

    def __str__(self) -> str:
        return f"{self.client} -> server of root A is {'accepted' if self.accepted else 'a handshake failure'}"


HANDSHAKES = [
    Handshake("workload cert from root A", lambda a, b: a.issue_workload(TENANT_A), True),
    Handshake("workload cert from root B", lambda a, b: b.issue_workload(TENANT_B), False,
              "self-signed certificate in certificate chain"),
    Handshake("forged cert naming root A", lambda a, b: forge(a, b, TENANT_B), False, "certificate signature failure"),
    Handshake("expired cert from root A", lambda a, b: a.issue_workload(TENANT_A, validity=Validity.expired()), False,
              "certificate has expired"),
    Handshake("server-only cert from root A", lambda a, b: a.issue_server(["localhost"]), False,
              "unsuitable certificate purpose"),
]


@pytest.mark.parametrize("case", HANDSHAKES, ids=str)
def test_mutual_tls_handshake(root, other_root, scratch, case):
    side, result = _mtls_exchange(scratch, root, case.build(root, other_root))
    if case.accepted:
        assert side.error is None, f"server failed: {side.error!r}"
        assert result == b"ping"
        assert side.peer_uris == [TENANT_A]
    else:
        assert isinstance(side.error, ssl.SSLError), f"server saw {side.error!r}, expected a handshake failure"
        assert case.server_error in str(side.error)
        # TLS 1.3 clients learn of the rejection on their first read: an alert or a closed socket.
        assert isinstance(result, OSError) or result == b"", f"client read {result!r} after rejection"
