"""The whole request path, end to end: a tenant's user, through the load balancer's PROXY
header and TLS at the shared gateway, to the tenant's rag-api behind its sidecar."""

from __future__ import annotations

import pytest

from fixtures.platform import Outcome, user_headers

pytestmark = pytest.mark.standalone_required

GATEWAY_IDENTITY = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway"
CLIENT = ("203.0.113.7", 41234)  # TEST-NET-3: never a real peer, and never loopback


def test_gateway_expects_proxy_protocol(platform):
    # The platform enables PROXY protocol on the gateway; the rest of this module relies on it.
    assert platform.gateway().expects_proxy_protocol


def test_user_reaches_own_tenant_through_proxy_v2_and_tls(platform, tenant):
    token = platform.idp(tenant).token()
    res = platform.gateway().request(tenant.host, "/api/whoami", headers=user_headers(tenant, token),
                                     client_address=CLIENT).expect(Outcome.OK)
    who = res.json()
    assert who["tenant"] == tenant.name, res.describe()
    # mTLS between gateway and sidecar: the workload saw the gateway's SPIFFE identity.
    assert who["peer"]["spiffe_id"] == GATEWAY_IDENTITY, res.describe()
    # The verified token reached the app, and it is this tenant's.
    assert who["claims"]["iss"] == tenant.issuer
    assert who["claims"]["custom:tenantid"] == tenant.name


def test_client_address_comes_from_the_proxy_header(platform, requires, tenant):
    # Only where the suite's own client writes the PROXY header (behind a real NLB the
    # header carries the NLB's view of this machine, which the suite cannot choose).
    requires("proxy-protocol")
    res = platform.gateway().request(tenant.host, "/api/whoami", client_address=CLIENT,
                                     headers=user_headers(tenant, platform.idp(tenant).token())).expect(Outcome.OK)
    who = res.json()
    # The address the gateway recorded is the one in the PROXY header, not loopback.
    assert who["client_address"] == CLIENT[0], res.describe()
    assert who["external_address"] == CLIENT[0], res.describe()


def test_request_without_token_is_refused_after_positive_control(platform):
    tenant = platform.tenants[0]
    token = platform.idp(tenant).token()
    gw = platform.gateway()
    gw.request(tenant.host, "/api/whoami", headers=user_headers(tenant, token)).expect(Outcome.OK)
    gw.request(tenant.host, "/api/whoami").expect(Outcome.RBAC_403)
