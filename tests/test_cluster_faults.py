"""The cluster faults and the gateway's Envoy readings against fake kubectl: each fault
yields what the standalone faults yield, waits until the proxies or pods show the change
(not only the API server), and restores what the cluster had; the gateway's counters,
server info and access log are read from its pods, and what a cluster does not provide is
a MissingCapability naming it."""

from __future__ import annotations

import json
import types

import pytest
import yaml

from fixtures.cluster import faults
from fixtures.cluster.callers import ClusterGateway, access_log_entries, access_log_problem, parse_stats
from fixtures.cluster.commands import CommandError, Recorder
from fixtures.cluster.fakes import READY_DEPLOYMENTS, UNREADY_DEPLOYMENTS, FakeTools
from fixtures.cluster.kubectl import Kubectl
from fixtures.platform import MissingCapability
from fixtures.standalone.envoy_config import ACCESS_LOG_FORMAT

NS = "tenanta"
SELECTOR = "app in (rag-api,rag-api-primary)"
CONFIG_DUMP = "config_dump?resource=dynamic_listeners"


@pytest.fixture
def fakes(tmp_path) -> FakeTools:
    f = FakeTools(tmp_path / "fakes")
    f.install("kubectl")
    return f


def kubectl_of(fakes: FakeTools) -> Kubectl:
    return Kubectl(fakes.runner(), str(fakes.root / "bin" / "kubectl"), "ctx", poll_interval=0.01)


def platform_of(fakes: FakeTools, rendered: list[dict] | None = None):
    """What the faults use of a cluster platform: its kubectl, tenants and render."""
    return types.SimpleNamespace(kubectl=kubectl_of(fakes), tenants=[types.SimpleNamespace(name=NS, namespace=NS)],
                                 manifests=lambda: json.loads(json.dumps(rendered or [])))


def pod(name: str, *, ready: bool = True, deleting: bool = False, labels: dict | None = None,
        proxy: bool = True) -> dict:
    meta = {"name": name, "labels": labels or {"app": "rag-api"}}
    if deleting:
        meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    containers = [{"name": "app"}] + ([{"name": "istio-proxy"}] if proxy else [])
    return {"metadata": meta, "spec": {"containers": containers},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": str(ready)}]}}


def pods(*items: dict) -> dict:
    return {"stdout": json.dumps({"kind": "List", "items": list(items)})}


def kubectl_argvs(fakes: FakeTools) -> list[list[str]]:
    return [a[2:] for a in fakes.argvs("kubectl")]  # without --context ctx


def patches(fakes: FakeTools) -> list[dict]:
    return [json.loads(a[a.index("-p") + 1]) for a in kubectl_argvs(fakes) if a[0] == "patch"]


# --- the gateway's PROXY protocol setting -----------------------------------------------------

def gateway_deployment(annotations: dict | None) -> str:
    meta = {"annotations": annotations} if annotations is not None else {}
    return json.dumps({"spec": {"template": {"metadata": meta}}})


def test_the_gateway_fault_yields_what_standalone_faults_yield_and_waits_for_each_rollout(fakes):
    topology = '{"gatewayTopology":{"numTrustedProxies":0,"proxyProtocol":{}}}'
    fakes.on("kubectl", "get", "deployment", "istio-ingressgateway",
             stdout=gateway_deployment({faults.PROXY_CONFIG: topology}))
    # each rollout is seen incomplete once: the fault must not return before it completes
    rollout = [{"stdout": UNREADY_DEPLOYMENTS}, {"stdout": READY_DEPLOYMENTS}]
    fakes.sequence("kubectl", "get", "deployments", answers=rollout + rollout)
    plat = platform_of(fakes)
    with faults.FAULTS["gateway-proxy-protocol-removed"](plat) as fault:
        polls_inside = len([a for a in kubectl_argvs(fakes) if a[:2] == ["get", "deployments"]])
        assert fault.rejected == {} and fault.changed == ["istio-system/istio-ingressgateway"]
        assert "PROXY protocol removed" in fault.what
    assert polls_inside == 2
    assert len([a for a in kubectl_argvs(fakes) if a[:2] == ["get", "deployments"]]) == 4
    values = [p["spec"]["template"]["metadata"]["annotations"][faults.PROXY_CONFIG] for p in patches(fakes)]
    assert values == ['{"gatewayTopology":{"numTrustedProxies":0}}', topology]


def test_an_absent_annotation_is_removed_again_not_restored_as_an_empty_config(fakes):
    fakes.on("kubectl", "get", "deployment", "istio-ingressgateway", stdout=gateway_deployment(None))
    fakes.on("kubectl", "get", "deployments", stdout=READY_DEPLOYMENTS)
    with faults.FAULTS["gateway-proxy-protocol-removed"](platform_of(fakes)):
        pass
    values = [p["spec"]["template"]["metadata"]["annotations"][faults.PROXY_CONFIG] for p in patches(fakes)]
    assert values == ["{}", None]  # null removes the key in a strategic merge patch


def test_the_gateway_is_restored_when_its_first_rollout_never_completes(fakes):
    fakes.on("kubectl", "get", "deployment", "istio-ingressgateway", stdout=gateway_deployment(
        {faults.PROXY_CONFIG: '{"gatewayTopology":{"proxyProtocol":{}}}'}))
    plat = platform_of(fakes)
    calls = []

    def wait_deployments(namespace, **kw):
        calls.append(namespace)
        if len(calls) == 1:
            raise CommandError("every Deployment in istio-system available: did not succeed within 300s")

    plat.kubectl.wait_deployments = wait_deployments
    with pytest.raises(CommandError, match="did not succeed"):
        with faults.FAULTS["gateway-proxy-protocol-removed"](plat):
            pytest.fail("the body must not run when the change never completed")
    assert len(patches(fakes)) == 2 and calls == ["istio-system", "istio-system"]


# --- the tenants' AuthorizationPolicies ----------------------------------------------------------

RENDERED_POLICY = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                   "metadata": {"name": "tenant-isolation", "namespace": NS},
                   "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": [NS]}}]}]}}
