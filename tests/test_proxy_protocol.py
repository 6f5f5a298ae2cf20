"""PROXY protocol encoder/decoder against the HAProxy spec (proxy-protocol.txt)."""

from __future__ import annotations

import ipaddress
import socket
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures import proxy_protocol as pp
from fixtures.proxy_protocol import ProxyHeader, ProxyProtocolError, parse

# --- known answers, checked by hand against the spec ------------------------------------------


def test_v2_tcp4_known_answer():
    header = pp.v2("192.0.2.1", "198.51.100.2", 12345, 443)
    assert header == bytes.fromhex(
        "0d0a0d0a000d0a515549540a"  # signature \r\n\r\n\0\r\nQUIT\n
        "21"  # version 2, command PROXY
        "11"  # AF_INET, STREAM
        "000c"  # 12 bytes follow
        "c0000201"  # 192.0.2.1
        "c6336402"  # 198.51.100.2
        "3039"  # 12345
        "01bb"  # 443
    )


def test_v2_tcp6_with_tlv_known_answer():
    header = pp.v2("2001:db8::1", "2001:db8::2", 1, 65535, tlvs=[(pp.PP2_TYPE_AUTHORITY, b"a.io")])
    assert header == bytes.fromhex(
        "0d0a0d0a000d0a515549540a"
        "21"
        "21"  # AF_INET6, STREAM
        "002b"  # 36 address bytes + 7 TLV bytes = 43
        "20010db8000000000000000000000001"
        "20010db8000000000000000000000002"
        "0001"
        "ffff"
        "02" "0004" "612e696f"  # PP2_TYPE_AUTHORITY, length 4, "a.io"
    )


def test_v2_local_known_answer():
    assert pp.v2_local() == bytes.fromhex("0d0a0d0a000d0a515549540a" "20" "00" "0000")


def test_v2_local_command_with_addresses_sets_low_nibble_zero():
    header = pp.v2("192.0.2.1", "198.51.100.2", 1, 2, command="LOCAL")
    assert header[12] == 0x20
    assert parse(header).command == "LOCAL"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        pytest.param(("192.0.2.1", "198.51.100.2", 12345, 443),
                     b"PROXY TCP4 192.0.2.1 198.51.100.2 12345 443\r\n", id="TCP4"),
        pytest.param(("2001:db8::1", "2001:db8::2", 0, 65535),
                     b"PROXY TCP6 2001:db8::1 2001:db8::2 0 65535\r\n", id="TCP6"),
        pytest.param((ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.2"), 1, 2),
                     b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n", id="ipaddress objects"),
    ],
)
def test_v1_known_answer(args, line):
    assert pp.v1(*args) == line


def test_v1_unknown_known_answer():
    assert pp.v1_unknown() == b"PROXY UNKNOWN\r\n"
    assert parse(pp.v1_unknown()) == ProxyHeader(1, "PROXY", "UNKNOWN", None, None, None, None, (), 15)


def test_v1_longest_tcp6_line_fits_the_spec_maximum():
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = pp.v1(full, full, 65535, 65535)
    assert len(line) == 104  # spec 2.1: TCP/IPv6 worst case
    assert parse(line).src == full


def test_v1_unknown_with_trailing_fields_at_107_bytes_is_accepted():
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
    assert len(line) == pp.V1_MAX_LENGTH
    assert parse(line).family == "UNKNOWN"


def test_parse_reports_header_length_and_leaves_payload():
    payload = b"\x16\x03\x01 client hello"
    for header in (pp.v1("192.0.2.1", "192.0.2.2", 1, 2), pp.v2("192.0.2.1", "192.0.2.2", 1, 2)):
        parsed = parse(header + payload)
        assert parsed.length == len(header)
        assert (header + payload)[parsed.length :] == payload


def test_parse_v2_udp_and_unix_families():
    udp = bytearray(pp.v2("192.0.2.1", "192.0.2.2", 53, 5353))
    udp[13] = 0x12
    assert parse(bytes(udp)).family == "UDP4"

    paths = b"/run/a.sock".ljust(108, b"\0") + b"/run/b.sock".ljust(108, b"\0")
    unix = pp.V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x31, len(paths)) + paths
    parsed = parse(unix)
    assert (parsed.family, parsed.src, parsed.dst, parsed.src_port) == ("UNIX_STREAM", "/run/a.sock", "/run/b.sock", None)


# --- round trip -------------------------------------------------------------------------------

ports = st.integers(min_value=0, max_value=65535)
address_pairs = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.ip_addresses(v=4)),
    st.tuples(st.ip_addresses(v=6), st.ip_addresses(v=6)),
)
tlv_lists = st.lists(
    st.tuples(st.integers(min_value=0, max_value=255), st.binary(max_size=64)), max_size=5
)


