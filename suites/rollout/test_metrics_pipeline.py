"""What canary analysis stands on: Prometheus scrapes every proxy of the platform, and a
tenant's traffic through the gateway shows up under that tenant's service and no other."""

from __future__ import annotations

import pytest

from fixtures.platform import Outcome, user_headers
from fixtures.wait import eventually

pytestmark = pytest.mark.standalone_required


def test_prometheus_scrapes_every_proxy(platform):
    prom = platform.metrics()
    # the gateway and one sidecar per workload of every tenant
    # (rag-api is a Canary's target: its primary serves, its own sidecar waits for a rollout)
    expected = {"istio-ingressgateway.istio-system"} | {
        f"{app}.{t.namespace}" for t in platform.tenants for app in ("rag-api", "rag-api-primary", "app-ui")}

    def all_up():
        up = {r["metric"]["workload"] + "." + r["metric"]["namespace"]: r["value"][1] for r in prom.query("up")}
        missing = {k for k in expected if up.get(k) != "1"}
        assert not missing, f"not scraped or down: {sorted(missing)}; up={up}"
        return up

    eventually(all_up, timeout=30, what="every Envoy scraped and up")


def test_tenant_traffic_is_counted_under_its_own_workload(platform, tenant):
    """Istio's standard metric (recorded from the sidecars' own stats on standalone) counts
    a tenant's requests under the workload that served them: its rag-api primary."""
    prom = platform.metrics()
    query = ('sum(istio_requests_total{reporter="destination",destination_workload="rag-api-primary",'
             f'destination_workload_namespace="{tenant.namespace}",response_code="200"}})')

    def count() -> float:
        result = prom.query(query)
        return float(result[0]["value"][1]) if result else 0.0

    before = count()
    headers = user_headers(tenant, platform.idp(tenant).token())
    for _ in range(5):
        platform.gateway().request(tenant.host, "/api/whoami", headers=headers).expect(Outcome.OK)

    def grew() -> float:
        now = count()
        assert now >= before + 5, f"{query}: {before} -> {now}"
        return now

    eventually(grew, timeout=30, what=f"istio_requests_total of {tenant.namespace}/rag-api-primary")
