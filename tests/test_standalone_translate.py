"""The standalone backend's translation of the platform, without starting it.

It refuses what it does not implement, naming the resource and the field; it reads the
repository's platform into the expected model; AuthorizationPolicy becomes Envoy RBAC with
Istio's semantics; and every Envoy config it writes passes ``envoy --mode validate`` with
no deprecated field. The only processes started are ``kubectl kustomize`` and
``envoy --mode validate``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest
import yaml

from fixtures.catalog import tenants as catalog
from fixtures.manifests import render
from fixtures.platform import Tenant
from fixtures import schemas
from fixtures.schemas import ISTIO_VERSIONS
from fixtures.standalone import envoy_config, envoy_filters, faults, subset
from fixtures.standalone.backend import StandalonePlatform, envoy_binary
from fixtures.standalone.mesh import Policy, load_mesh
from fixtures.standalone.rbac import JWT_FILTER, JWT_PAYLOAD_KEY, rbac_filters
from fixtures.standalone.subset import UnsupportedField

PLATFORM = Path(__file__).resolve().parents[1] / "platform"
TENANTS = catalog(str(PLATFORM))
DEPRECATED = "Deprecated field"


def copy_platform(tmp_path: Path) -> Path:
    """A throwaway copy of platform/ to break; tmp_path is removed by pytest."""
    dest = tmp_path / "platform"
    shutil.copytree(PLATFORM, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path.name}: expected {old!r} exactly once; the platform changed"
    path.write_text(text.replace(old, new))


@pytest.fixture
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private temp root for run directories, so that what a run leaves behind is
    visible (other runs on this machine write their own into the shared /tmp)."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


# --- subset.check -----------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    what: str
    resource: str
    value: Any
    spec: Any
    path: str
    detail: str

    def __str__(self) -> str:
        return f"{self.what} is refused at {self.path}"


REFUSALS = [
    Refusal("an unknown field", "VirtualService t/v", {"http": [{"name": "api", "retries": {"attempts": 3}}]},
            subset.VIRTUAL_SERVICE, "spec.http[0].retries", "field is not implemented"),
    Refusal("a disallowed enum value", "AuthorizationPolicy t/p", {"action": "CUSTOM"},
            subset.AUTHORIZATION_POLICY, "spec.action", "value 'CUSTOM' is not implemented"),
    Refusal("a string where an int belongs", "Gateway g", {"servers": [{"port": {"number": "443"}}]},
            subset.GATEWAY, "spec.servers[0].port.number", "expected int, got str"),
    Refusal("a bool where an int belongs", "Gateway g", {"servers": [{"port": {"number": True}}]},
            subset.GATEWAY, "spec.servers[0].port.number", "expected int, got bool"),
    Refusal("a string where a list belongs", "VirtualService t/v", {"hosts": "a.example.com"},
            subset.VIRTUAL_SERVICE, "spec.hosts", "expected a list, got str"),
    Refusal("a non-string label value", "PeerAuthentication t/p", {"selector": {"matchLabels": {"app": 1}}},
            subset.PEER_AUTHENTICATION, "spec.selector.matchLabels.app", "expected str, got int"),
    Refusal("a bad value deep in nested lists", "VirtualService t/v",
            {"http": [{"name": "ui"}, {"route": [{"destination": {"host": "a"}},
                                                 {"destination": {"host": "b", "port": {"number": "80"}}}]}]},
            subset.VIRTUAL_SERVICE, "spec.http[1].route[1].destination.port.number", "expected int, got str"),
]


@pytest.mark.parametrize("case", REFUSALS, ids=str)
def test_subset_check_names_resource_and_path(case: Refusal) -> None:
    with pytest.raises(UnsupportedField) as err:
        subset.check(case.resource, case.value, case.spec)
    assert (err.value.resource, err.value.path) == (case.resource, case.path)
    assert case.detail in err.value.detail
    assert str(err.value).startswith(f"{case.resource}: {case.path}: ")


def test_subset_check_accepts_what_is_implemented() -> None:
    subset.check("Gateway g", {"selector": {"istio": "ingressgateway"}, "servers": [{
        "port": {"number": 443, "name": "https", "protocol": "HTTPS"}, "hosts": ["*.example.com"],
        "tls": {"mode": "SIMPLE", "credentialName": "c", "minProtocolVersion": "TLSV1_2"}}]}, subset.GATEWAY)


def test_subset_check_refuses_a_mapping_where_an_enum_value_belongs() -> None:
    with pytest.raises(UnsupportedField, match=r"spec\.servers\[0\]\.tls\.mode"):
        subset.check("Gateway g", {"servers": [{"tls": {"mode": {"simple": True}}}]}, subset.GATEWAY)


# --- the repository's platform ------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return load_mesh(render(PLATFORM, "standalone"))


def test_tenants_come_from_their_tenant_files(model) -> None:
    assert [t.name for t in model.tenants] == ["tenanta", "tenantb"]
    for t in model.tenants:
        data = yaml.safe_load((PLATFORM / "tenants" / t.name / "tenant.yaml").read_text())["data"]
        assert (t.issuer, t.client_id, t.host, t.jwks_uri) == (
            data["issuer"], data["clientId"], data["host"], data["jwksUri"])


def test_workloads_are_the_gateway_and_each_tenants_apps(model) -> None:
    # rag-api is a Canary's target: Flagger's primary serves, the target is the canary.
    got = sorted((w.namespace, w.name, w.kind, w.role) for w in model.workloads)
    assert got == [("istio-system", "istio-ingressgateway", "gateway", ""),
                   ("tenanta", "app-ui", "app_ui", ""), ("tenanta", "rag-api", "rag_api", "canary"),
                   ("tenanta", "rag-api-primary", "rag_api", "primary"),
                   ("tenantb", "app-ui", "app_ui", ""), ("tenantb", "rag-api", "rag_api", "canary"),
                   ("tenantb", "rag-api-primary", "rag_api", "primary")]
    assert model.workload("tenanta", "rag-api").spiffe_id == "spiffe://cluster.local/ns/tenanta/sa/rag-api"


def test_the_reverse_proxy_is_listed_as_not_run_with_a_reason(model) -> None:
    [(ref, reason)] = model.not_run
    assert ref == "Deployment istio-ingress/reverse-proxy"
    assert "not run on standalone" in reason


# --- deliberately broken copies -----------------------------------------------------------

TENANTA_KUSTOMIZATION = "tenants/tenanta/kustomization.yaml"
PROXY_CONFIG = '{"gatewayTopology":{"numTrustedProxies":0,"proxyProtocol":{}}}'
SIDECAR = """apiVersion: networking.istio.io/v1
kind: Sidecar
metadata:
  name: default
  namespace: istio-system
