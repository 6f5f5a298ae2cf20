"""What canary analysis stands on: Prometheus scrapes every proxy of the platform, and a
tenant's traffic through the gateway shows up under that tenant's service and no other."""

from __future__ import annotations

import pytest

from fixtures.platform import Outcome, user_headers
from fixtures.wait import eventually

pytestmark = pytest.mark.standalone_required


def test_prometheus_scrapes_every_proxy(platform):
    """The gateway and every tenant's serving sidecars (rag-api's primary, app-ui) are
    scraped and up, and no scraped proxy of the platform is down. rag-api itself is the
    Canary's target: on a cluster Flagger keeps it at zero replicas between rollouts; where
    its sidecar runs (standalone, or during a rollout) it counts like the others."""
    prom = platform.metrics()
    namespaces = {"istio-system"} | {t.namespace for t in platform.tenants}
    expected = {"istio-ingressgateway.istio-system"} | {
        f"{app}.{t.namespace}" for t in platform.tenants for app in ("rag-api-primary", "app-ui")}

    def all_up():
        up = {f"{r['metric'].get('workload', '<no workload label>')}.{r['metric']['namespace']}": r["value"][1]
              for r in prom.query("up") if r["metric"].get("namespace") in namespaces}
        missing = sorted(k for k in expected if k not in up)
        down = sorted(k for k, v in up.items() if v != "1")
        assert not missing and not down, f"not scraped: {missing}; down: {down}; up={up}"
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
