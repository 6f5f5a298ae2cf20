"""The tenant's web UI (Streamlit).

Run it with ``streamlit run platform/apps/app_ui/app.py`` and ``TENANT_ID`` and ``RAG_API_URL``
set. It shows nothing unless the request that opened the session carries this tenant's
``x-auth-request-tenantid`` and a bearer token, which the reverse proxy in front of the UI adds
for a signed-in user; it then asks rag-api who the caller is and shows that answer, never
anything made up.

The functions above ``render`` are plain Python so they can be tested without Streamlit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import streamlit as st

TENANT_HEADER = "x-auth-request-tenantid"
# The identity headers rag-api needs, plus the request id and trace context, which Istio
# cannot propagate by itself (https://istio.io/latest/docs/tasks/observability/distributed-tracing/overview/).
FORWARDED_HEADERS = (
    "authorization",
    TENANT_HEADER,
    "x-request-id",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
)
TIMEOUT_S = 5.0


class ConfigError(Exception):
    """The environment cannot configure the UI; the message names the variable."""


class RagApiError(Exception):
    """rag-api could not answer; the message says what went wrong."""


@dataclass(frozen=True)
class Settings:
    tenant_id: str
    rag_api_url: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        tenant_id = env.get("TENANT_ID", "").strip()
        if not tenant_id:
            raise ConfigError("TENANT_ID is required: the tenant this UI serves")
        url = env.get("RAG_API_URL", "").strip().rstrip("/")
        if not url:
            raise ConfigError("RAG_API_URL is required: the base URL of this tenant's rag-api")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"RAG_API_URL={url!r} is not an http(s) URL")
        return cls(tenant_id=tenant_id, rag_api_url=url)


def _lowercase(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def refusal(headers: Mapping[str, str], tenant_id: str) -> str | None:
    """Why this request must not see the UI, or ``None`` when it may."""
    headers = _lowercase(headers)
    tenant = headers.get(TENANT_HEADER)
    if tenant is None:
        return f"the request has no {TENANT_HEADER} header; sign in through {tenant_id}'s address"
    if tenant != tenant_id:
        return f"this UI serves tenant {tenant_id!r}, but the request is for tenant {tenant!r}"
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "the request carries no bearer token (Authorization: Bearer ...)"
    return None


def forwarded_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The subset of the incoming headers passed on to rag-api."""
    headers = _lowercase(headers)
    return {name: headers[name] for name in FORWARDED_HEADERS if name in headers}


def fetch_whoami(
    settings: Settings,
    headers: Mapping[str, str],
    *,
    transport: httpx.BaseTransport | None = None,
    timeout: float = TIMEOUT_S,
) -> dict[str, Any]:
    """``GET {RAG_API_URL}/whoami`` with the caller's identity headers; its JSON answer."""
    url = f"{settings.rag_api_url}/whoami"
    try:
        with httpx.Client(transport=transport, timeout=timeout) as client:
            response = client.get(url, headers=forwarded_headers(headers))
    except httpx.HTTPError as error:
        raise RagApiError(f"GET {url} failed: {type(error).__name__}: {error}") from None
    if response.status_code != 200:
        raise RagApiError(f"GET {url} answered {response.status_code}: {response.text[:300]}")
    try:
        body = response.json()
    except ValueError:
        raise RagApiError(f"GET {url} answered 200 with a body that is not JSON") from None
    if not isinstance(body, dict):
        raise RagApiError(f"GET {url} answered 200 with JSON that is not an object")
    return body


def user_of(claims: Mapping[str, Any] | None) -> str | None:
    """A human-readable user name from verified Cognito id token claims."""
    if not claims:
        return None
    for claim in ("email", "cognito:username", "username", "sub"):
        if claims.get(claim):
            return str(claims[claim])
    return None


def render(
    headers: Mapping[str, str],
    env: Mapping[str, str],
    transport: httpx.BaseTransport | None = None,
) -> None:
    """Draw the page for one run of the script."""
    try:
        settings = Settings.from_env(env)
    except ConfigError as error:
        st.error(f"The UI is misconfigured: {error}")
        return
    reason = refusal(headers, settings.tenant_id)
    if reason is not None:
        st.error(f"Access refused: {reason}.")
        return
    try:
        whoami = fetch_whoami(settings, headers, transport=transport)
    except RagApiError as error:
        st.error(f"rag-api is unavailable: {error}")
        return
    if whoami.get("tenant") != settings.tenant_id:
        st.error(
            f"rag-api answered for tenant {whoami.get('tenant')!r}, not {settings.tenant_id!r}; "
            "showing nothing."
        )
        return

    peer = whoami.get("peer") or {}
    st.title(f"Tenant {settings.tenant_id}")
    st.markdown(f"**Signed in as:** {user_of(whoami.get('claims')) or 'unknown (rag-api saw no verified token)'}")
    st.markdown(f"**This UI's workload identity, as rag-api sees it:** `{peer.get('spiffe_id')}`")
    st.markdown(f"**rag-api version:** `{whoami.get('version')}`")
    with st.expander("rag-api /whoami"):
        st.json(whoami)


if __name__ == "__main__":
    render(st.context.headers, os.environ)