spec:
  egress:
    - hosts: ["./*"]
"""
# The pre-gatewayTopology way to enable PROXY protocol on the gateway, as implemented;
# the refusals below each change one thing of it.
ENVOY_FILTER = """apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata:
  name: proxy-protocol
  namespace: istio-system
spec:
  workloadSelector:
    labels:
      istio: ingressgateway
  configPatches:
    - applyTo: LISTENER
      match:
        context: GATEWAY
      patch:
        operation: MERGE
        value:
          listener_filters:
            - name: envoy.filters.listener.proxy_protocol
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol
"""


@dataclass(frozen=True)
class Breakage:
    what: str
    file: str
    old: str | None  # None: append ``new`` to the file
    new: str
    names: tuple[str, ...]  # what the error message must name
    extra_files: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __str__(self) -> str:
        return f"{self.what} is refused"

    def apply(self, copy: Path) -> None:
        for rel, text in self.extra_files.items():
            (copy / rel).write_text(text)
        path = copy / self.file
        if self.old is None:
            path.write_text(path.read_text() + self.new)
        else:
            replace_once(path, self.old, self.new)


def _with_route_field(name: str, text: str) -> Breakage:
    return Breakage(f"a VirtualService http route with {name}", "base/virtual-service.yaml",
                    "    - name: ui\n      route:\n", f"    - name: ui\n{text}      route:\n",
                    ("VirtualService tenanta/tenant-host", f"spec.http[1].{name}"))


def _with_kind(kind_doc: str, filename: str, names: tuple[str, ...]) -> Breakage:
    return Breakage(f"an unknown kind ({names[-1]})", "mesh/kustomization.yaml",
                    "  - peer-authentication.yaml\n", f"  - peer-authentication.yaml\n  - {filename}\n",
                    names, {f"mesh/{filename}": kind_doc})


BREAKAGES = [
    Breakage("an ipBlocks source in tenanta's AuthorizationPolicy", TENANTA_KUSTOMIZATION, None,
             "patches:\n"
             "  - target: {kind: AuthorizationPolicy, name: tenant-isolation}\n"
             "    patch: |-\n"
             "      - op: add\n"
             "        path: /spec/rules/0/from/1/source/ipBlocks\n"
             "        value: [\"10.0.0.0/8\"]\n",
             ("AuthorizationPolicy tenanta/tenant-isolation", "spec.rules[0].from[1].source.ipBlocks")),
    _with_route_field("fault", "      fault:\n        abort:\n          httpStatus: 503\n"
                               "          percentage:\n            value: 100\n"),
    _with_route_field("mirror", "      mirror:\n        host: app-ui\n"),
    Breakage("Gateway tls mode MUTUAL", "mesh/gateway/gateway.yaml", "mode: SIMPLE", "mode: MUTUAL",
             ("Gateway istio-system/public-gateway", "spec.servers[0].tls.mode", "'MUTUAL'")),
    Breakage("PeerAuthentication mode DISABLE", "mesh/peer-authentication.yaml", "mode: STRICT", "mode: DISABLE",
             ("PeerAuthentication istio-system/default", "spec.mtls.mode", "'DISABLE'")),
    _with_kind(SIDECAR, "sidecar.yaml",
               ("Sidecar istio-system/default", "apiVersion/kind", "networking.istio.io/v1 Sidecar")),
    *(Breakage(f"an EnvoyFilter {what}", "mesh/kustomization.yaml", "  - peer-authentication.yaml\n",
               "  - peer-authentication.yaml\n  - envoy-filter.yaml\n",
               ("EnvoyFilter istio-system/proxy-protocol", *names),
               {"mesh/envoy-filter.yaml": ENVOY_FILTER.replace(*edit)})
      for what, edit, names in [
          ("without workloadSelector", ("  workloadSelector:\n    labels:\n      istio: ingressgateway\n", ""),
           ("spec.workloadSelector", "patches every proxy")),
          ("selecting sidecars", ("istio: ingressgateway", "app: rag-api"),
           ("spec.workloadSelector", "selects tenanta/rag-api")),
          ("selecting no workload", ("istio: ingressgateway", "istio: egressgateway"),
           ("spec.workloadSelector", "selects no workload")),
          ("patching an HTTP filter", ("applyTo: LISTENER", "applyTo: HTTP_FILTER"),
           ("spec.configPatches[0].applyTo", "'HTTP_FILTER'")),
          ("for sidecar inbound listeners", ("context: GATEWAY", "context: SIDECAR_INBOUND"),
           ("spec.configPatches[0].match.context", "'SIDECAR_INBOUND'")),
          ("inserting first", ("operation: MERGE", "operation: INSERT_FIRST"),
           ("spec.configPatches[0].patch.operation", "'INSERT_FIRST'")),
          ("merging another listener field", ("          listener_filters:", "          per_connection_buffer_limit_bytes: 1024\n          listener_filters:"),
           ("spec.configPatches[0].patch.value.per_connection_buffer_limit_bytes",)),
          ("adding another listener filter", ("name: envoy.filters.listener.proxy_protocol", "name: envoy.filters.listener.http_inspector"),
           ("spec.configPatches[0].patch.value.listener_filters[0].name", "'envoy.filters.listener.http_inspector'")),
          ("whose typed_config is another filter's", ("proxy_protocol.v3.ProxyProtocol", "tls_inspector.v3.TlsInspector"),
           ("spec.configPatches[0].patch.value.listener_filters[0].typed_config.@type", "not the type of")),
      ]),
    Breakage("an unknown top-level proxy.istio.io/config key", "mesh/gateway/ingress-gateway.yaml",
             PROXY_CONFIG, PROXY_CONFIG[:-1] + ',"holdApplicationUntilProxyStarts":true}',
             ("Deployment istio-system/istio-ingressgateway",
              "spec.template.metadata.annotations.[proxy.istio.io/config].holdApplicationUntilProxyStarts")),
    Breakage("an unknown gatewayTopology key", "mesh/gateway/ingress-gateway.yaml",
             PROXY_CONFIG,
             PROXY_CONFIG.replace('"proxyProtocol"', '"forwardClientCertDetails":"SANITIZE_SET","proxyProtocol"'),
             ("Deployment istio-system/istio-ingressgateway",
              "spec.template.metadata.annotations.[proxy.istio.io/config].gatewayTopology.forwardClientCertDetails")),
    Breakage("a jwksUri on a host with no emulator", "tenants/tenanta/tenant.yaml",
             "jwksUri: https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Tn7A2xQ9p/.well-known/jwks.json",
             "jwksUri: https://login.example.org/tenanta/jwks.json",
             ("RequestAuthentication ", "tenanta", "spec.jwtRules[0].jwksUri", "'login.example.org'")),
]


def test_prepare_puts_its_run_dir_under_the_temp_root(tmp_path: Path, temp_root: Path) -> None:
    # Control for the next test: an intact copy does create its run dir there.
    plat = StandalonePlatform(copy_platform(tmp_path)).prepare()
    try:
        assert plat.run_dir.parent == temp_root and plat.run_dir.name.startswith("tenant-mesh-")
    finally:
        shutil.rmtree(plat.run_dir, ignore_errors=True)


@pytest.mark.parametrize("case", BREAKAGES, ids=str)
def test_broken_copy_is_refused_naming_resource_and_field(case: Breakage, tmp_path: Path, temp_root: Path) -> None:
    copy = copy_platform(tmp_path)
    case.apply(copy)
    with pytest.raises(UnsupportedField) as err:
        StandalonePlatform(copy).prepare()
    message = str(err.value)
    for name in case.names:
        assert name in message, f"{name!r} not named in: {message}"
    assert not list(temp_root.glob("tenant-mesh-*")), "a failed prepare() left its run directory behind"


# --- AuthorizationPolicy -> Envoy RBAC ----------------------------------------------------
# Istio semantics: https://istio.io/latest/docs/concepts/security/#implicit-enablement
# Decisions are computed by walking the generated Envoy RBAC config with a small evaluator
# of the Envoy matchers used (anything else fails the test), as the filter chain would.


@dataclass(frozen=True)
class Request:
    peer: str | None = None                                   # client certificate URI SAN
    claims: Mapping[str, Any] | None = None                   # verified JWT payload
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    path: str = "/whoami"
    method: str = "GET"


def _string(m: dict, value: Any) -> bool:
    if not isinstance(value, str):
        return False
    assert set(m) <= {"exact", "prefix", "suffix", "safe_regex", "ignore_case"}, m
    fold = (lambda s: s.lower()) if m.get("ignore_case") else (lambda s: s)
    if "exact" in m:
        return fold(value) == fold(m["exact"])
    if "prefix" in m:
        return fold(value).startswith(fold(m["prefix"]))
    if "suffix" in m:
        return fold(value).endswith(fold(m["suffix"]))
    return re.fullmatch(m["safe_regex"]["regex"], value) is not None


def _header(h: dict, req: Request) -> bool:
    values = {":method": req.method, ":path": req.path, **req.headers}
    return _string(h["string_match"], values.get(h["name"]))


def _metadata(m: dict, req: Request) -> bool:
    assert m["filter"] == JWT_FILTER and m["path"][0] == {"key": JWT_PAYLOAD_KEY}, m
    value: Any = req.claims
    for step in m["path"][1:]:
        if not isinstance(value, Mapping) or step["key"] not in value:
            return False
        value = value[step["key"]]
    if "string_match" in m["value"]:
        return _string(m["value"]["string_match"], value)
    one_of = m["value"]["list_match"]["one_of"]["string_match"]
    return isinstance(value, list) and any(_string(one_of, v) for v in value)


def _principal(node: dict, req: Request) -> bool:
    [(kind, arg)] = node.items()
    if kind == "any":
        return arg is True
    if kind == "and_ids":
        return all(_principal(i, req) for i in arg["ids"])
    if kind == "or_ids":
        return any(_principal(i, req) for i in arg["ids"])
    if kind == "not_id":
        return not _principal(arg, req)
    if kind == "authenticated":
        return _string(arg["principal_name"], req.peer)
    if kind == "header":
        return _header(arg, req)
    if kind == "sourced_metadata":
        assert arg["metadata_source"] == "DYNAMIC", arg
        return req.claims is not None and _metadata(arg["metadata_matcher"], req)
    raise AssertionError(f"principal {kind!r} is not understood by this evaluator")


def _permission(node: dict, req: Request) -> bool:
    [(kind, arg)] = node.items()
    if kind == "any":
        return arg is True
    if kind == "and_rules":
        return all(_permission(r, req) for r in arg["rules"])
    if kind == "or_rules":
        return any(_permission(r, req) for r in arg["rules"])
    if kind == "not_rule":
        return not _permission(arg, req)
    if kind == "header":
        return _header(arg, req)
    if kind == "url_path":
        return _string(arg["path"], req.path.split("?")[0])
    raise AssertionError(f"permission {kind!r} is not understood by this evaluator")


def decide(filters: list[dict], req: Request) -> str:
    """ALLOW or DENY, as Envoy's RBAC filters in this order would decide."""
    for f in filters:
        rules = f["typed_config"]["rules"]
        matched = any(any(_permission(p, req) for p in pol["permissions"])
                      and any(_principal(i, req) for i in pol["principals"])
                      for pol in rules["policies"].values())
        if matched == (rules["action"] == "DENY"):
            return "DENY"
    return "ALLOW"


