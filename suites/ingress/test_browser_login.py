"""A browser that has not signed in is sent to its own tenant's Cognito login, and only
there: the authorize URL of the tenant's hosted UI, with the tenant's app client and a
callback on the same host. Requests that carry a token, and API paths, are not
redirected; they get the answer of the token checks and the edge policy."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field

import pytest

from fixtures.platform import Outcome, user_headers

pytestmark = pytest.mark.standalone_required

BROWSER = {"accept": "text/html,application/xhtml+xml", "user-agent": "Mozilla/5.0 (conformance)"}
LOGIN = "302 to the tenant's Cognito login"


def _login_host(tenant) -> str:
    """The tenant's Cognito hosted-UI domain, from the tenant catalog (tenant.yaml)."""
    return f"{tenant.data['cognitoDomain']}.auth.{tenant.region}.amazoncognito.com"


@dataclass(frozen=True)
class Visit:
    path: str
    who: str                      # "browser", "api client", "bad token", "signed-in user"
    expect: object = LOGIN
    headers: dict = field(default_factory=dict, compare=False, hash=False)

    def __str__(self) -> str:
        return f"{self.who} GET {self.path} -> {self.expect}"


VISITS = [
    Visit("/", "browser", headers=BROWSER),
    Visit("/documents/report.pdf?page=2", "browser", headers=BROWSER),
    Visit("/api/whoami", "api client without token", Outcome.RBAC_403),
    Visit("/", "browser with a malformed bearer token", Outcome.AUTHN_401,
          headers={**BROWSER, "authorization": "Bearer not-a-jwt"}),
]


def _signed_in(platform, tenant) -> dict:
    return user_headers(tenant, platform.idp(tenant).token())


@pytest.mark.parametrize("visit", VISITS, ids=str)
def test_unauthenticated_visit_is_sent_to_its_own_tenants_login(platform, tenant, visit):
    gw = platform.gateway()
    gw.request(tenant.host, "/api/whoami", headers=_signed_in(platform, tenant)).expect(Outcome.OK)
    res = gw.request(tenant.host, visit.path, headers=visit.headers)
    if visit.expect != LOGIN:
        res.expect(visit.expect)
        assert "location" not in res.headers, res.describe()
        return
    assert res.status == 302, res.describe()
    location = res.headers.get("location", "")
    url = urllib.parse.urlsplit(location)
    query = urllib.parse.parse_qs(url.query)
    assert (url.scheme, url.hostname, url.path) == ("https", _login_host(tenant), "/oauth2/authorize"), location
    assert query.get("client_id") == [tenant.client_id], location
    assert query.get("redirect_uri") == [f"https://{tenant.host}/oauth2/callback"], location
    assert query.get("response_type") == ["code"], location
    assert "openid" in query.get("scope", [""])[0].split(), location
    for other in platform.tenants:
        if other.name != tenant.name:
            for mark in (other.client_id, other.user_pool_id, _login_host(other), other.host):
                assert mark not in location, f"{tenant.host} redirects with {other.name}'s {mark!r}: {location}"


def test_signed_in_user_is_not_redirected(platform, tenant):
    """The same browser with the tenant's token: the token checks decide, no login."""
    gw = platform.gateway()
    res = gw.request(tenant.host, "/api/whoami", headers={**BROWSER, **_signed_in(platform, tenant)})
    res.expect(Outcome.OK)
    assert res.json()["tenant"] == tenant.name
