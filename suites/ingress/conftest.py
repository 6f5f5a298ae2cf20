"""Fixtures of the ingress suite: the gateway's own evidence (its Envoy counters and access
log), for backends that can read it."""

from __future__ import annotations

from typing import Callable

import pytest

from fixtures import diagnose
from fixtures.platform import MissingCapability


@pytest.fixture
def gateway_counters(platform) -> Callable[[], diagnose.Counters]:
    """``gateway_counters()``: the gateway's Envoy counters now, read by meaning
    (:class:`fixtures.diagnose.Counters`). Read once at set-up: where the backend cannot
    read them (MissingCapability), the test skips with that reason before sending anything."""
    gw = platform.gateway()
    try:
        gw.stats()
    except MissingCapability as exc:
        pytest.skip(str(exc))
    return lambda: diagnose.Counters(gw.stats())


@pytest.fixture
def gateway_access_log(platform) -> Callable[[], list[dict]]:
    """``gateway_access_log()``: the gateway's access log so far, one dict per request.
    Read once at set-up: where the backend cannot read it (MissingCapability), the test
    skips with that reason before sending anything."""
    gw = platform.gateway()
    try:
        gw.access_log()
    except MissingCapability as exc:
        pytest.skip(str(exc))
    return gw.access_log


@pytest.fixture
def crafts_proxy_headers(requires) -> None:
    """For tests that write their own PROXY headers (or none) or choose the client address
    the gateway sees: only where the suite's client stands in for the load balancer
    (capability "proxy-protocol"); behind a real NLB the test skips with the reason."""
    requires("proxy-protocol")
