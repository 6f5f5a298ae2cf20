"""PROXY protocol at the gateway, as the load balancer and everything else speak it.

Well-formed v1 and v2 headers (TCP over IPv4 and IPv6, also dribbled one byte at a time)
are accepted and the client address they carry is what the workload and the gateway's
access log see. Anything else (no header, malformed, truncated, oversized, a v2 header
with a bad signature or an unknown command) gets the connection closed: the gateway
decodes no HTTP request and sends nothing to any workload (its counters say so), and the
next client is served. A client's own x-forwarded-for is never trusted beyond the
configured number of hops.

Every test here writes its own PROXY header (or none) or chooses the client address the
gateway sees, so it needs a backend whose client stands in for the load balancer
(capability "proxy-protocol"; behind EKS's NLB they skip).

Known leniency of Envoy's parser, not tested as a refusal: a v1 port with a leading zero is
accepted, and so is a v1 line of 108 bytes (the specification's maximum is 107).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Callable

import pytest

from fixtures import diagnose
from fixtures import proxy_protocol as pp
from fixtures.platform import MissingCapability, user_headers
from fixtures.report import record
from fixtures.wait import eventually

pytestmark = [pytest.mark.standalone_required, pytest.mark.usefixtures("crafts_proxy_headers")]

LB_V4, LB_V6 = "198.51.100.1", "2001:db8::1"  # the load balancer's listening addresses


def _control(platform, tenant, headers) -> diagnose.Exchange:
    gw = platform.gateway()
    return diagnose.exchange(gw, tenant.host, preamble=diagnose.lb_header(gw), headers=headers,
                             sent=f"control: {tenant.name}'s user via the load balancer").expect_http(200)


def _log_entry(access_log, path: str) -> dict:
    entries = [e for e in access_log() if e.get("path") == path]
    assert entries, f"no gateway access log entry for {path} yet"
    return entries[-1]


def _endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@dataclass(frozen=True)
class Header:
    """A well-formed PROXY header from ``client``."""

    name: str
    client: tuple[str, int]
    build: Callable[[tuple[str, int], int], bytes] = field(compare=False)
    slow: float = 0.0

    def __str__(self) -> str:
        return f"{self.name} from {_endpoint(*self.client)} is accepted and its address used"


ACCEPTED = [
    Header("v1 TCP4", ("203.0.113.7", 41234), lambda c, port: pp.v1(c[0], LB_V4, c[1], port)),
    Header("v1 TCP6", ("2001:db8:7::7", 41235), lambda c, port: pp.v1(c[0], LB_V6, c[1], port)),
    Header("v2 TCP4", ("203.0.113.8", 41236), lambda c, port: pp.v2(c[0], LB_V4, c[1], port)),
    Header("v2 TCP6", ("2001:db8:8::8", 41237), lambda c, port: pp.v2(c[0], LB_V6, c[1], port)),
    Header("v2 TCP4 sent one byte at a time", ("203.0.113.9", 41238),
           lambda c, port: pp.v2(c[0], LB_V4, c[1], port), slow=0.01),
]


@pytest.mark.parametrize("case", ACCEPTED, ids=str)
def test_proxy_header_is_accepted_and_its_client_address_reaches_workload_and_log(platform, tenant, case, request,
                                                                                  gateway_access_log):
    gw = platform.gateway()
    path = f"/api/whoami?probe={uuid.uuid4().hex}"
    res = diagnose.exchange(gw, tenant.host, path, preamble=case.build(case.client, gw.address[1]), slow=case.slow,
                            headers=user_headers(tenant, platform.idp(tenant).token()), sent=case.name)
    record(request.node, "proxy_protocol", group="accepted", case=case.name, tenant=tenant,
           expected=f"HTTP 200, client {case.client[0]} seen by the workload and the access log", got=res)
    who = json.loads(res.expect_http(200).body)
    assert (who["tenant"], who["client_address"], who["external_address"]) == (
        tenant.name, case.client[0], case.client[0]), f"{res}: {who}"
    entry = eventually(lambda: _log_entry(gateway_access_log, path), timeout=10,
                       what=f"gateway access log entry for {path}")
    assert entry["downstream_remote_address"] == _endpoint(*case.client), entry
    assert entry["downstream_direct_remote_address"] != entry["downstream_remote_address"], entry


@dataclass(frozen=True)
class Malformed:
    """Bytes that are not a usable PROXY header, and what the client does next."""

    name: str
    data: bytes | None
    then: str = "tls"     # "tls": a ClientHello follows; "fin": the client gives up (half-close)
    slow: float = 0.0

    def __str__(self) -> str:
        return f"{self.name}: connection closed, nothing forwarded"


_V1 = pp.v1("192.0.2.10", "198.51.100.20", 40000, 443)
_V2 = pp.v2("192.0.2.10", "198.51.100.20", 40000, 443)
MALFORMED = [
    Malformed("no PROXY header", None),
    *(Malformed(f"v1 {kind}", pp.malformed_v1(kind)) for kind in (
        "address is not an IP", "port out of range", "family does not match addresses", "unknown protocol",
        "missing destination port", "double space", "bare LF", "lowercase keyword")),
    Malformed("v1 truncated before the CRLF, then the client gives up", pp.truncated(_V1, 30), then="fin"),
    Malformed("v2 truncated inside the signature, then the client gives up", pp.truncated(_V2, 8), then="fin"),
    Malformed("v2 truncated inside the addresses, then the client gives up", pp.truncated(_V2, 20), then="fin"),
    Malformed("v1 line of 214 bytes (twice the 107-byte maximum)", pp.oversized_v1(2 * pp.V1_MAX_LENGTH)),
    Malformed("v2 with a bad signature", pp.bad_signature_v2()),
    Malformed("v2 with an unknown command", pp.unknown_command_v2()),
    Malformed("v2 with a bad signature sent one byte at a time", pp.bad_signature_v2(), slow=0.01),
    Malformed("v1 with a non-IP address sent one byte at a time", pp.malformed_v1("address is not an IP"),
              slow=0.005),
]


@pytest.mark.parametrize("case", MALFORMED, ids=str)
def test_bad_proxy_header_closes_the_connection_and_reaches_no_workload(platform, tenant, case, request,
                                                                        gateway_counters):
    gw = platform.gateway()
    headers = user_headers(tenant, platform.idp(tenant).token())
    _control(platform, tenant, headers)
    before = gateway_counters()
    res = diagnose.exchange(gw, tenant.host, preamble=case.data, then=case.then, slow=case.slow,
                            headers=headers, sent=case.name)
    record(request.node, "proxy_protocol", group="malformed", case=case.name, tenant=tenant,
           expected="connection closed, nothing forwarded", got=res)
    res.expect_closed()
    moved = gateway_counters() - before
    assert (moved.tls_handshakes, moved.http_requests, moved.upstream_requests) == (0, 0, 0), \
        f"{res}; gateway counters: {moved.summary()}"
    # The gateway still serves others, and the counter that stayed still is live.
    _control(platform, tenant, headers)
    assert (gateway_counters() - before).upstream_requests == 1


@dataclass(frozen=True)
class Spoof:
    """Forwarding headers a client sets itself, behind the load balancer's PROXY header."""

    name: str
    headers: dict = field(default_factory=dict, compare=False, hash=False)

    def __str__(self) -> str:
        return f"{self.name}: the PROXY header's address is the client's"