# What the cluster runs differs from the local render (Flux delivered a later revision).
LIVE_POLICY = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
               "metadata": {"name": "tenant-isolation", "namespace": NS, "uid": "0b1c", "resourceVersion": "4711",
                            "generation": 3, "creationTimestamp": "2025-01-01T00:00:00Z",
                            "managedFields": [{"manager": "kustomize-controller"}],
                            "labels": {"kustomize.toolkit.fluxcd.io/name": "tenant-tenanta"}},
               "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": [NS]}}]},
                                                     {"from": [{"source": {"principals": ["a/b/c"]}}]}]},
               "status": {"validationMessages": []}}
UI_ONLY_POLICY = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                  "metadata": {"name": "ui-only", "namespace": NS},
                  "spec": {"selector": {"matchLabels": {"app": "app-ui"}}, "rules": [{}]}}
NAMES = ["ns[tenanta]-policy[tenant-isolation]-rule[0]", "ns[tenanta]-policy[tenant-isolation]-rule[1]"]


def listeners_with(*names: str, warming: tuple[str, ...] = ()) -> dict:
    def state(policy_names):
        return {"listener": {"name": "virtualInbound", "filter_chains": [{"filters": [{"typed_config": {
            "http_filters": [{"name": "envoy.filters.http.rbac", "typed_config": {
                "rules": {"policies": {n: {"permissions": [{"any": True}]} for n in policy_names}}}}]}}]}]}}
    entry = {"name": "virtualInbound", "active_state": state(names)}
    if warming:
        entry["warming_state"] = state(warming)
    return {"stdout": json.dumps({"configs": [entry]})}


