"""What the isolation suite sends, to whom, and how it reads where a denial came from.

Targets are the tenant's services by their mesh name; callers are the platform's own
workloads, the ingress gateway, and callers outside the mesh. Service accounts carry the
app's name (platform/base/service-accounts.yaml), so a workload's SPIFFE id follows from
its tenant and app.
"""

from __future__ import annotations

from typing import Mapping

from fixtures.platform import CallResult, MissingCapability, Outcome, Tenant, user_headers

TRUST_DOMAIN = "cluster.local"
GATEWAY_IDENTITY = f"spiffe://{TRUST_DOMAIN}/ns/istio-system/sa/istio-ingressgateway"
APPS = ("app-ui", "rag-api")
PORTS = {"rag-api": 8080, "app-ui": 8501}
# A path each app answers with 200 once the request is let through; rag-api's echoes the
# caller's identity, app-ui (Streamlit) has no such endpoint.
MESH_PATH = {"rag-api": "/whoami", "app-ui": "/_stcore/health"}
GATEWAY_PATH = {"rag-api": "/api/whoami", "app-ui": "/_stcore/health"}
# Denials the suite accepts as "refused by the platform" when a row does not pin one.
DENIED = frozenset({Outcome.TLS_REFUSED, Outcome.AUTHN_401, Outcome.AUTHN_403, Outcome.RBAC_403, Outcome.RESET})


def service(tenant: Tenant, app: str) -> str:
    return f"{app}.{tenant.namespace}.svc.cluster.local:{PORTS[app]}"


def spiffe(tenant: Tenant | str, app: str) -> str:
    ns = tenant.namespace if isinstance(tenant, Tenant) else tenant
    return f"spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{app}"


def per_tenant_ca(platform) -> bool:
    """Whether each tenant's workloads are signed by a certificate authority of the tenant's
    own (capability "per-tenant-ca"). Where not, one CA (istiod's on a cluster) signs every
    workload, every handshake between tenants succeeds, and only the AuthorizationPolicies
    tell the tenants apart."""
    try:
        platform.requires("per-tenant-ca")
    except MissingCapability:
        return False
    return True


def other_app(app: str) -> str:
    """The tenant's other workload: the positive control for calls to ``app``."""
    return next(a for a in APPS if a != app)


_issued: dict[tuple, str] = {}


def issued(platform, tenant: Tenant, name: str = "alice", kind: str = "id") -> str:
    """A real token of ``name`` from ``tenant``'s pool, signed in once per run (Cognito's
    tokens live an hour; a run takes minutes)."""
    key = (id(platform), tenant.name, name, kind)
    if key not in _issued:
        _issued[key] = platform.idp(tenant).token(name, kind=kind)
    return _issued[key]


def user(platform, tenant: Tenant, name: str = "alice", *, header: str | None = None) -> dict[str, str]:
    """A signed-in user's headers: ``name``'s id token from ``tenant``'s pool; the tenant
    header names ``header`` (default: that tenant)."""
    headers = user_headers(tenant, issued(platform, tenant, name))
    if header is not None:
        headers["x-auth-request-tenantid"] = header
    return headers


def decided_at(res: CallResult) -> str:
    """"workload" when the answer came from behind the gateway (Envoy's router adds
    x-envoy-upstream-service-time to every upstream response), else "gateway"."""
    return "workload" if "x-envoy-upstream-service-time" in res.headers else "gateway"


def expect_at(res: CallResult, outcome: Outcome, at: str) -> CallResult:
    """``res`` ended with ``outcome``, decided at the ``gateway`` or the ``workload``."""
    __tracebackhide__ = True
    res.expect(outcome)
    if decided_at(res) != at:
        raise AssertionError(f"expected {outcome} decided at the {at}, but the {decided_at(res)} "
                             f"decided it:\n{res.describe()}")
    return res


def expect_caller_seen(res: CallResult, spiffe_id: str) -> dict:
    """An allowed call to rag-api: the workload saw the caller's SPIFFE id in
    x-forwarded-client-cert, so the hop was mutual TLS with that identity."""
    __tracebackhide__ = True
    res.expect(Outcome.OK)
    who = res.json()
    seen = (who.get("peer") or {}).get("spiffe_id")
    if seen != spiffe_id:
        raise AssertionError(f"the workload saw peer {seen!r}, expected {spiffe_id!r} (mTLS identity):\n"
                             f"{res.describe()}")
    return who


def expect_denied(res: CallResult, kinds: frozenset[Outcome] = DENIED) -> CallResult:
    __tracebackhide__ = True
    if res.outcome not in kinds:
        raise AssertionError(f"expected a denial ({', '.join(sorted(map(str, kinds)))}), got {res.outcome}:\n"
                             f"{res.describe()}")
    return res


def via_gateway(platform, tenant: Tenant, headers: Mapping[str, str], path: str = "/api/whoami",
                **kwargs) -> CallResult:
    return platform.gateway().request(tenant.host, path, headers=headers, **kwargs)