@settings(database=None, max_examples=200)
@given(addresses=address_pairs, src_port=ports, dst_port=ports, tlvs=tlv_lists, payload=st.binary(max_size=32))
def test_v2_round_trip(addresses, src_port, dst_port, tlvs, payload):
    src, dst = addresses
    header = pp.v2(src, dst, src_port, dst_port, tlvs=tlvs)
    parsed = parse(header + payload)
    assert parsed == ProxyHeader(
        version=2,
        command="PROXY",
        family="TCP4" if src.version == 4 else "TCP6",
        src=str(src),
        dst=str(dst),
        src_port=src_port,
        dst_port=dst_port,
        tlvs=tuple((t, bytes(v)) for t, v in tlvs),
        length=len(header),
    )


@settings(database=None, max_examples=200)
@given(addresses=address_pairs, src_port=ports, dst_port=ports, payload=st.binary(max_size=32))
def test_v1_round_trip(addresses, src_port, dst_port, payload):
    src, dst = addresses
    header = pp.v1(str(src), str(dst), src_port, dst_port)
    assert len(header) <= pp.V1_MAX_LENGTH
    parsed = parse(header + payload)
    assert (parsed.version, parsed.family, parsed.length) == (1, f"TCP{src.version}", len(header))
    assert (ipaddress.ip_address(parsed.src), ipaddress.ip_address(parsed.dst)) == (src, dst)
    assert (parsed.src_port, parsed.dst_port) == (src_port, dst_port)


@settings(database=None, max_examples=50)
@given(tlvs=tlv_lists)
def test_v2_local_round_trip(tlvs):
    parsed = parse(pp.v2_local(tlvs=tlvs))
    assert (parsed.command, parsed.family, parsed.src) == ("LOCAL", "UNSPEC", None)
    assert parsed.tlvs == tuple(tlvs)


# --- malformed input is rejected with a reason ------------------------------------------------

V2 = pp.v2("192.0.2.1", "198.51.100.2", 12345, 443)


def _with_byte(header: bytes, index: int, value: int) -> bytes:
    changed = bytearray(header)
    changed[index] = value
    return bytes(changed)


def _with_length(header: bytes, length: int) -> bytes:
    return header[:14] + struct.pack("!H", length) + header[16:]


MALFORMED = [
    pytest.param(b"", "no data", id="empty input"),
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", "no PROXY protocol header", id="plain HTTP"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01", "no PROXY protocol header", id="TLS ClientHello"),
    pytest.param(pp.bad_signature_v2(), "bad v2 signature", id="v2 bad signature"),
    pytest.param(pp.unknown_command_v2(), "command 0xf", id="v2 unknown command"),
    pytest.param(_with_byte(V2, 12, 0x11), "version nibble 1", id="v2 version 1 nibble"),
    pytest.param(_with_byte(V2, 13, 0x13), "0x13 is not defined", id="v2 undefined protocol"),
    pytest.param(_with_byte(V2, 13, 0x41), "0x41 is not defined", id="v2 undefined family"),
    pytest.param(_with_length(V2, 8), "needs 12 address bytes", id="v2 length shorter than addresses"),
    pytest.param(_with_length(V2, 40), "length field says 56 bytes", id="v2 length past the data"),
    pytest.param(_with_length(V2 + b"\x04\x00\x05ab", 17), "claims 5 bytes", id="v2 TLV overruns"),
    pytest.param(_with_length(V2 + b"\x04\x00", 14), "header needs 3", id="v2 TLV header cut"),
    pytest.param(pp.oversized_v1(), "no CRLF within the 107-byte maximum", id="v1 oversized"),
    pytest.param(pp.oversized_v1(4096), "no CRLF within the 107-byte maximum", id="v1 far oversized"),
    pytest.param(b"PROXY TCP4 192.0.2.1\xff 198.51.100.2 1 2\r\n", "non-ASCII", id="v1 non-ASCII"),
    pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n", "7 space-separated fields", id="v1 extra field"),
    pytest.param(b"PROXY TCP4 192.0.2.1 198.51.100.2 1 +2\r\n", "not a decimal number", id="v1 signed port"),
    pytest.param(b"PROXY TCP4 192.000.2.1 198.51.100.2 1 2\r\n", "not a valid TCP4", id="v1 octal-looking address"),
    pytest.param(b"PROXY TCP6 fe80::1%eth0 fe80::2 1 2\r\n", "scope id", id="v1 scoped IPv6"),
    pytest.param(b"PROXY \r\n", "'' is not TCP4, TCP6 or UNKNOWN", id="v1 no protocol"),
    pytest.param(b"PROXY\r\n", "bad v1 signature", id="v1 keyword only"),
    pytest.param(b"PROXYTCP4 192.0.2.1 198.51.100.2 1 2\r\n", "bad v1 signature", id="v1 missing space"),
]
MALFORMED += [
    pytest.param(line, reason, id=f"v1 {kind}")
    for kind, line in pp.MALFORMED_V1.items()
    for reason in [
        {
            "address is not an IP": "not a valid TCP4 address",
            "port out of range": "out of range",
            "port has a leading zero": "leading zero",
            "family does not match addresses": "not a valid TCP4 address",
            "unknown protocol": "'UDP4' is not TCP4, TCP6 or UNKNOWN",
            "missing destination port": "5 space-separated fields",
            "double space": "7 space-separated fields",
            "bare LF": "truncated: no CRLF",
            "lowercase keyword": "no PROXY protocol header",
        }[kind]
    ]
]


