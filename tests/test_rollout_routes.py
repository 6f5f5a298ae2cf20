"""The traffic split of the standalone rollout engine: Flagger's generated VirtualService as
two gateway routes, and the weight moved at runtime on a live gateway without a restart
and without closing a client's connection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures import proxy_protocol
from fixtures.client import _ProxiedHTTPSConnection, default_context
from fixtures.platform import user_headers
from fixtures.standalone.backend import StandalonePlatform
from fixtures.standalone.gateway_routes import canary_runtime_key
from fixtures.wait import eventually

PLATFORM = Path(__file__).resolve().parents[1] / "platform"



def test_each_canary_is_a_runtime_fraction_route_before_its_primary(prepared: StandalonePlatform) -> None:
    cfg = json.loads(prepared.configs[prepared.model.gateway_workload.key].read_text())
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    assert prepared.model.canaries
    for c in prepared.model.canaries:
        tenant = prepared.model.tenant(c.namespace)
        [vhost] = [v for v in hcm["route_config"]["virtual_hosts"] if tenant.host in v["domains"]]
        api = [r for r in vhost["routes"] if r["match"]["prefix"] == "/api/"]
        assert [r["name"].rsplit("/", 1)[-1] for r in api] == ["canary", "primary"]
        canary, primary = api
        assert canary["match"]["runtime_fraction"] == {
            "default_value": {"numerator": 0, "denominator": "HUNDRED"},
            "runtime_key": canary_runtime_key(c.namespace, c.name)}
        target = c.spec["targetRef"]["name"]
        assert canary["route"]["cluster"] == f"outbound|8080||{target}-canary.{c.namespace}.svc.cluster.local"
        assert primary["route"]["cluster"] == f"outbound|8080||{target}-primary.{c.namespace}.svc.cluster.local"
        assert canary["route"]["prefix_rewrite"] == primary["route"]["prefix_rewrite"] == "/"
        # Both sides over mTLS to the tenant's own identity, checked against its own CA.
        for name in (canary["route"]["cluster"], primary["route"]["cluster"]):
            validation = clusters[name]["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
            assert validation["trusted_ca"]["filename"] == str(prepared.pki.namespace_roots[c.namespace])
            assert [m["matcher"]["exact"] for m in validation["match_typed_subject_alt_names"]] == [
                f"spiffe://cluster.local/ns/{c.namespace}/sa/{prepared.model.workload(c.namespace, target).service_account}"]


def test_canary_workload_has_a_sidecar_but_no_app_until_a_rollout(prepared: StandalonePlatform) -> None:
    for c in prepared.model.canaries:
        target = prepared.model.workload(c.namespace, c.spec["targetRef"]["name"])
        primary = prepared.model.workload(c.namespace, f"{target.name}-primary")
        assert (target.role, primary.role) == ("canary", "primary")
        assert primary.service_account == target.service_account
        assert primary.labels["app"] == f"{target.name}-primary"
        assert prepared.runtime.ports[target.key].inbound and prepared.runtime.ports[primary.key].inbound
        apex = prepared.model.service(target.name, c.namespace)
        assert prepared.model.endpoints(apex) == [primary]


class _Counting(_ProxiedHTTPSConnection):
    """A keep-alive connection to the gateway that counts how often it had to connect."""

    connects = 0

    def connect(self) -> None:
        type(self).connects += 1
        super().connect()


@pytest.mark.slow
def test_weight_moves_at_runtime_on_an_open_connection(platform) -> None:
    platform.requires("rollout")
    tenant = platform.tenants[0]
    gw = platform.gateway()
    headers = {"host": tenant.host, **user_headers(tenant, platform.idp(tenant).token())}
    gateway = platform.supervisor.processes[f"envoy:{platform.model.gateway_workload.key}"]
    pid, restarts = gateway.pid, gateway.restarts
    preamble = proxy_protocol.v2("203.0.113.7", gw.address[0], 41234, gw.address[1]) if gw.expects_proxy_protocol else None
    conn = _Counting(gw.address, sni=tenant.host, context=default_context(gw.ca_bundle), preamble=preamble, timeout=10)

    def versions(n: int) -> set[str]:
        seen = set()
        for _ in range(n):
            conn.request("GET", "/api/whoami", headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, body[:300]
            seen.add(json.loads(body)["version"])
        return seen

    _Counting.connects = 0
    with platform.rollout(tenant, "rag-api", "9.9.9-runtime") as rollout:
        [original] = versions(10)
        rollout.start_canary()
        eventually(lambda: rollout.canary_ready()[0], timeout=30, what="canary ready")
        assert versions(10) == {original}               # weight 0: the canary is up, not routed
        rollout.set_weight(100)
        assert versions(10) == {"9.9.9-runtime"}
        rollout.set_weight(50)
        assert versions(60) == {original, "9.9.9-runtime"}
        rollout.set_weight(0)
        assert versions(10) == {original}
    conn.close()
    assert _Counting.connects == 1, "the gateway closed the client's connection while the weight moved"
    assert (gateway.pid, gateway.restarts) == (pid, restarts), "the gateway was restarted"
    assert not platform.supervisor.processes[f"app:{rollout.canary.key}"].running(), "the canary was left running"
