"""What the rendered platform needs on a real cluster beyond matching its schemas:
the Prometheus Operator finds a scrape target for every sidecar (the Canary's metrics come
from there), and the calls Flagger's load tester makes for the Canary's webhooks are
admitted by the tenant's AuthorizationPolicy, and nothing else of the load tester is.

Policies are evaluated with Istio's semantics by a small evaluator below that knows only
the fields the platform uses and refuses any other, so a policy it cannot read fails the
test instead of passing it."""

from __future__ import annotations

import functools
import re
import shlex
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pytest

from fixtures.kind import stack
from fixtures.manifests import OVERLAYS, render, tenant_catalog

PLATFORM = Path(__file__).resolve().parents[1] / "platform"
#: The port on which Istio's injected istio-proxy container serves Envoy's Prometheus stats.
ENVOY_PROM_PORT = "http-envoy-prom"
LOADTESTER = f"cluster.local/ns/{stack.FLAGGER_NAMESPACE}/sa/{stack.LOADTESTER_SERVICE_ACCOUNT}"
#: Flagger's webhook types the load tester runs commands for (the analysis calls them).
LOADTESTER_HOOKS = ("pre-rollout", "rollout", "post-rollout")


@functools.cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(render(PLATFORM, overlay))


def of(docs, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and namespace in (None, d["metadata"].get("namespace"))]


def tenants(overlay: str) -> list[str]:
    return [t["name"] for t in tenant_catalog(list(rendered(overlay)))]


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) against labels."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": lambda: labels.get(key) in values, "NotIn": lambda: labels.get(key) not in values,
              "Exists": lambda: key in labels, "DoesNotExist": lambda: key not in labels}[op]()
        if not ok:
            return False
    return True


def pods(docs, namespace: str) -> dict[str, dict[str, str]]:
    """Pod labels per workload in ``namespace``, with the primary Flagger makes of each
    Canary target (a copy whose ``app`` label is ``<target>-primary``)."""
    out = {d["metadata"]["name"]: dict(d["spec"]["template"]["metadata"]["labels"]) for d in of(docs, "Deployment", namespace)}
    for canary in of(docs, "Canary", namespace):
        target = canary["spec"]["targetRef"]["name"]
        out[f"{target}-primary"] = {**out[target], "app": f"{target}-primary"}
    return out


# --- metrics: every sidecar is a scrape target ------------------------------------------


@dataclass(frozen=True)
class Scrape:
    overlay: str
    tenant: str

    def __str__(self) -> str:
        return f"{self.overlay}: every sidecar of {self.tenant} is scraped on {ENVOY_PROM_PORT}"


@pytest.mark.parametrize("case", [Scrape(o, t) for o in OVERLAYS for t in tenants(o)], ids=str)
def test_every_sidecar_of_the_tenant_is_scraped(case):
    docs = rendered(case.overlay)
    monitors = [m for m in of(docs, "PodMonitor", case.tenant)
                if any(e.get("port") == ENVOY_PROM_PORT and e.get("path") == "/stats/prometheus"
                       for e in m["spec"].get("podMetricsEndpoints", []))]
    assert monitors, f"no PodMonitor in {case.tenant} scrapes port {ENVOY_PROM_PORT} path /stats/prometheus"
    for monitor in monitors:
        names = (monitor["spec"].get("namespaceSelector") or {}).get("matchNames")
        assert names in (None, [case.tenant]), f"{monitor['metadata']['name']} looks in {names}"
    for workload, labels in pods(docs, case.tenant).items():
        assert any(selects(m["spec"]["selector"], labels) for m in monitors), (
            f"no PodMonitor of {case.tenant} selects the pods of {workload} ({labels})")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_service_monitor_scrapes_a_port_its_services_lack(overlay):
    """A ServiceMonitor finds targets only among the ports of the Services it selects."""
    docs = rendered(overlay)
    for monitor in of(docs, "ServiceMonitor"):
        ns = monitor["spec"].get("namespaceSelector", {}).get("matchNames") or [monitor["metadata"]["namespace"]]
        services = [s for n in ns for s in of(docs, "Service", n)
                    if selects(monitor["spec"]["selector"], s["metadata"].get("labels") or {})]
        for endpoint in monitor["spec"].get("endpoints", []):
            wanted = endpoint.get("port") or endpoint.get("targetPort")
            found = [p for s in services for p in s["spec"]["ports"]
                     if wanted in (p.get("name"), p.get("targetPort"), p.get("port"))]
            assert found, (f"{overlay}: ServiceMonitor {monitor['metadata']['namespace']}/"
                           f"{monitor['metadata']['name']} scrapes {wanted!r}, which none of "
                           f"{[s['metadata']['name'] for s in services]} exposes")


# --- the load tester's calls against the tenant's AuthorizationPolicy ----------------------


