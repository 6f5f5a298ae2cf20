"""fixtures/drift.py: every place the platform names a tenant's Cognito pool is compared with
the pool AWS describes, and each stale value is reported with the tenant, where it sits,
the value the pool implies and the value configured. AWS is a fake Cognito client here;
the suite runs the same check against moto (standalone) or real Cognito (EKS)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from fixtures import drift
from fixtures.catalog import tenants
from fixtures.manifests import render

PLATFORM = Path(__file__).resolve().parents[1] / "platform"


class FakeCognito:
    """list_user_pools / describe_user_pool / list_user_pool_clients over ``pools``
    ({id: (name, [client ids])}), one pool per page to exercise pagination."""

    def __init__(self, pools: dict[str, tuple[str, list[str]]]):
        self.pools = pools

    def list_user_pools(self, MaxResults: int, NextToken: str | None = None):  # noqa: N803 - boto3 names
        ids = sorted(self.pools)
        i = int(NextToken or 0)
        page = {"UserPools": [{"Id": ids[i], "Name": self.pools[ids[i]][0]}]} if i < len(ids) else {"UserPools": []}
        if i + 1 < len(ids):
            page["NextToken"] = str(i + 1)
        return page

    def describe_user_pool(self, UserPoolId: str):  # noqa: N803
        if UserPoolId not in self.pools:
            raise type("ResourceNotFoundException", (Exception,), {})(UserPoolId)
        return {"UserPool": {"Id": UserPoolId, "Name": self.pools[UserPoolId][0]}}

    def list_user_pool_clients(self, UserPoolId: str, MaxResults: int, NextToken: str | None = None):  # noqa: N803
        return {"UserPoolClients": [{"ClientId": c} for c in self.pools[UserPoolId][1]]}


@pytest.fixture(scope="module")
def docs():
    return render(PLATFORM, "standalone")


@pytest.fixture(scope="module")
def catalog():
    return tenants(str(PLATFORM))


def matching(catalog) -> FakeCognito:
    return FakeCognito({t.user_pool_id: (t.user_pool_name, [t.client_id, "someotherclient0000000000"])
                        for t in catalog} | {"us-east-1_Unrelated0": ("unrelated", ["x"])})


class FakePlatform:
    def __init__(self, docs, cognito):
        self.docs, self.cognito, self.platform_dir = docs, cognito, PLATFORM

    def manifests(self):
        return copy.deepcopy(self.docs)

    def aws_client(self, service, region):
        assert service == "cognito-idp"
        return self.cognito


def test_find_pool_by_name_across_pages_then_by_id(catalog):
    t = catalog[0]
    by_name = drift.find_pool(FakeCognito({"us-east-1_Zzzzzzzz9": ("other", []), t.user_pool_id: (t.user_pool_name, ["c"])}), t)
    assert (by_name.id, by_name.client_ids) == (t.user_pool_id, ("c",))
    assert by_name.issuer == t.issuer and by_name.jwks_uri == t.jwks_uri
    renamed = drift.find_pool(FakeCognito({t.user_pool_id: ("renamed", [])}), t)
    assert renamed.id == t.user_pool_id
    assert drift.find_pool(FakeCognito({"us-east-1_Zzzzzzzz9": ("other", [])}), t) is None


def test_platform_as_committed_has_no_drift(docs, catalog):
    plat = FakePlatform(docs, matching(catalog))
    for t in catalog:
        assert drift.check(plat, t) == []


def _ra(docs, name, ns):
    return next(d for d in docs if d["kind"] == "RequestAuthentication" and d["metadata"]["name"] == name
                and d["metadata"]["namespace"] == ns)


def _edge_policy(docs, t):
    return next(d for d in docs if d["kind"] == "AuthorizationPolicy" and d["metadata"]["name"] == f"{t}-edge")


STALE_ISSUER = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Stale0000"
STALE_CLIENT = "stale0000000000000000000000"

MUTATIONS = {
    "namespace RequestAuthentication issuer": (
        lambda d, t: _ra(d, "tenant-jwt", t)["spec"]["jwtRules"][0].__setitem__("issuer", STALE_ISSUER),
        "RequestAuthentication {t}/tenant-jwt spec.jwtRules[0].issuer", "{issuer}", STALE_ISSUER),
    "edge RequestAuthentication jwksUri": (
        lambda d, t: _ra(d, f"{t}-edge", "istio-system")["spec"]["jwtRules"][0].__setitem__("jwksUri", STALE_ISSUER),
        "RequestAuthentication istio-system/{t}-edge spec.jwtRules[0].jwksUri", "{jwks}", STALE_ISSUER),
    "RequestAuthentication audience": (
        lambda d, t: _ra(d, "tenant-jwt", t)["spec"]["jwtRules"][0].__setitem__("audiences", [STALE_CLIENT]),
        "RequestAuthentication {t}/tenant-jwt spec.jwtRules[0].audiences[0]", "an app client of {pool}",
        STALE_CLIENT),
    "edge AuthorizationPolicy issuer condition": (
        lambda d, t: _edge_policy(d, t)["spec"]["rules"][0]["when"][0].__setitem__("values", [STALE_ISSUER]),
        "AuthorizationPolicy istio-system/{t}-edge spec.rules[0].when[0].values[0]", "{issuer}", STALE_ISSUER),
}


@pytest.mark.parametrize("name", MUTATIONS, ids=lambda n: f"stale {n} is reported")
def test_each_stale_value_is_reported_with_tenant_expected_and_actual(docs, catalog, name):
    mutate, where, expected, actual = MUTATIONS[name]
    t = catalog[0]
    changed = copy.deepcopy(docs)
    mutate(changed, t.name)
    found = drift.check(FakePlatform(changed, matching(catalog)), t)
    fill = dict(t=t.name, issuer=t.issuer, jwks=t.jwks_uri, pool=t.user_pool_id)
    assert len(found) == 1, "\n".join(map(str, found))
    got = found[0]
    assert (got.tenant, got.where, got.actual) == (t.name, where.format(**fill), actual)
    assert got.expected.startswith(expected.format(**fill))
    assert t.name in str(got) and actual in str(got)
    # the other tenants are untouched
    for other in catalog[1:]:
        assert drift.check(FakePlatform(changed, matching(catalog)), other) == []


def test_stale_oauth2_proxy_values_are_reported(catalog, docs):
    t = catalog[0]
    file, cfg = drift.oauth2_proxy_config(PLATFORM, t)
    assert file == f"tenants/{t.name}/oauth2-proxy-values.yaml" and cfg["client_id"] == t.client_id
    pool = drift.find_pool(matching(catalog), t)
    stale = (file, {**cfg, "client_id": STALE_CLIENT, "oidc_issuer_url": STALE_ISSUER})
    found = drift.compare(t, pool, docs, stale)
    assert [(d.where, d.actual) for d in found] == [(f"{file} client_id", STALE_CLIENT),
                                                    (f"{file} oidc_issuer_url", STALE_ISSUER)]


def test_a_pool_missing_from_aws_is_reported(catalog, docs):
    t = catalog[0]
    found = drift.check(FakePlatform(docs, FakeCognito({})), t)
    assert len(found) == 1 and found[0].actual == "no such pool in AWS" and t.user_pool_id in found[0].where
