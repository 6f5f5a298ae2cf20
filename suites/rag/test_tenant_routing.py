"""Each tenant's host is answered by that tenant's own rag-api, with that tenant's
verified identity: the precondition for every retrieval-isolation test."""

from __future__ import annotations

import pytest

from fixtures.platform import Outcome, user_headers

pytestmark = pytest.mark.standalone_required


def test_tenant_host_is_served_by_tenant_rag_api(platform, tenant):
    res = platform.gateway().request(tenant.host, "/api/whoami",
                                     headers=user_headers(tenant, platform.idp(tenant).token()))
    who = res.expect(Outcome.OK).json()
    assert (who["tenant"], who["tenant_header"], who["claims"]["custom:tenantid"]) == (tenant.name,) * 3


def test_other_tenants_token_is_refused_on_this_host(platform, cross_tenant_pair):
    src, dst = cross_tenant_pair
    token = platform.idp(src).token()
    gw = platform.gateway()
    gw.request(src.host, "/api/whoami", headers=user_headers(src, token)).expect(Outcome.OK)
    # The other tenant's token, with the header claiming this tenant: refused at the edge.
    gw.request(dst.host, "/api/whoami", headers=user_headers(dst, token)).expect(Outcome.RBAC_403)