CLIENT = ("203.0.113.77", 43000)
SPOOFS = [
    Spoof("no forwarding headers"),
    Spoof("one x-forwarded-for entry", {"x-forwarded-for": "198.51.100.99"}),
    Spoof("two x-forwarded-for entries", {"x-forwarded-for": "198.51.100.99, 192.0.2.55"}),
    Spoof("x-envoy-external-address", {"x-envoy-external-address": "198.51.100.98"}),
    Spoof("x-forwarded-for and x-envoy-external-address",
          {"x-forwarded-for": "198.51.100.99", "x-envoy-external-address": "198.51.100.98"}),
]


def _whoami(platform, tenant, extra: dict, client=CLIENT) -> dict:
    gw = platform.gateway()
    res = gw.request(tenant.host, "/api/whoami", headers={**user_headers(tenant, platform.idp(tenant).token()),
                                                          **extra}, client_address=client)
    assert res.status == 200, res.describe()
    return res.json()


@pytest.mark.parametrize("case", SPOOFS, ids=str)
def test_client_forwarding_headers_are_not_trusted(platform, tenant, case, request):
    who = _whoami(platform, tenant, case.headers)
    record(request.node, "proxy_protocol", group="forwarding headers", case=case.name, tenant=tenant,
           expected=f"client address {CLIENT[0]}", got=f"client address {who.get('external_address')}")
    claimed = [e.strip() for e in case.headers.get("x-forwarded-for", "").split(",") if e.strip()]
    assert who["external_address"] == CLIENT[0], who
    assert who["client_address"] == CLIENT[0], who
    # The client's entries are passed on to the left of the trusted one, never instead of it.
    assert who["forwarded_for"] == [*claimed, CLIENT[0]], who


@pytest.mark.chaos
def test_forwarded_for_is_trusted_up_to_the_configured_hops_and_no_further(platform, tenant):
    try:
        one_hop = platform.fault("gateway-trusted-hops", hops=1)  # before the control: unavailable skips
    except MissingCapability as exc:
        pytest.skip(str(exc))
    claimed = {"x-forwarded-for": "198.51.100.99, 192.0.2.55"}
    assert _whoami(platform, tenant, claimed)["external_address"] == CLIENT[0]   # numTrustedProxies 0
    with one_hop:
        who = _whoami(platform, tenant, claimed)
        # One hop in front of the gateway is trusted: the entry it appended is the client;
        # the entry left of it is still only a claim.
        assert who["external_address"] == "192.0.2.55", who
        assert who["forwarded_for"] == ["198.51.100.99", "192.0.2.55", CLIENT[0]], who
    assert _whoami(platform, tenant, claimed)["external_address"] == CLIENT[0]
