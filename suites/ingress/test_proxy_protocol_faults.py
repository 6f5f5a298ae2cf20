"""The PROXY-protocol failures seen in the field (REFERENCE.md), reproduced on the
gateway one at a time and named by the diagnosis in words a platform engineer knows.

Each fault is gateway-wide, so one tenant's host is enough to probe it. Before each
fault the diagnosis of the healthy gateway is the control; during it, whichever client
the broken gateway still serves proves it is up; after it, the gateway serves the load
balancer's clients again.

The diagnosis sends its own PROXY headers (none, one, two), which needs a backend whose
client stands in for the load balancer (capability "proxy-protocol"). A fault the backend
cannot inject skips the test before the healthy gateway is probed.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from fixtures import diagnose
from fixtures.diagnose import Finding
from fixtures.platform import MissingCapability, user_headers
from fixtures.report import record

pytestmark = [pytest.mark.standalone_required, pytest.mark.usefixtures("crafts_proxy_headers")]


@dataclass(frozen=True)
class FieldFailure:
    fault: str
    finding: Finding
    says: str                         # the verdict must read this
    still_served: str | None = None   # the client the broken gateway still serves, if any

    def __str__(self) -> str:
        return f"{self.fault} is diagnosed as '{self.finding.value}'"


FAILURES = [
    FieldFailure("gateway-proxy-protocol-removed", Finding.NOT_PARSED,
                 "gateway does not parse PROXY protocol: client sent PROXY v2, TLS handshake failed",
                 still_served="no PROXY header"),
    FieldFailure("gateway-proxy-protocol-without-typed-config", Finding.LISTENER_DOWN,
                 "a listener filter without typed_config"),
    FieldFailure("gateway-proxy-protocol-twice", Finding.PARSED_TWICE,
                 "PROXY protocol filter inserted twice: client sent PROXY v2, TLS handshake failed",
                 still_served="two PROXY headers"),
    FieldFailure("gateway-proxy-protocol-after-tls-inspector", Finding.AFTER_TLS_INSPECTOR,
                 "the gateway parsed the PROXY header but matched no filter chain"),
    FieldFailure("gateway-proxy-protocol-optional", Finding.OPTIONAL,
                 "client sent no PROXY header, HTTP 200", still_served="no PROXY header"),
]


@pytest.mark.chaos
@pytest.mark.parametrize("case", FAILURES, ids=str)
def test_field_failure_is_named_by_the_diagnosis(platform, case, request):
    try:
        broken = platform.fault(case.fault)
    except MissingCapability as exc:
        pytest.skip(str(exc))
    tenant = platform.tenants[0]
    gw = platform.gateway()
    headers = user_headers(tenant, platform.idp(tenant).token())
    healthy = diagnose.diagnose(gw, tenant.host, headers=headers)
    assert healthy.finding is Finding.STRICT, f"control, before the fault:\n{healthy}"
    with broken as fault:
        # What the control plane reports of a rejected configuration (istiod: the NACK).
        proxy_log = "\n".join((getattr(fault, "rejected", None) or {}).values())
        found = diagnose.diagnose(gw, tenant.host, headers=headers, proxy_log=proxy_log)
        record(request.node, "proxy_protocol", group="field failure", case=case.fault, tenant=tenant,
               expected=case.finding, got=found.verdict)
        assert found.finding is case.finding, str(found)
        assert case.says in found.verdict, str(found)
        if case.still_served == "no PROXY header":
            diagnose.exchange(gw, tenant.host, headers=headers, sent="control: no PROXY header").expect_http(200)
        elif case.still_served == "two PROXY headers":
            twice = diagnose.lb_header(gw) * 2
            diagnose.exchange(gw, tenant.host, preamble=twice, headers=headers,
                              sent="control: two PROXY headers").expect_http(200)
    after = diagnose.diagnose(gw, tenant.host, headers=headers)
    assert after.finding is Finding.STRICT, f"after the fault was reverted:\n{after}"


def test_strict_parsing_refuses_in_cluster_callers_without_a_header(platform, tenant, request):
    """Not a misconfiguration but its consequence: a caller inside the cluster that talks
    to the gateway service directly (an OAuth callback, a health check) sends no PROXY
    header, and the strict gateway closes its connection."""
    gw = platform.gateway()
    headers = user_headers(tenant, platform.idp(tenant).token())
    diagnose.exchange(gw, tenant.host, preamble=diagnose.lb_header(gw), headers=headers,
                      sent="control: via the load balancer").expect_http(200)
    res = diagnose.exchange(gw, tenant.host, headers=headers, sent="in-cluster caller, no PROXY header")
    record(request.node, "proxy_protocol", group="in-cluster caller", case="no PROXY header", tenant=tenant,
           expected="connection closed (strict PROXY protocol)", got=res)
    res.expect_closed()
    found = diagnose.diagnose(gw, tenant.host, headers=headers)
    assert found.finding is Finding.STRICT, str(found)
    assert "gateway requires PROXY protocol: client sent no PROXY header, TLS handshake failed" in found.verdict, \
        str(found)
