"""The call matrix: every caller to every tenant service, expectations from one predicate.

Callers: each tenant's rag-api and app-ui (through their own sidecars), the ingress
gateway, and a process outside the mesh (TLS without a client certificate, and plaintext).
Targets: each tenant's rag-api and app-ui services. Expected: a tenant's own workloads and
the gateway are allowed; another tenant's workloads are refused at the TLS handshake (the
target trusts only its own CA and the mesh root; by AuthorizationPolicy where one CA signs
every workload); the outside caller is refused by STRICT
mTLS (handshake without a certificate, reset for plaintext). Every call carries a signed-in
user of the *target* tenant, so only the caller's identity differs between rows. Each row
first runs a positive control to the same target from the target's own tenant, and an
allowed call to rag-api proves mTLS: the workload saw the caller's SPIFFE id.

With N tenants the matrix has 4N² + 2N + 4N rows (N=2: 28).
"""

from __future__ import annotations

import pytest

from fixtures.platform import Outcome
from fixtures.report import record
from suites.isolation.probes import (APPS, GATEWAY_IDENTITY, GATEWAY_PATH, MESH_PATH, expect_caller_seen,
                                     other_app, per_tenant_ca, service, spiffe, user, via_gateway)

pytestmark = pytest.mark.standalone_required

HOPS = [(src, dst) for src in APPS for dst in APPS]


def expected(platform, src_tenant, dst_tenant) -> Outcome:
    """The one predicate of the east-west matrix. Where each tenant has a certificate
    authority of its own (capability "per-tenant-ca"), another tenant is refused at the
    handshake; where one CA signs every workload (istiod's on a cluster), the refusal comes
    from the AuthorizationPolicy."""
    if src_tenant == dst_tenant:
        return Outcome.OK
    return Outcome.TLS_REFUSED if per_tenant_ca(platform) else Outcome.RBAC_403


def positive_control(platform, tenant, app: str, headers: dict):
    """The target's own tenant reaches it, through the sidecar of its other workload."""
    __tracebackhide__ = True
    res = platform.workload(tenant, other_app(app)).call(service(tenant, app), MESH_PATH[app], headers=headers)
    res.expect(Outcome.OK)
    if app == "rag-api":
        expect_caller_seen(res, spiffe(tenant, other_app(app)))
    return res


@pytest.mark.parametrize("hop", HOPS, ids=[f"{s} calls {d}" for s, d in HOPS])
def test_workload_to_workload(platform, tenant_pair, hop, request):
    src, dst = tenant_pair
    src_app, dst_app = hop
    headers = user(platform, dst)
    positive_control(platform, dst, dst_app, headers)
    res = platform.workload(src, src_app).call(service(dst, dst_app), MESH_PATH[dst_app], headers=headers)
    want = expected(platform, src, dst)
    record(request.node, "reachability", caller=f"{src}/{src_app}", target=f"{dst}/{dst_app}", expected=want,
           result=res)
    res.expect(want)
    if want is Outcome.OK and dst_app == "rag-api":
        expect_caller_seen(res, spiffe(src, src_app))
    if want is Outcome.TLS_REFUSED:
        # the target refused the caller's certificate authority, not something else
        assert "UNKNOWN_CA" in res.headers.get("x-mesh-upstream-failure", ""), res.describe()


@pytest.mark.parametrize("app", APPS, ids=[f"gateway calls {a}" for a in APPS])
def test_gateway_to_workload(platform, tenant, app, request):
    res = via_gateway(platform, tenant, user(platform, tenant), GATEWAY_PATH[app])
    record(request.node, "reachability", caller="gateway", target=f"{tenant}/{app}", expected=Outcome.OK, result=res)
    res.expect(Outcome.OK)
    if app == "rag-api":
        who = expect_caller_seen(res, GATEWAY_IDENTITY)
        assert who["tenant"] == tenant.name, res.describe()


OUTSIDE = [(False, Outcome.TLS_REFUSED), (True, Outcome.RESET)]


@pytest.mark.parametrize("app", APPS, ids=[f"to {a}" for a in APPS])
@pytest.mark.parametrize("plaintext,outcome", OUTSIDE,
                         ids=["outside over TLS without a client certificate is refused at the handshake",
                              "outside in plaintext is reset (no plaintext listener under STRICT mTLS)"])
def test_caller_without_mesh_identity_is_refused(platform, tenant, app, plaintext, outcome, request):
    headers = user(platform, tenant)
    positive_control(platform, tenant, app, headers)
    res = platform.outside(plaintext=plaintext).call(service(tenant, app), MESH_PATH[app], headers=headers)
    record(request.node, "reachability", caller="outside-plaintext" if plaintext else "outside-tls",
           target=f"{tenant}/{app}", expected=outcome, result=res)
    res.expect(outcome)