def authz(name: str, *rules: dict, action: str = "ALLOW", namespace: str = "tenanta") -> Policy:
    return Policy("AuthorizationPolicy", namespace, name, {"action": action, "rules": list(rules)})


A_UI = "spiffe://cluster.local/ns/tenanta/sa/app-ui"
B_UI = "spiffe://cluster.local/ns/tenantb/sa/app-ui"
GATEWAY = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway"
FROM_TENANTA = {"from": [{"source": {"namespaces": ["tenanta"]}}]}
TENANTA_CLAIM = {"when": [{"key": "request.auth.claims[custom:tenantid]", "values": ["tenanta"]}]}
DENY_ADMIN = authz("admin", {"to": [{"operation": {"paths": ["/admin*"]}}]}, action="DENY")


@dataclass(frozen=True)
class Decision:
    what: str
    policies: tuple[Policy, ...]
    request: Request
    expect: str

    def __str__(self) -> str:
        return f"{self.what}: {self.expect}"


DECISIONS = [
    Decision("no policy allows anything", (), Request(), "ALLOW"),
    Decision("an ALLOW policy with no rules denies everything", (authz("none"),),
             Request(peer=A_UI, claims={"custom:tenantid": "tenanta"}), "DENY"),
    Decision("namespaces [tenanta] allows a tenanta identity", (authz("ns", FROM_TENANTA),),
             Request(peer=A_UI), "ALLOW"),
    Decision("namespaces [tenanta] denies a tenantb identity", (authz("ns", FROM_TENANTA),),
             Request(peer=B_UI), "DENY"),
    Decision("namespaces [tenanta] denies namespace tenanta-evil", (authz("ns", FROM_TENANTA),),
             Request(peer="spiffe://cluster.local/ns/tenanta-evil/sa/app-ui"), "DENY"),
    Decision("namespaces [tenanta] denies a caller without identity", (authz("ns", FROM_TENANTA),), Request(), "DENY"),
    Decision("principals allows the exact identity",
             (authz("gw", {"from": [{"source": {"principals": [GATEWAY.removeprefix("spiffe://")]}}]}),),
             Request(peer=GATEWAY), "ALLOW"),
    Decision("notPrincipals denies the named identity",
             (authz("gw", {"from": [{"source": {"notPrincipals": ["cluster.local/ns/tenanta/sa/app-ui"]}}]}),),
             Request(peer=A_UI), "DENY"),
    Decision("a claim condition allows the tenant's token", (authz("claim", TENANTA_CLAIM),),
             Request(claims={"custom:tenantid": "tenanta"}), "ALLOW"),
    Decision("a claim condition denies another tenant's token", (authz("claim", TENANTA_CLAIM),),
             Request(claims={"custom:tenantid": "tenantb"}), "DENY"),
    Decision("a claim condition denies a request without token", (authz("claim", TENANTA_CLAIM),), Request(), "DENY"),
    Decision("a claim condition matches one element of a list claim",
             (authz("groups", {"when": [{"key": "request.auth.claims[groups]", "values": ["admins"]}]}),),
             Request(claims={"groups": ["users", "admins"]}), "ALLOW"),
    Decision("a nested claim condition follows the path",
             (authz("nested", {"when": [{"key": "request.auth.claims[addr][country]", "values": ["NZ"]}]}),),
             Request(claims={"addr": {"country": "NZ"}}), "ALLOW"),
    Decision("notValues denies the listed value",
             (authz("not", {"when": [{"key": "request.auth.claims[custom:tenantid]", "notValues": ["tenantb"]}]}),),
             Request(claims={"custom:tenantid": "tenantb"}), "DENY"),
    Decision("notValues allows another value",
             (authz("not", {"when": [{"key": "request.auth.claims[custom:tenantid]", "notValues": ["tenantb"]}]}),),
             Request(claims={"custom:tenantid": "tenanta"}), "ALLOW"),
    Decision("a header condition allows the header's value",
             (authz("hdr", {"when": [{"key": "request.headers[X-Auth-Request-Tenantid]", "values": ["tenanta"]}]}),),
             Request(headers={"x-auth-request-tenantid": "tenanta"}), "ALLOW"),
    Decision("a header condition denies another value",
             (authz("hdr", {"when": [{"key": "request.headers[X-Auth-Request-Tenantid]", "values": ["tenanta"]}]}),),
             Request(headers={"x-auth-request-tenantid": "tenantb"}), "DENY"),
    Decision("a header condition denies a missing header",
             (authz("hdr", {"when": [{"key": "request.headers[X-Auth-Request-Tenantid]", "values": ["tenanta"]}]}),),
             Request(), "DENY"),
    Decision("requestPrincipals [*] allows a request with a token",
             (authz("rp", {"from": [{"source": {"requestPrincipals": ["*"]}}]}),),
             Request(claims={"iss": "https://issuer", "sub": "alice"}), "ALLOW"),
    Decision("requestPrincipals [*] denies a request without token",
             (authz("rp", {"from": [{"source": {"requestPrincipals": ["*"]}}]}),), Request(), "DENY"),
    Decision("a DENY policy wins over a matching ALLOW policy",
             (authz("ns", FROM_TENANTA), DENY_ADMIN), Request(peer=A_UI, path="/admin/reset"), "DENY"),
    Decision("a DENY policy leaves other requests to the ALLOW policy",
             (authz("ns", FROM_TENANTA), DENY_ADMIN), Request(peer=A_UI, path="/whoami"), "ALLOW"),
    Decision("a DENY policy alone allows what it does not match",
             (authz("admin", {"to": [{"operation": {"methods": ["DELETE"]}}]}, action="DENY"),),
             Request(method="GET"), "ALLOW"),
    Decision("all conditions of a rule must hold",
             (authz("both", {**FROM_TENANTA, **TENANTA_CLAIM}),),
             Request(peer=A_UI, claims={"custom:tenantid": "tenantb"}), "DENY"),
    Decision("any rule of a policy may match",
             (authz("either", FROM_TENANTA, TENANTA_CLAIM),),
             Request(peer=B_UI, claims={"custom:tenantid": "tenanta"}), "ALLOW"),
]


