"""Configuration drift: every place the platform names a tenant's Cognito pool (tenant.yaml,
RequestAuthentications, AuthorizationPolicy issuer conditions, oauth2-proxy values) matches
the pool as AWS describes it. A stale issuer is reported with the tenant, the value the pool
implies and the value configured."""

from __future__ import annotations

import pytest

from fixtures import drift

pytestmark = pytest.mark.standalone_required


def test_configuration_matches_the_tenants_cognito_pool(platform, tenant):
    found = drift.check(platform, tenant)
    assert not found, "configuration drift:\n" + "\n".join(map(str, found))


def test_stale_issuer_is_reported_with_tenant_expected_and_actual(platform, tenant):
    assert drift.check(platform, tenant) == []  # positive control: the deployed manifests match
    docs = platform.manifests()
    stale = tenant.issuer.rsplit("/", 1)[0] + "/us-east-1_Stale0000"
    (ra,) = [d for d in docs if d["kind"] == "RequestAuthentication" and d["metadata"]["namespace"] == tenant.namespace]
    ra["spec"]["jwtRules"][0]["issuer"] = stale
    found = drift.check(platform, tenant, docs=docs)
    where = f"RequestAuthentication {tenant.namespace}/{ra['metadata']['name']} spec.jwtRules[0].issuer"
    assert found == [drift.Drift(tenant.name, where, tenant.issuer, stale)], "\n".join(map(str, found))
    message = str(found[0])
    assert tenant.name in message and tenant.issuer in message and stale in message, message