@dataclass(frozen=True)
class Call:
    """A request arriving at a tenant workload's sidecar."""

    principal: str  # the caller's SPIFFE id without the scheme; "" for no mTLS identity
    host: str
    path: str
    method: str = "GET"
    claims: Mapping[str, Any] | None = None
    headers: Mapping[str, str] | None = None

    @property
    def namespace(self) -> str:
        match = re.match(r"^[^/]+/ns/([^/]+)/sa/[^/]+$", self.principal)
        return match.group(1) if match else ""


def _pattern(value: str, actual: str | None, *, fold: bool = False) -> bool:
    """Istio's string match: exact, "prefix*", "*suffix" or "*" (present)."""
    if actual is None:
        return False
    if fold:
        value, actual = value.lower(), actual.lower()
    if value == "*":
        return actual != ""
    if value.endswith("*"):
        return actual.startswith(value[:-1])
    if value.startswith("*"):
        return actual.endswith(value[1:])
    return actual == value


def _any(values, actual, **kw) -> bool:
    return any(_pattern(v, actual, **kw) for v in values)


def _source(src: Mapping[str, Any], call: Call) -> bool:
    checks = {"principals": lambda v: _any(v, call.principal or None),
              "notPrincipals": lambda v: not _any(v, call.principal or None),
              "namespaces": lambda v: _any(v, call.namespace or None),
              "notNamespaces": lambda v: not _any(v, call.namespace or None)}
    unknown = set(src) - set(checks)
    assert not unknown, f"the evaluator does not know source fields {unknown}"
    return all(checks[k](v) for k, v in src.items())


def _operation(op: Mapping[str, Any], call: Call) -> bool:
    host = call.host.rsplit(":", 1)[0] if re.search(r":\d+$", call.host) else call.host
    checks = {"hosts": lambda v: _any(v, host, fold=True) or _any(v, call.host, fold=True),
              "notHosts": lambda v: not (_any(v, host, fold=True) or _any(v, call.host, fold=True)),
              "methods": lambda v: _any(v, call.method), "notMethods": lambda v: not _any(v, call.method),
              "paths": lambda v: _any(v, call.path), "notPaths": lambda v: not _any(v, call.path)}
    unknown = set(op) - set(checks)
    assert not unknown, f"the evaluator does not know operation fields {unknown}"
    return all(checks[k](v) for k, v in op.items())


def _condition(cond: Mapping[str, Any], call: Call) -> bool:
    key = cond["key"]
    if claim := re.fullmatch(r"request\.auth\.claims\[([^\]]+)\]", key):
        actual = (call.claims or {}).get(claim.group(1))
    elif header := re.fullmatch(r"request\.headers\[([^\]]+)\]", key):
        actual = {k.lower(): v for k, v in (call.headers or {}).items()}.get(header.group(1).lower())
    elif key == "source.principal":
        actual = call.principal or None
    elif key == "source.namespace":
        actual = call.namespace or None
    else:
        raise AssertionError(f"the evaluator does not know condition key {key!r}")
    actual = None if actual is None else str(actual)
    return (not cond.get("values") or _any(cond["values"], actual)) and not (
        cond.get("notValues") and _any(cond["notValues"], actual))


def _rule(rule: Mapping[str, Any], call: Call) -> bool:
    unknown = set(rule) - {"from", "to", "when"}
    assert not unknown, f"the evaluator does not know rule fields {unknown}"
    return ((not rule.get("from") or any(_source(f["source"], call) for f in rule["from"]))
            and (not rule.get("to") or any(_operation(t["operation"], call) for t in rule["to"]))
            and all(_condition(c, call) for c in rule.get("when") or []))


def allowed(policies: list[dict[str, Any]], call: Call, workload_labels: Mapping[str, str]) -> bool:
    """Istio's decision for ``call`` at a workload with ``workload_labels``: a matching
    DENY rule refuses; with any ALLOW policy, one of its rules must match."""
    applying = [p for p in policies if selects((p["spec"].get("selector") or {}), workload_labels)]
    by_action: dict[str, list[dict]] = {"ALLOW": [], "DENY": []}
    for p in applying:
        action = p["spec"].get("action", "ALLOW")
        assert action in by_action, f"the evaluator does not know action {action}"
        by_action[action].append(p)
    if any(_rule(r, call) for p in by_action["DENY"] for r in p["spec"].get("rules") or []):
        return False
    if not by_action["ALLOW"]:
        return True
    return any(_rule(r, call) for p in by_action["ALLOW"] for r in p["spec"].get("rules") or [])


@dataclass(frozen=True)
class Hook:
    overlay: str
    tenant: str
    name: str
    url: str  # what the load tester calls

    def __str__(self) -> str:
        return f"{self.overlay}: {self.tenant}'s webhook {self.name} (GET {self.url}) is admitted"


def curl_url(cmd: str) -> str:
    """The URL a load tester ``curl`` command asks for (GET: no -X/-d/--data options)."""
    argv = shlex.split(cmd)
    assert argv[0] == "curl", f"the load tester runs {argv[0]!r}; teach this test its request"
    assert not {"-X", "--request", "-d", "--data", "-H", "--header"} & set(argv), cmd
    (url,) = [a for a in argv[1:] if not a.startswith("-")]
    return url


