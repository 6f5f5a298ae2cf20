"""A parser for Envoy's ``x-forwarded-client-cert`` (XFCC) header.

Format, from Envoy's HTTP header reference
(https://www.envoyproxy.io/docs/envoy/latest/configuration/http/http_conn_man/headers#x-forwarded-client-cert):
elements are separated by ``,``, each element holds ``key=value`` pairs separated by ``;``,
keys are case-insensitive (``By``, ``Hash``, ``Cert``, ``Chain``, ``Subject``, ``URI``, ``DNS``),
and a value containing ``,``, ``;`` or ``=`` is double-quoted with inner quotes written ``\\"``.
``URI`` and ``DNS`` may repeat within one element.

Each proxy that forwards client certificate details *appends* its element (Istio sidecars use
``APPEND_FORWARD``), so the last element is the one the nearest proxy added: its ``URI`` is the
identity of the peer that opened the mTLS connection to our sidecar, and its ``By`` is our own.
"""

from __future__ import annotations

from dataclasses import dataclass

KNOWN_KEYS = ("By", "Hash", "Cert", "Chain", "Subject", "URI", "DNS")
_CANONICAL = {key.lower(): key for key in KNOWN_KEYS}
_WHITESPACE = " \t"


class XfccError(ValueError):
    """The header does not follow the XFCC grammar; the message says where."""


@dataclass(frozen=True)
class XfccElement:
    """One proxy's element: ``(key, value)`` pairs in header order, known keys canonicalised."""

    pairs: tuple[tuple[str, str], ...]

    def values(self, key: str) -> list[str]:
        wanted = _CANONICAL.get(key.lower(), key)
        return [value for name, value in self.pairs if name == wanted]

    def first(self, key: str) -> str | None:
        found = self.values(key)
        return found[0] if found else None

    @property
    def by(self) -> str | None:
        return self.first("By")

    @property
    def uris(self) -> list[str]:
        return self.values("URI")

    @property
    def spiffe_id(self) -> str | None:
        """The peer's SPIFFE id: the first ``spiffe://`` URI SAN, else the first URI SAN."""
        uris = self.uris
        for uri in uris:
            if uri.startswith("spiffe://"):
                return uri
        return uris[0] if uris else None


def parse(header: str) -> list[XfccElement]:
    """Parse a whole XFCC header value into its elements, in header order."""
    return _Parser(header).parse()


def caller_spiffe_id(elements: list[XfccElement]) -> str | None:
    """The identity of the immediate mTLS peer: the URI of the element the nearest proxy added."""
    return elements[-1].spiffe_id if elements else None


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> XfccError:
        return XfccError(f"{what} at character {self.pos} of {self.text!r}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_whitespace(self) -> None:
        while self.peek() and self.peek() in _WHITESPACE:
            self.pos += 1

    def parse(self) -> list[XfccElement]:
        if not self.text.strip():
            raise self.fail("empty header")
        elements = [self.element()]
        while self.peek() == ",":
            self.pos += 1
            elements.append(self.element())
        return elements

    def element(self) -> XfccElement:
        pairs = [self.pair()]
        while self.peek() == ";":
            self.pos += 1
            pairs.append(self.pair())
        return XfccElement(tuple(pairs))

    def pair(self) -> tuple[str, str]:
        self.skip_whitespace()
        start = self.pos
        while self.peek() and self.peek() not in "=,;\"":
            self.pos += 1
        key = self.text[start : self.pos].strip()
        if self.peek() != "=":
            if not key:
                raise self.fail("empty element or pair")
            raise self.fail(f"key {key!r} has no '='")
        if not key:
            raise self.fail("empty key")
        self.pos += 1
        value = self.quoted() if self.peek_past_whitespace() == '"' else self.bare()
        self.skip_whitespace()
        if self.peek() not in ("", ",", ";"):
            raise self.fail(f"unexpected {self.peek()!r} after the value of {key!r}")
        return _CANONICAL.get(key.lower(), key), value

    def peek_past_whitespace(self) -> str:
        self.skip_whitespace()
        return self.peek()

    def quoted(self) -> str:
        self.pos += 1  # the opening quote
        chars: list[str] = []
        while True:
            char = self.peek()
            if not char:
                raise self.fail("unterminated quoted value")
            self.pos += 1
            if char == '"':
                return "".join(chars)
            if char == "\\":
                escaped = self.peek()
                if not escaped:
                    raise self.fail("dangling '\\' in quoted value")
                self.pos += 1
                chars.append(escaped)
            else:
                chars.append(char)

    def bare(self) -> str:
        start = self.pos
        while self.peek() and self.peek() not in ",;":
            if self.peek() == '"':
                raise self.fail("'\"' inside an unquoted value")
            self.pos += 1
        return self.text[start : self.pos].strip()