def test_authz_off_waits_for_the_sidecars_and_restores_the_live_objects(fakes):
    fakes.on("kubectl", "get", "authorizationpolicy", NS, stdout=json.dumps({"kind": "List", "items": [LIVE_POLICY]}))
    fakes.on("kubectl", "get", "pods", NS, **pods(pod("rag-api-1"), pod("no-sidecar", proxy=False),
                                                  pod("old", deleting=True), pod("starting", ready=False)))
    # Entry: the sidecar still enforces the policy once (istiod has not pushed yet), then a
    # warming listener without it does not count either. Exit: absent once more, then back.
    fakes.sequence("kubectl", "exec", "rag-api-1", CONFIG_DUMP, answers=[
        listeners_with(*NAMES), listeners_with(*NAMES, warming=("x",)), listeners_with(),
        listeners_with(warming=tuple(NAMES)), listeners_with(*NAMES)])
    plat = platform_of(fakes, rendered=[RENDERED_POLICY])
    with faults.FAULTS["authz-policy-off"](plat, tenant=NS) as fault:
        inside = len(fakes.argvs("kubectl"))
        assert fault.rejected == {} and fault.changed == [f"{NS}/rag-api-1"]
    calls = kubectl_argvs(fakes)
    execs = [a for a in calls if a[0] == "exec"]
    assert execs[0] == ["exec", "-n", NS, "rag-api-1", "-c", "istio-proxy", "--", "pilot-agent", "request", "GET",
                        CONFIG_DUMP]
    assert len(execs) == 5 and len([a for a in calls[:inside] if a[0] == "exec"]) == 3
    delete = next(c for c in fakes.calls("kubectl") if "delete" in c["argv"])
    apply = next(c for c in fakes.calls("kubectl") if "apply" in c["argv"])
    assert "-f" in delete["argv"] and "tenant-isolation" in delete["stdin"]
    [restored] = list(yaml.safe_load_all(apply["stdin"]))
    expected = json.loads(json.dumps(LIVE_POLICY))
    expected.pop("status")
    for key in ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields"):
        expected["metadata"].pop(key)
    assert restored == expected  # the live object, two rules and Flux's label: not the render
    order = [a[0] for a in calls if a[0] in ("delete", "exec", "apply")]
    assert order == ["delete", "exec", "exec", "exec", "apply", "exec", "exec"]


def test_authz_off_waits_only_on_the_pods_a_policy_selects(fakes):
    fakes.on("kubectl", "get", "authorizationpolicy", NS, stdout=json.dumps({"items": [UI_ONLY_POLICY]}))
    fakes.on("kubectl", "get", "pods", NS, **pods(pod("rag-api-1"), pod("app-ui-1", labels={"app": "app-ui"})))
    fakes.sequence("kubectl", "exec", "app-ui-1", CONFIG_DUMP, answers=[
        listeners_with(), listeners_with("ns[tenanta]-policy[ui-only]-rule[0]")])
    with faults.FAULTS["authz-policy-off"](platform_of(fakes), tenant=NS) as fault:
        assert fault.changed == [f"{NS}/app-ui-1"]
    assert [a[3] for a in kubectl_argvs(fakes) if a[0] == "exec"] == ["app-ui-1", "app-ui-1"]


def test_authz_off_fails_naming_the_rules_a_sidecar_keeps_and_still_restores(fakes, monkeypatch):
    monkeypatch.setattr(faults, "PUSH_TIMEOUT", 0.3)
    fakes.on("kubectl", "get", "authorizationpolicy", NS, stdout=json.dumps({"items": [LIVE_POLICY]}))
    fakes.on("kubectl", "get", "pods", NS, **pods(pod("rag-api-1")))
    fakes.on("kubectl", "exec", "rag-api-1", CONFIG_DUMP, **listeners_with(*NAMES))
    with pytest.raises(CommandError, match=r"still enforced: ns\[tenanta\]-policy\[tenant-isolation\]-rule\[0\]"):
        with faults.FAULTS["authz-policy-off"](platform_of(fakes), tenant=NS):
            pytest.fail("the body must not run while the sidecar still enforces the policy")
    assert any("apply" in a for a in fakes.argvs("kubectl"))


def test_a_rule_index_is_matched_whole():
    assert faults.rbac_policy_names(LIVE_POLICY) == NAMES
    text = faults.names_in_listeners(json.loads(listeners_with("ns[tenanta]-policy[tenant-isolation]-rule[10]")
                                                ["stdout"]))
    assert 'rule[10]"' in text and 'rule[1]"' not in text


def test_the_dry_run_plan_shows_the_rendered_policies_deleted_and_restored():
    rec = Recorder()
    plat = types.SimpleNamespace(kubectl=Kubectl(rec, "kubectl", "ctx"), tenants=[types.SimpleNamespace(
        name=NS, namespace=NS)], manifests=lambda: [json.loads(json.dumps(RENDERED_POLICY))])
    with faults.FAULTS["authz-policy-off"](plat, tenant=NS):
        pass
    whats = [c.what for c in rec.commands()]
    assert whats.index(f"delete AuthorizationPolicies in ['{NS}']") < whats.index("restore the AuthorizationPolicies")


# --- a crashed app -----------------------------------------------------------------------------------

