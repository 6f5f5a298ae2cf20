"""The fault mechanism itself: a fault changes behaviour while active, names what it
broke, and the platform is back to normal afterwards, also when the body raises."""

from __future__ import annotations

import pytest

from fixtures.platform import MissingCapability, Outcome, user_headers

pytestmark = pytest.mark.chaos


@pytest.fixture
def whoami(platform):
    tenant = platform.tenants[0]
    headers = user_headers(tenant, platform.idp(tenant).token())
    gw = platform.gateway()

    def call(**kwargs):
        return gw.request(tenant.host, "/api/whoami", headers=headers, **kwargs)
    return call


def test_fault_is_active_inside_and_reverted_after(platform, whoami):
    whoami().expect(Outcome.OK)
    with platform.fault("gateway-proxy-protocol-removed") as fault:
        assert fault.changed == [platform.model.gateway_workload.key]
        assert not fault.rejected
        whoami().expect(Outcome.RESET)                      # the NLB's header is now garbage to TLS
        whoami(proxy_header=None).expect(Outcome.OK)        # a client without one gets through
    whoami().expect(Outcome.OK)
    whoami(proxy_header=None).expect(Outcome.RESET)         # strict again


def test_fault_is_reverted_when_the_body_fails(platform, whoami):
    with pytest.raises(RuntimeError, match="inside the fault"):
        with platform.fault("gateway-proxy-protocol-twice"):
            raise RuntimeError("inside the fault")
    whoami().expect(Outcome.OK)


def test_rejected_config_is_reported_with_the_proxy_log(platform, whoami):
    with platform.fault("gateway-proxy-protocol-without-typed-config") as fault:
        (key, log), = fault.rejected.items()
        assert key == platform.model.gateway_workload.key
        assert "exited with code" in log
        whoami().expect(Outcome.RESET)
    whoami().expect(Outcome.OK)


def test_killed_app_is_restarted_after(platform, whoami):
    with platform.fault("workload-app-killed", tenant=platform.tenants[0].name):
        whoami().expect(Outcome.UPSTREAM_ERROR)
    whoami().expect(Outcome.OK)


def test_unknown_fault_names_the_implemented_ones(platform):
    with pytest.raises(MissingCapability, match="gateway-proxy-protocol-removed"):
        platform.fault("no-such-fault")
