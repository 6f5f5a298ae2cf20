"""The ingress diagnosis on its own: how an exchange is described, what the counters
mean, and which verdict each combination of observations gets. The end-to-end proof
that each real fault is named correctly is suites/ingress/test_proxy_protocol_faults.py."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from fixtures import diagnose
from fixtures.certs import CertificateAuthority
from fixtures.diagnose import Counters, Exchange, Finding, Probe, classify
from fixtures.platform import MissingCapability


# -- exchange against small local servers ----------------------------------------------------

@dataclass
class FakeGateway:
    address: tuple[str, int]
    ca_bundle: Path
    expects_proxy_protocol: bool = True
    load_balancer_writes_proxy_header: bool = False


@contextlib.contextmanager
def server(handle: Callable[[socket.socket], None]) -> Iterator[tuple[str, int]]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (socket.timeout, OSError):
                continue
            with conn:
                try:
                    handle(conn)
                except OSError:
                    pass

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield listener.getsockname()
    finally:
        stop.set()
        t.join(5)
        listener.close()


def _reset(conn: socket.socket) -> None:
    conn.recv(64)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _close(conn: socket.socket) -> None:
    conn.recv(64)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(root CA, server chain, server key) for gw.example.com, in a module temp dir."""
    d = tmp_path_factory.mktemp("tls")
    ca = CertificateAuthority.create_root("diagnose test root")
    files = ca.issue_server(["gw.example.com"]).write(d, "gw")
    (d / "ca.pem").write_bytes(ca.cert_pem)
    return d / "ca.pem", files.chain, files.key


def test_refused_connection_is_reported_as_nothing_listening(tls_files):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = s.getsockname()   # bound, not listening
        ex = diagnose.exchange(FakeGateway(address, tls_files[0]), "gw.example.com")
    assert (ex.ended, ex.stage) == ("refused", "connect")
    assert "nothing listens" in ex.outcome and not ex.closed_by_gateway


@pytest.mark.parametrize("handle, ended", [(_reset, "reset"), (_close, "closed")], ids=["RST", "FIN"])
def test_connection_dropped_during_the_handshake_is_a_failed_tls_handshake(tls_files, handle, ended):
    with server(handle) as address:
        ex = diagnose.exchange(FakeGateway(address, tls_files[0]), "gw.example.com", preamble=b"PROXY garbage\r\n")
    assert ex.closed_by_gateway and ex.stage == "tls", ex
    assert ex.outcome.startswith("TLS handshake failed"), ex.outcome
    with pytest.raises(AssertionError, match="expected HTTP 200"):
        ex.expect_http(200)
    assert ex.expect_closed() is ex


def test_half_closed_client_sees_the_gateway_close(tls_files):
    with server(_close) as address:
        ex = diagnose.exchange(FakeGateway(address, tls_files[0]), "gw.example.com", preamble=b"PROXY TCP4 1.2",
                               then="fin")
    assert (ex.ended, ex.stage) == ("closed", "wait") and "before any response" in ex.outcome, ex