def test_a_killed_app_is_down_inside_the_block_and_replaced_after_it(fakes):
    fakes.sequence("kubectl", "get", "pods", SELECTOR, answers=[
        pods(pod("old-1")),                                           # what is killed
        pods(pod("old-1", deleting=True)),                            # marked, still serving
        pods(pod("old-1", deleting=True, ready=False), pod("new-1", ready=False)),   # down
        pods(pod("old-1", deleting=True, ready=False), pod("new-1")),  # exit: old not gone yet
        pods(pod("new-1"))])
    fakes.sequence("kubectl", "get", "deployments", answers=[{"stdout": UNREADY_DEPLOYMENTS},
                                                             {"stdout": READY_DEPLOYMENTS}])
    with faults.FAULTS["workload-app-killed"](platform_of(fakes), tenant=NS) as fault:
        seen = [a for a in kubectl_argvs(fakes) if SELECTOR in a]
        assert fault.rejected == {} and fault.changed == [f"{NS}/old-1"]
    assert [a[0] for a in seen] == ["get", "delete", "get", "get"]
    assert seen[1] == ["delete", "pods", "-n", NS, "-l", SELECTOR, "--wait=false"]
    assert len([a for a in kubectl_argvs(fakes) if SELECTOR in a and a[0] == "get"]) == 5
    assert len([a for a in kubectl_argvs(fakes) if a[:2] == ["get", "deployments"]]) == 2


def test_killing_an_app_that_has_no_pod_is_an_error(fakes):
    fakes.on("kubectl", "get", "pods", SELECTOR, **pods())
    with pytest.raises(AssertionError, match="no rag-api pod"):
        with faults.FAULTS["workload-app-killed"](platform_of(fakes), tenant=NS):
            pass
    assert not [a for a in kubectl_argvs(fakes) if a[0] == "delete"]


# --- the gateway's Envoy --------------------------------------------------------------------------------

GW_PODS = pods(pod("gw-a", labels={"istio": "ingressgateway"}), pod("gw-b", labels={"istio": "ingressgateway"}),
               pod("gw-old", deleting=True, labels={"istio": "ingressgateway"}))
STATS = ("listener.0.0.0.0_8443.downstream_cx_total: {cx}\n"
         "listener.admin.downstream_cx_total: 50\n"
         "http.outbound_0.0.0.0_8443.downstream_rq_total: {rq}\n"
         "cluster.outbound|8080||app-ui.tenanta.svc.cluster.local.upstream_rq_total: {rq}\n"
         "proxy_proto.versions.v2.found: {cx}\n"
         "cluster.outbound|8080||app-ui.tenanta.svc.cluster.local.upstream_rq_time: P0(nan,1) P25(nan,2)\n")
MINIMAL_STATS = "cluster_manager.cds.update_success: 3\nserver.live: 1\nlistener_manager.total_listeners_active: 2\n"


def gateway(fakes: FakeTools, **kw) -> ClusterGateway:
    fakes.on("kubectl", "get", "pods", "istio=ingressgateway", **GW_PODS)
    return ClusterGateway(("127.0.0.1", 31443), fakes.root / "ca.pem", True, kubectl=kubectl_of(fakes), **kw)


def test_stats_are_summed_over_the_ready_gateway_pods(fakes):
    fakes.on("kubectl", "exec", "gw-a", "stats", stdout=STATS.format(cx=3, rq=2))
    fakes.on("kubectl", "exec", "gw-b", "stats", stdout=STATS.format(cx=4, rq=1))
    stats = gateway(fakes).stats()
    assert stats["listener.0.0.0.0_8443.downstream_cx_total"] == 7
    assert stats["cluster.outbound|8080||app-ui.tenanta.svc.cluster.local.upstream_rq_total"] == 3
    assert stats["listener.admin.downstream_cx_total"] == 100
    assert not any(k.endswith("upstream_rq_time") for k in stats)
    execs = [a for a in kubectl_argvs(fakes) if a[0] == "exec"]
    assert execs == [["exec", "-n", "istio-system", p, "-c", "istio-proxy", "--", "pilot-agent", "request", "GET",
                      "stats"] for p in ("gw-a", "gw-b")]


def test_istios_minimal_stats_are_a_missing_capability_naming_the_setting(fakes):
    fakes.on("kubectl", "exec", "stats", stdout=MINIMAL_STATS)
    with pytest.raises(MissingCapability, match=r"gateway-stats: .*listener.*proxyStatsMatcher"):
        gateway(fakes).stats()