@pytest.mark.parametrize("case", DECISIONS, ids=str)
def test_rbac_decision(case: Decision) -> None:
    filters = rbac_filters(list(case.policies))
    assert decide(filters, case.request) == case.expect, json.dumps(filters, indent=1)


PATTERNS = [
    Decision("namespaces [tenant*] allows a tenanta identity",
             (authz("prefix", {"from": [{"source": {"namespaces": ["tenant*"]}}]}),), Request(peer=A_UI), "ALLOW"),
    Decision("hosts [tenanta.*] allows host tenanta.example.com",
             (authz("prefix", {"to": [{"operation": {"hosts": ["tenanta.*"]}}]}),),
             Request(headers={":authority": "tenanta.example.com"}), "ALLOW"),
]


# Istio matches these string fields by exact, prefix ("x*"), suffix ("*x") or presence ("*").
@pytest.mark.parametrize("case", PATTERNS, ids=str)
def test_rbac_prefix_pattern(case: Decision) -> None:
    assert decide(rbac_filters(list(case.policies)), case.request) == case.expect


def _nodes(tree: Any, key: str) -> Iterator[Any]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key:
                yield v
            yield from _nodes(v, key)
    elif isinstance(tree, list):
        for v in tree:
            yield from _nodes(v, key)


def test_no_policy_means_no_rbac_filter() -> None:
    assert rbac_filters([]) == []