@pytest.mark.parametrize(("data", "reason"), MALFORMED)
def test_malformed_header_is_rejected_with_reason(data, reason):
    with pytest.raises(ProxyProtocolError) as excinfo:
        parse(data)
    assert reason in str(excinfo.value)


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(V2, id="v2 TCP4"),
        pytest.param(pp.v2("2001:db8::1", "2001:db8::2", 1, 2, tlvs=[(1, b"h2")]), id="v2 TCP6 with TLV"),
        pytest.param(pp.v1("192.0.2.1", "198.51.100.2", 12345, 443), id="v1 TCP4"),
    ],
)
def test_every_truncation_is_rejected_as_incomplete(header):
    for n in range(len(header)):
        with pytest.raises(ProxyProtocolError) as excinfo:
            parse(pp.truncated(header, n))
        assert "truncated" in str(excinfo.value) or "no data" in str(excinfo.value), n


def test_malformed_helpers_differ_from_a_valid_header_only_where_intended():
    bad_sig, bad_cmd = pp.bad_signature_v2(), pp.unknown_command_v2()
    valid = pp.v2("192.0.2.10", "198.51.100.20", 40000, 443)
    assert [i for i in range(len(valid)) if bad_sig[i] != valid[i]] == [10]
    assert [i for i in range(len(valid)) if bad_cmd[i] != valid[i]] == [12]
    assert bad_cmd[12] >> 4 == 2 and bad_cmd[12] & 0xF == 0xF
    assert len(pp.oversized_v1()) == pp.V1_MAX_LENGTH + 1
    assert pp.oversized_v1().endswith(b"\r\n")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda: pp.v1("192.0.2.1", "2001:db8::1", 1, 2), "same address family", id="mixed families"),
        pytest.param(lambda: pp.v1("192.0.2.1", "example.com", 1, 2), "not an IPv4 or IPv6", id="hostname"),
        pytest.param(lambda: pp.v1("192.0.2.1", "192.0.2.2", 65536, 2), "0..65535", id="port too big"),
        pytest.param(lambda: pp.v2("192.0.2.1", "192.0.2.2", 1, -1), "0..65535", id="negative port"),
        pytest.param(lambda: pp.v2("192.0.2.1", "192.0.2.2", True, 2), "0..65535", id="bool port"),
        pytest.param(lambda: pp.v2("fe80::1%eth0", "fe80::2", 1, 2), "scope id", id="scoped address"),
        pytest.param(lambda: pp.v2("192.0.2.1", "192.0.2.2", 1, 2, command="BOGUS"), "'PROXY' or 'LOCAL'",
                     id="unknown command"),
        pytest.param(lambda: pp.v2("192.0.2.1", "192.0.2.2", 1, 2, tlvs=[(256, b"")]), "0..255", id="TLV type"),
        pytest.param(lambda: pp.v2_local(tlvs=[(1, bytes(65536))]), "at most 65535", id="TLV too long"),
        pytest.param(lambda: pp.v2_local(tlvs=[(1, bytes(40000))] * 2), "length field", id="header too long"),
        pytest.param(lambda: pp.truncated(b"abc", 3), "0..2", id="truncate nothing"),
        pytest.param(lambda: pp.oversized_v1(107), "not over", id="oversized not over"),
        pytest.param(lambda: pp.malformed_v1("nope"), "unknown malformed v1 kind", id="unknown kind"),
    ],
)
def test_encoder_refuses_bad_input(call, message):
    with pytest.raises(ValueError) as excinfo:
        call()
    assert message in str(excinfo.value)


# --- sending slowly ---------------------------------------------------------------------------


def test_send_slowly_delivers_every_byte_with_delays():
    header = pp.v1("192.0.2.1", "198.51.100.2", 12345, 443)[:12]
    delay = 0.01
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)
        with socket.create_connection(listener.getsockname(), timeout=5) as client:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(5)
                start = time.monotonic()
                pp.send_slowly(client, header, delay)
                elapsed = time.monotonic() - start
                assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                received = b""
                while len(received) < len(header):
                    chunk = conn.recv(1024)
                    assert chunk, "connection closed early"
                    received += chunk
    assert received == header
    assert elapsed >= delay * (len(header) - 1)


def test_send_slowly_refuses_negative_delay():
    left, right = socket.socketpair()
    with left, right, pytest.raises(ValueError, match="negative"):
        pp.send_slowly(left, b"x", -1)
