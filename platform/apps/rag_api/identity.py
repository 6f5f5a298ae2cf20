"""Who is calling, as established by the proxies in front of this service.

The service trusts these headers because nothing but its own Istio sidecar can reach it:
the sidecar captures all inbound traffic, STRICT mTLS refuses callers without a mesh identity,
Envoy's jwt_authn filter strips any ``x-jwt-payload`` a client sent and writes the verified
payload itself, and the sidecar and gateway set the XFCC and ``x-envoy-*`` headers. A request
that did not come through the sidecar is outside the platform's threat model; exposing this
service any other way (a hostPort, a NodePort, disabling injection) breaks that assumption.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from typing import Any

_BASE64URL = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")


class HeaderError(ValueError):
    """A header the proxies set is malformed; the message names the header."""


def decode_jwt_payload(value: str) -> dict[str, Any]:
    """Decode ``x-jwt-payload``: the base64url JSON payload Envoy's jwt_authn forwards.

    Envoy writes it unpadded unless ``pad_forward_payload_header`` is set, so both forms are
    accepted (https://www.envoyproxy.io/docs/envoy/latest/api-v3/extensions/filters/http/jwt_authn/v3/config.proto).
    """
    text = value.strip()
    if not text or not _BASE64URL.match(text):
        raise HeaderError("x-jwt-payload is not base64url (only A-Z a-z 0-9 - _ and '=' padding)")
    unpadded = text.rstrip("=")
    try:
        raw = base64.b64decode(unpadded + "=" * (-len(unpadded) % 4), altchars=b"-_", validate=True)
    except binascii.Error as error:
        raise HeaderError(f"x-jwt-payload is not base64url: {error}") from None
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise HeaderError(f"x-jwt-payload does not decode to JSON: {error}") from None
    if not isinstance(payload, dict):
        raise HeaderError(
            f"x-jwt-payload decodes to a JSON {type(payload).__name__}, not an object of claims"
        )
    return payload


def forwarded_for(values: Sequence[str]) -> list[str]:
    """All ``x-forwarded-for`` entries, left to right, across repeated header lines."""
    return [entry.strip() for value in values for entry in value.split(",") if entry.strip()]


def client_address(entries: Sequence[str]) -> str | None:
    """The address the edge gateway appended: the rightmost ``x-forwarded-for`` entry.

    The gateway runs with ``numTrustedProxies: 0`` and appends the downstream address (from
    the PROXY protocol header), and sidecars do not append, so entries to its left are
    whatever the client claimed and must not be trusted.
    """
    return entries[-1] if entries else None