def hooks() -> list[Hook]:
    out = []
    for overlay in OVERLAYS:
        for canary in of(rendered(overlay), "Canary"):
            for hook in canary["spec"]["analysis"].get("webhooks") or []:
                if hook["type"] in LOADTESTER_HOOKS and (hook.get("metadata") or {}).get("type") == "bash":
                    out.append(Hook(overlay, canary["metadata"]["namespace"], hook["name"],
                                    curl_url(hook["metadata"]["cmd"])))
    return out


def test_every_tenant_has_a_load_tester_webhook():
    assert {(h.overlay, h.tenant) for h in hooks()} == {(o, t) for o in OVERLAYS for t in tenants(o)}


def target(docs, url: str) -> tuple[str, dict[str, str], Call]:
    """(namespace, the labels of the pods behind the URL's Service, the call) for a URL
    the load tester asks for."""
    parsed = urllib.parse.urlsplit(url)
    service, namespace = parsed.hostname.split(".")[:2]
    (svc,) = [s for s in of(docs, "Service", namespace) if s["metadata"]["name"] == service] or [
        # Flagger generates <target>-canary / -primary Services selecting app=<target>(-primary)
        {"spec": {"selector": {"app": service.removesuffix("-canary")}}}]
    labels = next(lbl for lbl in pods(docs, namespace).values() if selects({"matchLabels": svc["spec"]["selector"]}, lbl))
    return namespace, labels, Call(LOADTESTER, parsed.netloc, parsed.path or "/")


@pytest.mark.parametrize("hook", hooks(), ids=str)
def test_the_load_testers_webhook_call_is_admitted(hook):
    docs = rendered(hook.overlay)
    namespace, labels, call = target(docs, hook.url)
    assert namespace == hook.tenant, f"{hook}: calls into {namespace}, not into its own tenant"
    assert allowed(of(docs, "AuthorizationPolicy", namespace), call, labels), (
        f"{hook}: {call} is denied by the AuthorizationPolicies of {namespace}; on a cluster the check fails "
        "and no rollout ever starts")


@dataclass(frozen=True)
class Beyond:
    what: str
    change: Mapping[str, Any]

    def __str__(self) -> str:
        return f"the load tester may not {self.what}"


BEYOND = [
    Beyond("call another path", {"path": "/whoami"}),
    Beyond("call with another method", {"method": "POST"}),
    Beyond("call another workload's host", {"host": "app-ui.{ns}.svc:8501"}),
    Beyond("call the primary's host", {"host": "rag-api-primary.{ns}.svc:8080"}),
    Beyond("be impersonated by another identity of its namespace",
           {"principal": f"cluster.local/ns/{stack.FLAGGER_NAMESPACE}/sa/default"}),
    Beyond("be impersonated by a caller without identity", {"principal": ""}),
]


@pytest.mark.parametrize("beyond", BEYOND, ids=str)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_load_tester_gets_nothing_beyond_its_check(overlay, beyond):
    docs = rendered(overlay)
    for hook in (h for h in hooks() if h.overlay == overlay):
        namespace, labels, call = target(docs, hook.url)
        policies = of(docs, "AuthorizationPolicy", namespace)
        assert allowed(policies, call, labels), f"positive control: {hook}"
        changed = {k: v.format(ns=namespace) for k, v in beyond.change.items()}
        denied = Call(**{**call.__dict__, **changed})
        for workload_labels in pods(docs, namespace).values():
            assert not allowed(policies, denied, workload_labels), f"{overlay}: {denied} is allowed in {namespace}"


def test_the_standalone_backend_decides_the_load_testers_calls_as_istio_does():
    """The standalone backend's translation (fixtures/standalone/rbac.py) of the same
    policies gives Envoy RBAC that decides every call above as Istio would: the rule's
    fields are implemented there, not ignored."""
    # The Envoy RBAC evaluator of the translation tests: one reading of Envoy's semantics.
    from test_standalone_translate import Request as EnvoyRequest
    from test_standalone_translate import decide

    from fixtures.standalone.mesh import Policy
    from fixtures.standalone.rbac import rbac_filters

    docs = rendered("standalone")
    checked = 0
    for hook in (h for h in hooks() if h.overlay == "standalone"):
        namespace, labels, call = target(docs, hook.url)
        policies = of(docs, "AuthorizationPolicy", namespace)
        filters = rbac_filters([Policy(p["kind"], namespace, p["metadata"]["name"], p["spec"]) for p in policies])
        calls = [call] + [Call(**{**call.__dict__, **{k: v.format(ns=namespace) for k, v in b.change.items()}})
                          for b in BEYOND]
        for c in calls:
            envoy = decide(filters, EnvoyRequest(peer=f"spiffe://{c.principal}" if c.principal else None,
                                                 headers={":authority": c.host}, path=c.path, method=c.method))
            assert (envoy == "ALLOW") == allowed(policies, c, labels), f"{c}: Envoy {envoy}, Istio the other"
            checked += 1
    assert checked == len(tenants("standalone")) * (1 + len(BEYOND))
