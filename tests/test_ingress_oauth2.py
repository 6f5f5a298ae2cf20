"""oauth2-proxy's per-tenant values, as the gateway's OAuth2 filter plays them: read
strictly (errors name the file and the field), one filter per tenant enabled only on the
tenant's own host, secrets generated per run. The redirect itself is proven end to end
in suites/ingress/test_browser_login.py."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from fixtures.platform import Tenant
from fixtures.standalone import oauth2
from fixtures.standalone.backend import StandalonePlatform, envoy_binary
from fixtures.standalone.oauth2 import ValuesError

REPO = Path(__file__).resolve().parents[1]
PLATFORM = REPO / "platform"
TENANTA = PLATFORM / "tenants" / "tenanta" / oauth2.VALUES_FILE


def _tenant(name: str = "tenanta", host: str = "tenanta.example.com") -> Tenant:
    return Tenant(name=name, host=host, region="us-east-1", user_pool_name=f"{name}-users", user_pool_id="p",
                  client_id="c", issuer="i", jwks_uri="j")


def _values(tmp_path: Path, old: str | None = None, new: str = "", *, text: str | None = None) -> Path:
    body = TENANTA.read_text() if text is None else text
    if old is not None:
        assert body.count(old) == 1, f"{old!r} not once in {TENANTA}"
        body = body.replace(old, new)
    path = tmp_path / oauth2.VALUES_FILE
    path.write_text(body)
    return path


def test_tenant_values_become_a_login_client(tmp_path):
    client = oauth2.login_client(_tenant(), TENANTA, tmp_path / "secrets")
    assert client.client_id == "4f1c0a9d2b7e4c8aa1d3e5f7b9"
    assert client.authorize_url == "https://tenanta-auth.auth.us-east-1.amazoncognito.com/oauth2/authorize"
    assert client.token_url == "https://tenanta-auth.auth.us-east-1.amazoncognito.com/oauth2/token"
    assert client.redirect_url == "https://tenanta.example.com/oauth2/callback"
    assert client.scopes == ("openid", "email", "profile")
    for path in (client.client_secret_file, client.hmac_secret_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        (resource,) = json.loads(path.read_text())["resources"]   # Envoy reads one secret per SDS file
        assert len(resource["generic_secret"]["secret"]["inline_string"]) >= 32


@dataclass(frozen=True)
class Unplayable:
    """A change to tenanta's values that the gateway cannot play, and the field it names."""

    why: str
    old: str
    new: str
    field: str

    def __str__(self) -> str:
        return f"{self.why} is refused naming {self.field}"


UNPLAYABLE = [
    Unplayable("client_id removed", '    client_id = "4f1c0a9d2b7e4c8aa1d3e5f7b9"\n', "", "config.configFile.client_id"),
    Unplayable("login_url removed",
               '    login_url = "https://tenanta-auth.auth.us-east-1.amazoncognito.com/oauth2/authorize"\n', "",
               "config.configFile.login_url"),
    Unplayable("redirect_url removed", '    redirect_url = "https://tenanta.example.com/oauth2/callback"\n', "",
               "config.configFile.redirect_url"),
    Unplayable("a provider other than oidc", 'provider = "oidc"', 'provider = "github"', "config.configFile.provider"),
    Unplayable("email_domains other than *", 'email_domains = ["*"]', 'email_domains = ["example.com"]',
               "config.configFile.email_domains"),
    Unplayable("cookie_domains beyond the tenant's host", 'cookie_domains = ["tenanta.example.com"]',
               'cookie_domains = [".example.com"]', "config.configFile.cookie_domains"),
    Unplayable("whitelist_domains beyond the tenant's host", 'whitelist_domains = ["tenanta.example.com"]',
               'whitelist_domains = ["evil.example.org"]', "config.configFile.whitelist_domains"),
    Unplayable("an oauth2-proxy option the gateway does not play", '    set_xauthrequest = true\n',
               '    set_xauthrequest = true\n    skip_auth_routes = ["^/public"]\n', "config.configFile.skip_auth_routes"),
    Unplayable("an extra argument the gateway does not play", "  oidc-groups-claim: cognito:groups\n",
               "  oidc-groups-claim: cognito:groups\n  approval-prompt: force\n", "extraArgs.approval-prompt"),
    Unplayable("a redirect_url that is not https", 'redirect_url = "https://tenanta.example.com/oauth2/callback"',
               'redirect_url = "http://tenanta.example.com"', "config.configFile.redirect_url"),
    Unplayable("a login_url no token URL can be derived from",
               'login_url = "https://tenanta-auth.auth.us-east-1.amazoncognito.com/oauth2/authorize"',
               'login_url = "https://login.example.org/start"', "config.configFile.redeem_url"),
    Unplayable("a Helm value outside the config file", "  configFile: |\n", "  replicas: 2\n  configFile: |\n",
               "config.replicas"),
    Unplayable("a config file that is not TOML", 'scope = "openid email profile"', "scope = [", "config.configFile"),
]


