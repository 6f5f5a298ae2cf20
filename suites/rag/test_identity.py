"""rag-api checks the tenant itself: with the mesh's header or claim check switched off, a
request naming another tenant still gets no answer (defense in depth)."""

from __future__ import annotations

import json

import pytest

from fixtures.platform import Outcome, user_headers
from suites.rag.conftest import new_session

pytestmark = [pytest.mark.standalone_required, pytest.mark.chaos]


def _ask(platform, host: str, headers: dict) -> object:
    body = json.dumps({"question": "What are your support hours?", "session_id": new_session()}).encode()
    return platform.gateway().request(host, "/api/rag", method="POST", body=body, timeout=30,
                                      headers={**headers, "content-type": "application/json"})


def test_header_naming_another_tenant_is_refused_by_rag_api(platform, cross_tenant_pair, requires):
    requires("faults")
    src, dst = cross_tenant_pair
    headers = user_headers(src, platform.idp(src).token())
    _ask(platform, src.host, headers).expect(Outcome.OK)  # control
    lying = {**headers, "x-auth-request-tenantid": dst.name}
    # With the mesh's check in place the gateway refuses first.
    _ask(platform, src.host, lying).expect(Outcome.RBAC_403)
    with platform.fault("header-check-off"):
        res = _ask(platform, src.host, lying)
    assert res.status == 403 and "rbac" not in res.text.lower(), res.describe()
    assert "x-auth-request-tenantid" in res.json()["detail"], res.describe()


def test_claim_naming_another_tenant_is_refused_by_rag_api(platform, tenant, requires):
    requires("faults")
    # mallory is in this tenant's pool, but her custom:tenantid names another tenant.
    headers = user_headers(tenant, platform.idp(tenant).token("mallory"))
    _ask(platform, tenant.host, headers).expect(Outcome.RBAC_403)
    with platform.fault("jwt-claim-check-off"):
        res = _ask(platform, tenant.host, headers)
    assert res.status == 403 and "rbac" not in res.text.lower(), res.describe()
    assert "custom:tenantid" in res.json()["detail"], res.describe()