def test_deny_filter_comes_before_allow_filter() -> None:
    filters = rbac_filters([authz("a", FROM_TENANTA), authz("d", FROM_TENANTA, action="DENY")])
    assert [(f["name"], f["typed_config"]["rules"]["action"]) for f in filters] == [
        ("envoy.filters.http.rbac.deny", "DENY"), ("envoy.filters.http.rbac.allow", "ALLOW")]


def test_allow_policy_without_rules_is_an_allow_filter_without_policies() -> None:
    [f] = rbac_filters([authz("nothing")])
    assert f["typed_config"]["rules"] == {"action": "ALLOW", "policies": {}}


def test_namespace_becomes_a_spiffe_principal_regex() -> None:
    [regex] = [m["safe_regex"]["regex"] for m in _nodes(rbac_filters([authz("ns", FROM_TENANTA)]), "principal_name")]
    assert re.fullmatch(regex, A_UI)
    assert not re.fullmatch(regex, "spiffe://cluster.local/ns/tenanta-evil/sa/app-ui")


def test_claim_becomes_jwt_metadata_of_that_claim() -> None:
    matchers = list(_nodes(rbac_filters([authz("claim", TENANTA_CLAIM)]), "metadata_matcher"))
    assert matchers and all(m["filter"] == JWT_FILTER for m in matchers)
    assert {json.dumps(m["path"]) for m in matchers} == {
        json.dumps([{"key": JWT_PAYLOAD_KEY}, {"key": "custom:tenantid"}])}


