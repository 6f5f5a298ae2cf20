"""The TLS probe's own guarantees: a legacy client really offers the old version, and a
served certificate is checked against the root, the host and the validity period."""

from __future__ import annotations

import datetime
import ssl

import pytest

from fixtures import tls_probe
from fixtures.certs import CertificateAuthority


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1.1"])
def test_legacy_client_completes_a_handshake_where_its_version_is_allowed(version):
    with tls_probe.legacy_server(version) as address:
        res = tls_probe.handshake(address, "localhost", context=tls_probe.legacy_context(version))
    assert res.version == version and res.error is None, res


def test_legacy_client_is_refused_by_a_modern_only_server():
    with tls_probe.legacy_server("TLSv1.1") as address:
        res = tls_probe.handshake(address, "localhost", context=tls_probe.legacy_context("TLSv1"))
    assert res.error and res.version is None, res


def test_unknown_legacy_version_is_a_usage_error():
    with pytest.raises(ValueError, match="SSLv3"):
        tls_probe.legacy_context("SSLv3")


@pytest.fixture(scope="module")
def root():
    return CertificateAuthority.create_root("probe root")


def test_good_certificate_has_no_problems(root):
    cert = root.issue_server(["*.example.com"]).certificate
    assert tls_probe.chain_problems(cert, root.cert_pem, "tenanta.example.com") == []


@pytest.mark.parametrize("host, issuer, problem", [
    ("deep.tenanta.example.com", "root", "no DNS SAN matches"),   # a wildcard is one label only
    ("tenanta.example.org", "root", "no DNS SAN matches"),
    ("tenanta.example.com", "other", "not the platform root"),
])
def test_certificate_problems_are_named(root, host, issuer, problem):
    signer = root if issuer == "root" else CertificateAuthority.create_root("other root")
    cert = signer.issue_server(["*.example.com"]).certificate
    assert any(problem in p for p in tls_probe.chain_problems(cert, root.cert_pem, host))


def test_expired_certificate_is_named(root):
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
    cert = root.issue_server(["tenanta.example.com"], not_before=past,
                             not_after=past + datetime.timedelta(days=1)).certificate
    assert any("not valid now" in p for p in tls_probe.chain_problems(cert, root.cert_pem, "tenanta.example.com"))


def test_refused_handshake_reports_the_alert():
    res = tls_probe.Handshake("x", error="SSLError: [SSL: TLSV1_ALERT_PROTOCOL_VERSION] tlsv1 alert protocol version")
    assert res.alert == "protocol_version"
    assert tls_probe.Handshake("x", error="ConnectionResetError").alert is None
    assert isinstance(tls_probe.any_certificate_context(), ssl.SSLContext)
