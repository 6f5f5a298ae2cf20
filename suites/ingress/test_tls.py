"""TLS at the shared gateway: every tenant host is served a certificate that chains to
the platform's root and names the host; anything that is not modern TLS for a host the
Gateway serves is refused before a request can be made.

Clients connect as the load balancer's would: with the PROXY header the client writes in
its place (``diagnose.lb_header``), or none where the load balancer writes it itself."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import pytest

from fixtures import diagnose, tls_probe
from fixtures.client import tls_context
from fixtures.platform import user_headers

pytestmark = pytest.mark.standalone_required


def _control(platform, tenant) -> diagnose.Exchange:
    """A signed-in user of ``tenant``, through the load balancer: must get 200."""
    gw = platform.gateway()
    return diagnose.exchange(gw, tenant.host, preamble=diagnose.lb_header(gw),
                             headers=user_headers(tenant, platform.idp(tenant).token()),
                             sent=f"control: {tenant.name}'s user via the load balancer").expect_http(200)


def test_tenant_host_certificate_chains_to_platform_root_and_names_the_host(platform, tenant):
    gw = platform.gateway()
    verified = tls_probe.handshake(gw.address, tenant.host, context=tls_context(gw.ca_bundle),
                                   preamble=diagnose.lb_header(gw))
    assert verified.error is None, f"a client trusting only the platform root: {verified}"
    problems = tls_probe.chain_problems(verified.certificate, gw.ca_bundle.read_bytes(), tenant.host)
    assert not problems, f"{verified}: " + "; ".join(problems)
    _control(platform, tenant)


@dataclass(frozen=True)
class Refused:
    """A client the gateway must turn away during or before the TLS handshake."""

    name: str
    sni: str | None = None        # None: the tenant's host; "" : no SNI at all
    then: str = "tls"

    def __str__(self) -> str:
        return f"{self.name} is refused before any HTTP"


REFUSED = [
    Refused("SNI of a host outside the Gateway's hosts", sni="{tenant}.example.org"),
    Refused("no SNI at all", sni=""),
    Refused("plaintext HTTP on the TLS port", then="plaintext"),
]


@pytest.mark.parametrize("case", REFUSED, ids=str)
def test_client_that_is_not_tls_for_a_served_host_is_refused(platform, tenant, case, gateway_counters):
    gw = platform.gateway()
    _control(platform, tenant)
    sni = case.sni.format(tenant=tenant.name) if case.sni else case.sni
    before = gateway_counters()
    res = diagnose.exchange(gw, tenant.host, preamble=diagnose.lb_header(gw), then=case.then,
                            sni=sni, sent=case.name,
                            context=tls_probe.any_certificate_context() if case.sni is not None else None)
    res.expect_closed()
    moved = gateway_counters() - before
    assert (moved.tls_handshakes, moved.http_requests) == (0, 0), f"{res}; {moved.summary()}"
    _control(platform, tenant)


def test_host_under_the_wildcard_without_a_tenant_is_not_routed(platform, tenant, gateway_counters):
    """The wildcard certificate covers any *.example.com name; a name no tenant owns gets
    TLS but never reaches a workload."""
    gw = platform.gateway()
    _control(platform, tenant)
    before = gateway_counters()
    stray = f"not-{tenant.name}.example.com"
    res = diagnose.exchange(gw, stray, preamble=diagnose.lb_header(gw),
                            headers=user_headers(tenant, platform.idp(tenant).token()), sent=f"Host {stray}")
    res.expect_http()
    assert res.status in (403, 404), f"{res}: {res.body[:200]!r}"
    assert (gateway_counters() - before).upstream_requests == 0, res


@dataclass(frozen=True)
class Version:
    version: str
    accepted: bool

    def __str__(self) -> str:
        return f"{self.version} is {'accepted' if self.accepted else 'refused with a protocol_version alert'}"


VERSIONS = [Version("TLSv1", False), Version("TLSv1.1", False), Version("TLSv1.2", True), Version("TLSv1.3", True)]


@pytest.mark.parametrize("case", VERSIONS, ids=str)
def test_only_tls_1_2_and_later_are_accepted(platform, tenant, case):
    gw = platform.gateway()
    _control(platform, tenant)
    if case.accepted:
        member = getattr(ssl.TLSVersion, case.version.replace(".", "_"))
        ctx = tls_context(gw.ca_bundle, minimum=member, maximum=member)
    else:
        ctx = tls_probe.legacy_context(case.version)
        # The client really offers the old version: a server that allows it completes the handshake.
        with tls_probe.legacy_server(case.version) as address:
            offered = tls_probe.handshake(address, "localhost", context=ctx)
        assert offered.version == case.version, f"control server accepting {case.version}: {offered}"
    res = tls_probe.handshake(gw.address, tenant.host, context=ctx, preamble=diagnose.lb_header(gw))
    if case.accepted:
        assert res.version == case.version, res
    else:
        assert res.alert == "protocol_version", res
    _control(platform, tenant)