def test_not_values_become_a_negated_principal() -> None:
    [negated] = list(_nodes(rbac_filters([authz("not", {"when": [
        {"key": "request.auth.claims[custom:tenantid]", "notValues": ["tenantb"]}]})]), "not_id"))
    assert "tenantb" in json.dumps(negated)


def test_header_condition_matches_the_lower_cased_header() -> None:
    [header] = list(_nodes(rbac_filters([authz("hdr", {"when": [
        {"key": "request.headers[X-Auth-Request-Tenantid]", "values": ["tenanta"]}]})]), "header"))
    assert header == {"name": "x-auth-request-tenantid", "string_match": {"exact": "tenanta"}}


@pytest.mark.parametrize("principals", [["*/sa/alice"], ["https://issuer/alice"], ["*", "x/y"]], ids=str)
def test_request_principals_other_than_any_are_refused(principals: list[str]) -> None:
    with pytest.raises(UnsupportedField) as err:
        rbac_filters([authz("rp", {"from": [{"source": {"requestPrincipals": principals}}]})])
    assert err.value.resource == "AuthorizationPolicy tenanta/rp"
    assert err.value.path == "spec.rules[0].from[0].source.requestPrincipals"


def test_unknown_condition_key_is_refused() -> None:
    with pytest.raises(UnsupportedField, match=r"spec\.rules\[0\]\.when\[0\]\.key.*'source\.ip'"):
        rbac_filters([authz("ip", {"when": [{"key": "source.ip", "values": ["10.0.0.1"]}]})])


# --- generated Envoy configuration --------------------------------------------------------



