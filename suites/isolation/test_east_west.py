"""East-west isolation, first cut: every tenant's app-ui calls every tenant's rag-api
through its own sidecar. Same tenant is allowed (and proves mTLS: the callee sees the
caller's SPIFFE identity); another tenant is refused at the TLS handshake because the
callee does not trust the caller's CA. A caller with no mesh identity is refused too."""

from __future__ import annotations

import pytest

from fixtures.platform import Outcome, user_headers

pytestmark = pytest.mark.standalone_required


def _target(tenant) -> str:
    return f"rag-api.{tenant.namespace}.svc.cluster.local:8080"


def test_app_ui_to_rag_api(platform, tenant_pair):
    src, dst = tenant_pair
    # A user of the destination tenant, so only the caller's identity differs.
    headers = user_headers(dst, platform.idp(dst).token())
    # Positive control first: the destination's own app-ui reaches it.
    own = platform.workload(dst, "app-ui").call(_target(dst), "/whoami", headers=headers).expect(Outcome.OK)
    assert own.json()["peer"]["spiffe_id"] == f"spiffe://cluster.local/ns/{dst.namespace}/sa/app-ui"
    res = platform.workload(src, "app-ui").call(_target(dst), "/whoami", headers=headers)
    if src == dst:
        res.expect(Outcome.OK)
    else:
        res.expect(Outcome.TLS_REFUSED)
        assert "UNKNOWN_CA" in res.headers.get("x-mesh-upstream-failure", ""), res.describe()


def test_caller_without_mesh_identity_is_refused(platform, tenant):
    headers = user_headers(tenant, platform.idp(tenant).token())
    platform.workload(tenant, "app-ui").call(_target(tenant), "/whoami", headers=headers).expect(Outcome.OK)
    platform.outside().call(_target(tenant), "/whoami", headers=headers).expect(Outcome.TLS_REFUSED)