def test_tls_and_http_exchange_reports_status_and_version(tls_files):
    ca, chain, key = tls_files
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(chain), str(key))

    def handle(conn: socket.socket) -> None:
        assert conn.recv(len(b"PROXY UNKNOWN\r\n")) == b"PROXY UNKNOWN\r\n"
        with ctx.wrap_socket(conn, server_side=True) as tls:
            data = b""
            while b"\r\n\r\n" not in data:
                data += tls.recv(1024)
            tls.sendall(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")

    with server(handle) as address:
        ex = diagnose.exchange(FakeGateway(address, ca), "gw.example.com", preamble=b"PROXY UNKNOWN\r\n")
    assert ex.expect_http(204).tls_version in ("TLSv1.2", "TLSv1.3"), ex
    with pytest.raises(AssertionError, match="expected the gateway to close"):
        ex.expect_closed()


def test_then_must_be_known():
    with pytest.raises(ValueError, match="then="):
        diagnose.exchange(FakeGateway(("127.0.0.1", 1), Path("x")), "h", then="teleport")


# -- counters ---------------------------------------------------------------------------------

STATS = {
    "listener.127.0.0.1_8443.downstream_cx_total": 5,
    "listener.127.0.0.1_8443.worker_0.downstream_cx_total": 5,      # per worker: not counted twice
    "listener.admin.downstream_cx_total": 40,                        # the admin port: not traffic
    "listener.127.0.0.1_8443.no_filter_chain_match": 2,
    "listener.127.0.0.1_8443.ssl.handshake": 4,
    "proxy_proto.versions.v2.found": 3,
    "proxy_proto.versions.v1.found": 1,
    "proxy_proto.not_found_disallowed": 6,
    "proxy_proto.versions.v1.error": 2,
    "proxy_proto.lb.versions.v2.error": 1,                           # with a stat_prefix
    "http.gateway.downstream_rq_total": 9,
    "http.admin.downstream_rq_total": 100,
    "cluster.outbound|8080||rag-api.tenanta.svc.cluster.local.upstream_rq_total": 7,
    "cluster.outbound|8501||app-ui.tenantb.svc.cluster.local.upstream_rq_total": 1,
    "cluster.jwks|cognito.upstream_rq_total": 3,                     # the gateway's own JWKS fetches
}


def test_counters_are_read_by_meaning():
    c = Counters(STATS)
    assert (c.connections, c.no_filter_chain, c.tls_handshakes) == (5, 2, 4)
    assert (c.proxy_headers_parsed, c.proxy_headers_rejected) == (4, 9)
    assert (c.http_requests, c.upstream_requests) == (9, 8)


def test_an_istio_gateways_http_counter_is_named_after_its_listener():
    """On a cluster the HTTP stat prefix holds the listener's address (dots included), and the
    proxy's own Prometheus and health listeners are not the gateway's traffic."""
    istio = {k: v for k, v in STATS.items() if not k.startswith("http.")}
    istio.update({"http.outbound_0.0.0.0_8443.downstream_rq_total": 6, "http.stats.downstream_rq_total": 50,
                  "http.agent.downstream_rq_total": 30, "http.admin.downstream_rq_total": 100})
    assert Counters(istio).http_requests == 6


def test_counter_difference_is_what_moved():
    moved = Counters({**STATS, "http.gateway.downstream_rq_total": 10, "proxy_proto.not_found_disallowed": 8}) \
        - Counters(STATS)
    assert (moved.http_requests, moved.proxy_headers_rejected, moved.upstream_requests) == (1, 2, 0)
    assert "HTTP requests +1" in moved.summary() and repr(moved).startswith("Counters(")


def test_unreachable_admin_gives_no_counters():
    class Dead:
        def stats(self):
            raise ConnectionRefusedError("admin down")
    assert diagnose.counters(Dead()) is None


def test_gateway_without_readable_counters_gives_no_counters():
    class Unreadable:
        def stats(self):
            raise MissingCapability("gateway stats: not readable on this backend")
    assert diagnose.counters(Unreadable()) is None


def test_a_bug_reading_counters_is_not_taken_for_missing_counters():
    class Broken:
        def stats(self):
            raise AttributeError("no stats()")
    with pytest.raises(AttributeError):
        diagnose.counters(Broken())


# -- verdicts ---------------------------------------------------------------------------------

OK = Exchange("probe", "request", "http", status=200)
RESET = Exchange("probe", "tls", "reset")
REFUSED = Exchange("probe", "connect", "refused")
AFTER_TLS_INSPECTOR_COUNTS = Counters({"proxy_proto.versions.v2.found": 1,
                                       "listener.x_1.no_filter_chain_match": 1})


@dataclass(frozen=True)
class Seen:
    lb: Exchange
    bare: Exchange
    double: Exchange
    finding: Finding
    words: str
    lb_moved: Counters | None = None
    log: str = ""

    def __str__(self) -> str:
        return f"{self.finding.name}: {self.words}"


SEEN = [
    Seen(OK, RESET, RESET, Finding.STRICT,
         "gateway requires PROXY protocol: client sent no PROXY header, TLS handshake failed"),
    Seen(RESET, OK, RESET, Finding.NOT_PARSED,
         "gateway does not parse PROXY protocol: client sent PROXY v2, TLS handshake failed"),
    Seen(REFUSED, REFUSED, REFUSED, Finding.LISTENER_DOWN, "gateway rejected its listener: client sent PROXY v2, "
         "TCP connection refused"),
    Seen(REFUSED, REFUSED, REFUSED, Finding.LISTENER_DOWN, "a listener filter without typed_config",
         log="Didn't find a registered implementation for 'envoy.filters.listener.proxy_protocol' with type URL: ''"),
    Seen(RESET, RESET, OK, Finding.PARSED_TWICE,
         "PROXY protocol filter inserted twice: client sent PROXY v2, TLS handshake failed"),
    Seen(RESET, RESET, RESET, Finding.AFTER_TLS_INSPECTOR, "parsed the PROXY header but matched no filter chain",
         lb_moved=AFTER_TLS_INSPECTOR_COUNTS),
    Seen(RESET, RESET, RESET, Finding.UNEXPLAINED, "load balancer: TLS handshake failed"),
    Seen(OK, OK, RESET, Finding.OPTIONAL, "client sent no PROXY header, HTTP 200"),
]


@pytest.mark.parametrize("seen", SEEN, ids=str)
def test_observations_are_classified_and_named(seen):
    d = classify(Probe(seen.lb, seen.lb_moved), Probe(seen.bare), Probe(seen.double), proxy_log=seen.log)
    assert d.finding is seen.finding, str(d)
    assert seen.words in d.verdict, d.verdict
    assert d.verdict.startswith(seen.finding.value) and "evidence:" in str(d)


def test_typed_config_cause_is_named_only_when_the_log_says_so():
    d = classify(Probe(REFUSED), Probe(REFUSED), Probe(REFUSED), proxy_log="listener port already in use")
    assert "typed_config" not in d.verdict


def test_lb_header_matches_the_gateway_address_family():
    gw = FakeGateway(("127.0.0.1", 8443), Path("ca"))
    assert diagnose.lb_header(gw, ("2001:db8::5", 1234)).startswith(b"\r\n\r\n\x00\r\nQUIT\n\x21\x21")
    assert diagnose.lb_header(gw, ("192.0.2.5", 1234), version=1) == b"PROXY TCP4 192.0.2.5 127.0.0.1 1234 8443\r\n"


@pytest.mark.parametrize("expects, lb_writes, sends", [(True, False, True), (True, True, False), (False, False, False)],
                         ids=["the client stands in for the load balancer", "the load balancer writes the header",
                              "the gateway expects no header"])
def test_client_sends_a_proxy_header_only_in_the_load_balancers_place(expects, lb_writes, sends):
    # Behind an NLB the address is its DNS name, which a PROXY header could not carry.
    gw = FakeGateway(("nlb.example.com" if lb_writes else "127.0.0.1", 443), Path("ca"), expects, lb_writes)
    assert diagnose.client_sends_proxy_header(gw) is sends
    assert (diagnose.lb_header(gw) is not None) is sends


def test_gateway_without_the_load_balancer_attribute_gets_the_clients_header():
    @dataclass
    class Plain:  # a backend whose gateway says nothing of a load balancer
        address: tuple[str, int]
        expects_proxy_protocol: bool = True
    assert diagnose.lb_header(Plain(("127.0.0.1", 8443)), ("192.0.2.5", 1234), version=1) == \
        b"PROXY TCP4 192.0.2.5 127.0.0.1 1234 8443\r\n"


def test_diagnosis_refuses_a_gateway_behind_a_header_writing_load_balancer():
    # Port 1 on loopback: a probe that ran anyway would be refused, not raise.
    gw = FakeGateway(("127.0.0.1", 1), Path("ca"), load_balancer_writes_proxy_header=True)
    with pytest.raises(MissingCapability, match="proxy-protocol"):
        diagnose.diagnose(gw, "gw.example.com")