def validate(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(envoy_binary()), "--mode", "validate", "-c", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_every_config_validates_without_deprecated_fields(prepared: StandalonePlatform) -> None:
    with ThreadPoolExecutor(max_workers=len(prepared.configs)) as pool:
        results = dict(zip(prepared.configs, pool.map(validate, prepared.configs.values())))
    assert set(results) == {w.key for w in prepared.model.workloads}
    for key, res in results.items():
        output = res.stdout + res.stderr
        assert res.returncode == 0, f"{key}: envoy --mode validate failed:\n{output[-3000:]}"
        warnings = [line for line in output.splitlines() if DEPRECATED in line]
        assert not warnings, f"{key}: deprecated fields:\n" + "\n".join(warnings)


def test_validation_output_does_report_a_deprecated_field(prepared: StandalonePlatform, tmp_path: Path) -> None:
    # Control for the test above: Envoy in use does name a deprecated field in its output.
    cfg = json.loads(prepared.configs["tenanta/rag-api"].read_text())
    rbac = next(f for chain in _nodes(cfg, "http_filters") for f in chain
                if f["name"] == "envoy.filters.http.rbac.allow")
    policy = next(iter(rbac["typed_config"]["rules"]["policies"].values()))
    policy["principals"].append({"metadata": {  # deprecated in favour of sourced_metadata
        "filter": JWT_FILTER, "path": [{"key": "x"}], "value": {"string_match": {"exact": "y"}}}})
    path = tmp_path / "deprecated.json"
    path.write_text(json.dumps(cfg))
    res = validate(path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert DEPRECATED in res.stdout + res.stderr


def _gateway(plat: StandalonePlatform) -> tuple[dict, dict]:
    cfg = json.loads(plat.configs[plat.model.gateway_workload.key].read_text())
    [listener] = cfg["static_resources"]["listeners"]
    return cfg, listener


def test_gateway_listener_reads_proxy_protocol_before_tls(prepared: StandalonePlatform) -> None:
    annotation = json.loads(prepared.model.gateway_workload.annotations["proxy.istio.io/config"])
    assert "proxyProtocol" in annotation["gatewayTopology"]
    _, listener = _gateway(prepared)
    assert [f["name"] for f in listener["listener_filters"]] == [
        "envoy.filters.listener.proxy_protocol", "envoy.filters.listener.tls_inspector"]


def test_gateway_without_proxy_protocol_annotation_has_only_tls_inspector(tmp_path: Path) -> None:
    copy = copy_platform(tmp_path)
    replace_once(copy / "mesh/gateway/ingress-gateway.yaml", PROXY_CONFIG,
                 '{"gatewayTopology":{"numTrustedProxies":0}}')
    plat = StandalonePlatform(copy).prepare()
    try:
        _, listener = _gateway(plat)
        assert [f["name"] for f in listener["listener_filters"]] == ["envoy.filters.listener.tls_inspector"]
    finally:
        shutil.rmtree(plat.run_dir, ignore_errors=True)


def test_gateway_serves_the_wildcard_host_and_trusts_no_forwarded_for(prepared: StandalonePlatform) -> None:
    _, listener = _gateway(prepared)
    [chain] = listener["filter_chains"]
    assert chain["filter_chain_match"]["server_names"] == ["*.example.com"]
    [hcm] = chain["filters"]
    assert hcm["typed_config"]["use_remote_address"] is True
    assert hcm["typed_config"]["xff_num_trusted_hops"] == 0


# Not named `tenant`: that parameter comes from --platform-dir; this module tests the repo's.
@pytest.mark.parametrize("repo_tenant", TENANTS, ids=str)
def test_gateway_routes_tenant_api_to_its_rag_api_over_its_own_mtls(prepared: StandalonePlatform,
                                                                    repo_tenant: Tenant) -> None:
    tenant = repo_tenant
    cfg, listener = _gateway(prepared)
    vhosts = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"]
    [vhost] = [v for v in vhosts if tenant.host in v["domains"]]
    [api] = [r for r in vhost["routes"] if r["match"] == {"prefix": "/api/"}]
    # Flagger's generated delegate: the primary's route (the canary's precedes it, see
    # tests/test_rollout_routes.py)
    cluster_name = f"outbound|8080||rag-api-primary.{tenant.namespace}.svc.cluster.local"
    assert api["route"]["cluster"] == cluster_name
    assert api["route"]["prefix_rewrite"] == "/"

    [cluster] = [c for c in cfg["static_resources"]["clusters"] if c["name"] == cluster_name]
    validation = cluster["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
    trusted = Path(validation["trusted_ca"]["filename"])
    assert trusted == prepared.pki.namespace_roots[tenant.namespace]
    assert trusted.read_bytes() == prepared.pki.namespace_ca[tenant.namespace].cert_pem
    for other in TENANTS:
        if other != tenant:
            assert prepared.pki.namespace_ca[other.namespace].cert_pem not in trusted.read_bytes()
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": f"spiffe://cluster.local/ns/{tenant.namespace}/sa/rag-api"}}]


# --- EnvoyFilter: PROXY protocol on the gateway the pre-gatewayTopology way ----------------

PP, TLS = "envoy.filters.listener.proxy_protocol", "envoy.filters.listener.tls_inspector"
WITHOUT_PP = '{"gatewayTopology":{"numTrustedProxies":0}}'


def _with_envoy_filter(tmp_path: Path, envoy_filter: str, *, annotation: str = PROXY_CONFIG) -> Path:
    """A copy of the platform with ``envoy_filter`` among the gateway's resources and the
    gateway's proxy.istio.io/config set to ``annotation``."""
    copy = copy_platform(tmp_path)
    (copy / "mesh/gateway/envoy-filter.yaml").write_text(envoy_filter)
    replace_once(copy / "mesh/gateway/kustomization.yaml", "  - gateway.yaml\n", "  - gateway.yaml\n  - envoy-filter.yaml\n")
    if annotation != PROXY_CONFIG:
        replace_once(copy / "mesh/gateway/ingress-gateway.yaml", PROXY_CONFIG, annotation)
    return copy


@dataclass(frozen=True)
class ListenerCase:
    what: str
    envoy_filter: str
    annotation: str
    filters: tuple[tuple[str, bool], ...]  # (name, has typed_config), in order

    def __str__(self) -> str:
        return f"{self.what}: {' -> '.join(n.rsplit('.', 1)[-1] + ('' if typed else ' (no typed_config)') for n, typed in self.filters)}"


LISTENER_CASES = [
    ListenerCase("annotation and EnvoyFilter together", ENVOY_FILTER, PROXY_CONFIG,
                 ((PP, True), (TLS, True), (PP, True))),
    ListenerCase("EnvoyFilter instead of the annotation", ENVOY_FILTER, WITHOUT_PP, ((TLS, True), (PP, True))),
    ListenerCase("EnvoyFilter without typed_config instead of the annotation",
                 re.sub(r"\n\s+typed_config:\n\s+\"@type\": \S+", "", ENVOY_FILTER), WITHOUT_PP,
                 ((TLS, True), (PP, False))),
]


@pytest.mark.parametrize("case", LISTENER_CASES, ids=str)
def test_envoy_filter_merge_appends_listener_filters(case: ListenerCase, tmp_path: Path) -> None:
    plat = StandalonePlatform(_with_envoy_filter(tmp_path, case.envoy_filter, annotation=case.annotation)).prepare()
    try:
        _, listener = _gateway(plat)
        assert [(f["name"], "typed_config" in f) for f in listener["listener_filters"]] == list(case.filters)
        assert envoy_config.gateway_parses_proxy_protocol(plat.model)
        result = validate(plat.configs[plat.model.gateway_workload.key])
        if all(typed for _, typed in case.filters):
            assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        else:  # what the gateway NACKs in the field: Envoy no longer finds a filter by name
            assert result.returncode != 0
            assert f"Didn't find a registered implementation for '{PP}'" in result.stdout + result.stderr
    finally:
        shutil.rmtree(plat.run_dir, ignore_errors=True)


def test_gateway_without_proxy_protocol_does_not_parse_it(tmp_path: Path) -> None:
    copy = copy_platform(tmp_path)
    replace_once(copy / "mesh/gateway/ingress-gateway.yaml", PROXY_CONFIG, WITHOUT_PP)
    assert not envoy_config.gateway_parses_proxy_protocol(load_mesh(render(copy, "standalone")))
    assert envoy_config.gateway_parses_proxy_protocol(load_mesh(render(PLATFORM, "standalone")))  # control


@pytest.mark.parametrize("istio", ISTIO_VERSIONS)
def test_implemented_envoy_filter_is_valid_for_istio(istio: str, tmp_path: Path) -> None:
    docs = render(_with_envoy_filter(tmp_path, ENVOY_FILTER), "standalone")
    [envoy_filter] = [d for d in docs if d["kind"] == "EnvoyFilter"]
    assert schemas.validate([envoy_filter], overlay="standalone", istio_version=istio) == []
    # Control: the same document with a value the CRD does not allow is an error.
    broken = {**envoy_filter, "spec": {**envoy_filter["spec"], "configPatches": [
        {**envoy_filter["spec"]["configPatches"][0], "applyTo": "LISTENERS"}]}}
    assert schemas.validate([broken], overlay="standalone", istio_version=istio)


@pytest.mark.parametrize("typed_config", [True, False], ids=["typed", "by name only"])
def test_the_faults_envoy_filter_is_valid_and_implemented(typed_config: bool, prepared: StandalonePlatform) -> None:
    envoy_filter = faults.proxy_protocol_envoy_filter(prepared, typed_config=typed_config)
    for istio in ISTIO_VERSIONS:
        assert schemas.validate([envoy_filter], overlay="standalone", istio_version=istio) == []
    model = load_mesh(prepared.manifests() + [envoy_filter])
    [(ref, value)] = envoy_filters.gateway_listener_patches(model, model.gateway_workload)
    assert ref == "EnvoyFilter istio-system/proxy-protocol spec.configPatches[0]"
    assert [f["name"] for f in value["listener_filters"]] == [PP]


@pytest.mark.parametrize("version", sorted(subset.TLS_VERSIONS))
def test_gateway_minimum_tls_version_reaches_the_listener(version: str, tmp_path: Path) -> None:
    copy = copy_platform(tmp_path)
    replace_once(copy / "mesh/gateway/gateway.yaml", "minProtocolVersion: TLSV1_2", f"minProtocolVersion: {version}")
    plat = StandalonePlatform(copy).prepare()
    try:
        _, listener = _gateway(plat)
        tls = listener["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]["tls_params"]
        assert tls["tls_minimum_protocol_version"] == version.replace("TLSV", "TLSv")
    finally:
        shutil.rmtree(plat.run_dir, ignore_errors=True)