def test_a_gateway_without_kubectl_is_a_missing_capability_not_an_attribute_error(tmp_path):
    gw = ClusterGateway(("nlb", 443), tmp_path / "ca.pem", True, load_balancer_writes_proxy_header=True)
    for read in (gw.stats, gw.server_info, gw.access_log):
        with pytest.raises(MissingCapability, match="without kubectl"):
            read()


def test_a_failed_exec_fails_like_an_assertion(fakes):
    fakes.on("kubectl", "exec", "stats", stderr="error: unable to upgrade connection\n", exit=1)
    with pytest.raises(AssertionError, match="unable to upgrade connection"):
        gateway(fakes).stats()


def test_server_info_is_the_first_ready_pods(fakes):
    fakes.on("kubectl", "exec", "gw-a", "server_info", stdout=json.dumps({"version": "abc/1.36.2/Clean/RELEASE"}))
    assert gateway(fakes).server_info() == {"version": "abc/1.36.2/Clean/RELEASE"}


def access_logging(json_format: dict | None = None, *, path: str = "/dev/stdout") -> dict:
    fmt = {"json_format": json_format} if json_format is not None else {"text_format_source": {"inline_string": "x"}}
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                    "HttpConnectionManager",
           "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
               "path": path, "log_format": fmt}}]}
    return {"configs": [{"name": "0.0.0.0_8443", "active_state": {"listener": {"filter_chains": [
        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}}}]}


def entry(start: str, path: str) -> str:
    return json.dumps({**{k: None for k in ACCESS_LOG_FORMAT}, "start_time": start, "path": path})


def test_access_log_is_the_json_entries_of_every_gateway_pod_oldest_first(fakes):
    fakes.on("kubectl", "exec", "gw-a", CONFIG_DUMP, stdout=json.dumps(access_logging(dict(ACCESS_LOG_FORMAT))))
    fakes.on("kubectl", "logs", "gw-a", stdout="\n".join([
        "2025-01-01T00:00:00.000000Z\tinfo\tEnvoy proxy is ready",
        entry("2025-01-01T00:00:03.000Z", "/a3"),
        '{"level":"info","time":"2025-01-01T00:00:04Z","msg":"pilot-agent logging as JSON"}',
        "{not json at all", ""]))
    fakes.on("kubectl", "logs", "gw-b", stdout=entry("2025-01-01T00:00:01.000Z", "/b1") + "\n")
    gw = gateway(fakes)
    assert [e["path"] for e in gw.access_log()] == ["/b1", "/a3"]
    gw.access_log()
    logs = [a for a in kubectl_argvs(fakes) if a[0] == "logs"]
    assert logs[:2] == [["logs", "-n", "istio-system", p, "-c", "istio-proxy"] for p in ("gw-a", "gw-b")]
    assert len([a for a in kubectl_argvs(fakes) if CONFIG_DUMP in a]) == 1  # the format is checked once


@pytest.mark.parametrize("dump, says", [
    (access_logging(None), "text"),
    (access_logging({k: v for k, v in ACCESS_LOG_FORMAT.items() if k != "downstream_direct_remote_address"}),
     "JSON without downstream_direct_remote_address"),
    (access_logging(dict(ACCESS_LOG_FORMAT), path="/dev/null"), "no access log to its standard output"),
], ids=["text format", "a field missing", "not on standard output"])
def test_an_access_log_the_suite_cannot_read_is_a_missing_capability(fakes, dump, says):
    fakes.on("kubectl", "exec", "gw-a", CONFIG_DUMP, stdout=json.dumps(dump))
    with pytest.raises(MissingCapability, match="gateway-access-log") as err:
        gateway(fakes).access_log()
    assert says in str(err.value)
    assert not [a for a in kubectl_argvs(fakes) if a[0] == "logs"]


def test_the_parsers_keep_only_what_they_should():
    assert parse_stats("a.b: 1\nc: P0(nan,1) P25(1,2)\nd.e: 12\n") == {"a.b": 1, "d.e": 12}
    assert access_log_problem(access_logging(dict(ACCESS_LOG_FORMAT))) is None
    assert access_log_entries('{"start_time": "x"}\n' + entry("t", "/p")) == [json.loads(entry("t", "/p"))]