@pytest.mark.parametrize("case", UNPLAYABLE, ids=str)
def test_values_the_gateway_cannot_play_are_refused_naming_file_and_field(tmp_path, case):
    path = _values(tmp_path, case.old, case.new)
    field = case.field
    with pytest.raises(ValuesError) as err:
        oauth2.login_client(_tenant(), path, tmp_path / "secrets", display="tenants/tenanta/oauth2-proxy-values.yaml")
    assert err.value.file == "tenants/tenanta/oauth2-proxy-values.yaml"
    assert err.value.field == field, str(err.value)
    assert str(err.value).startswith(f"tenants/tenanta/oauth2-proxy-values.yaml: {field}: ")


def test_missing_values_file_is_named(tmp_path):
    with pytest.raises(ValuesError, match=r"nowhere\.yaml: \(file\): missing"):
        oauth2.login_client(_tenant(), tmp_path / "nowhere.yaml", tmp_path / "secrets")


def test_explicit_redeem_url_is_used(tmp_path):
    path = _values(tmp_path, '    scope = "openid email profile"\n',
                   '    scope = "openid"\n    redeem_url = "https://idp.example.org/token"\n')
    client = oauth2.login_client(_tenant(), path, tmp_path / "s")
    assert (client.token_url, client.scopes) == ("https://idp.example.org/token", ("openid",))


def test_each_filter_is_enabled_on_its_own_tenants_host_only(tmp_path):
    a = oauth2.login_client(_tenant(), TENANTA, tmp_path / "s")
    b = oauth2.login_client(_tenant("tenantb", "tenantb.example.com"),
                            PLATFORM / "tenants" / "tenantb" / oauth2.VALUES_FILE, tmp_path / "s")
    vhosts = [{"name": "tenanta.example.com"}, {"name": "tenantb.example.com"}, {"name": "other.example.com"}]
    filters = [{"name": "envoy.filters.http.jwt_authn"}, {"name": "envoy.filters.http.router"}]
    clusters: dict = {}
    oauth2.apply({"tenanta": a, "tenantb": b}, vhosts, filters, clusters)
    assert [f["name"] for f in filters] == ["oauth2/tenanta", "oauth2/tenantb", "envoy.filters.http.jwt_authn",
                                            "envoy.filters.http.router"]
    assert all(f["disabled"] for f in filters[:2])
    assert [list(v.get("typed_per_filter_config", {})) for v in vhosts] == [["oauth2/tenanta"], ["oauth2/tenantb"], []]
    config = filters[0]["typed_config"]["config"]
    assert config["credentials"]["client_id"] == a.client_id
    assert config["redirect_path_matcher"] == {"path": {"exact": "/oauth2/callback"}}
    # Tokens and API paths are left to jwt_authn and the edge policy.
    assert {m["name"] for m in config["pass_through_matcher"]} == {"authorization", ":path"}
    assert sorted(clusters) == ["oauth2-token|tenanta-auth_auth_us-east-1_amazoncognito_com",
                                "oauth2-token|tenantb-auth_auth_us-east-1_amazoncognito_com"]


def test_platform_without_a_tenants_values_is_refused_naming_the_file(tmp_path):
    copy = tmp_path / "platform"
    shutil.copytree(PLATFORM, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (copy / "tenants" / "tenantb" / oauth2.VALUES_FILE).unlink()
    with pytest.raises(ValuesError, match=r"tenants/tenantb/oauth2-proxy-values.yaml: \(file\): missing"):
        StandalonePlatform(copy).prepare()


def test_gateway_config_with_the_login_filters_is_valid_for_envoy():
    plat = StandalonePlatform(PLATFORM).prepare()
    try:
        gw = plat.model.gateway_workload
        filters = plat.bootstraps[gw.key]["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
            "typed_config"]["http_filters"]
        assert [f["name"] for f in filters if f["name"].startswith("oauth2/")] == \
            [f"oauth2/{t.name}" for t in plat.tenants]
        out = subprocess.run([str(envoy_binary("gateway")), "--mode", "validate", "-c", str(plat.configs[gw.key])],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    finally:
        plat.close()
