"""Unit tests of the tenant UI (platform/apps/app_ui).

``AppTest`` cannot seed request headers, so the page is run two ways: from the file, as
``streamlit run`` would (no tenant header, so it must refuse), and through ``render`` with
headers and a mock rag-api passed in.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from streamlit.testing.v1 import AppTest

APPS_DIR = Path(__file__).resolve().parents[1] / "platform" / "apps"
if str(APPS_DIR) not in sys.path:
    sys.path.insert(0, str(APPS_DIR))

from app_ui import app as ui  # noqa: E402

SCRIPT = APPS_DIR / "app_ui" / "app.py"
ENV = {"TENANT_ID": "tenanta", "RAG_API_URL": "http://rag-api:8080"}
SETTINGS = ui.Settings(tenant_id="tenanta", rag_api_url="http://rag-api:8080")
APP_UI_ID = "spiffe://cluster.local/ns/tenanta/sa/app-ui"
SIGNED_IN = {
    "X-Auth-Request-Tenantid": "tenanta",
    "Authorization": "Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln",
    "X-Request-Id": "req-42",
    "Cookie": "_oauth2_proxy=secret",
}
WHOAMI = {
    "tenant": "tenanta",
    "version": "1.0.0",
    "host": "rag-api:8080",
    "peer": {"spiffe_id": APP_UI_ID, "by": "spiffe://cluster.local/ns/tenanta/sa/rag-api", "xfcc": "..."},
    "claims": {"email": "alice@tenanta.example.com", "custom:tenantid": "tenanta"},
    "tenant_header": "tenanta",
    "client_address": None,
    "forwarded_for": [],
    "external_address": None,
    "request_id": "req-42",
}


def rag_api(answer: Callable[[httpx.Request], httpx.Response], seen: list[httpx.Request] | None = None) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return answer(request)

    return httpx.MockTransport(handler)


def answering(status: int, body: Any) -> httpx.MockTransport:
    return rag_api(lambda _: httpx.Response(status, json=body))


# --- configuration and the access check ----------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param({"RAG_API_URL": "http://rag-api:8080"}, "TENANT_ID is required", id="a missing TENANT_ID is refused"),
        pytest.param({"TENANT_ID": "tenanta"}, "RAG_API_URL is required", id="a missing RAG_API_URL is refused"),
        pytest.param({"TENANT_ID": "tenanta", "RAG_API_URL": "rag-api:8080"}, "RAG_API_URL='rag-api:8080'", id="a RAG_API_URL without scheme is refused"),
    ],
)
def test_settings_refuse_a_bad_environment(env: dict[str, str], message: str) -> None:
    with pytest.raises(ui.ConfigError, match=message):
        ui.Settings.from_env(env)


def test_settings_drop_a_trailing_slash() -> None:
    assert ui.Settings.from_env({**ENV, "RAG_API_URL": "http://rag-api:8080/"}) == SETTINGS


@pytest.mark.parametrize(
    ("headers", "refused_because"),
    [
        pytest.param(SIGNED_IN, None, id="tenant header and bearer token are let in"),
        pytest.param({k.lower(): v for k, v in SIGNED_IN.items()}, None, id="header names are case-insensitive"),
        pytest.param({**SIGNED_IN, "Authorization": "bearer abc"}, None, id="the bearer scheme is case-insensitive"),
        pytest.param({"Authorization": SIGNED_IN["Authorization"]}, "no x-auth-request-tenantid header", id="no tenant header is refused"),
        pytest.param({**SIGNED_IN, "X-Auth-Request-Tenantid": "tenantb"}, "request is for tenant 'tenantb'", id="another tenant's header is refused"),
        pytest.param({"X-Auth-Request-Tenantid": "tenanta"}, "no bearer token", id="no Authorization header is refused"),
        pytest.param({**SIGNED_IN, "Authorization": "Basic YTpi"}, "no bearer token", id="a Basic credential is refused"),
        pytest.param({**SIGNED_IN, "Authorization": "Bearer "}, "no bearer token", id="an empty bearer token is refused"),
    ],
)
def test_refusal(headers: dict[str, str], refused_because: str | None) -> None:
    reason = ui.refusal(headers, "tenanta")
    if refused_because is None:
        assert reason is None
    else:
        assert reason is not None and refused_because in reason


def test_only_identity_and_trace_headers_are_forwarded() -> None:
    assert ui.forwarded_headers({**SIGNED_IN, "Traceparent": "00-abc-def-01"}) == {
        "authorization": SIGNED_IN["Authorization"],
        "x-auth-request-tenantid": "tenanta",
        "x-request-id": "req-42",
        "traceparent": "00-abc-def-01",
    }


# --- calling rag-api -----------------------------------------------------------------------


def test_fetch_whoami_forwards_the_identity_headers() -> None:
    seen: list[httpx.Request] = []
    answer = ui.fetch_whoami(SETTINGS, SIGNED_IN, transport=rag_api(lambda _: httpx.Response(200, json=WHOAMI), seen))
    assert answer == WHOAMI
    [request] = seen
    assert (request.method, str(request.url)) == ("GET", "http://rag-api:8080/whoami")
    assert request.headers["authorization"] == SIGNED_IN["Authorization"]
    assert request.headers["x-auth-request-tenantid"] == "tenanta"
    assert "cookie" not in request.headers


def refuse_connection(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def time_out(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("timed out", request=request)


@pytest.mark.parametrize(
    ("transport", "message"),
    [
        pytest.param(rag_api(refuse_connection), "ConnectError", id="a refused connection is an error"),
        pytest.param(rag_api(time_out), "ReadTimeout", id="a timeout is an error"),
        pytest.param(answering(503, {"detail": "no healthy upstream"}), "answered 503", id="a 503 is an error"),
        pytest.param(answering(403, {"detail": "RBAC: access denied"}), "RBAC: access denied", id="a 403 shows its body"),
        pytest.param(rag_api(lambda _: httpx.Response(200, text="<html>")), "not JSON", id="a non-JSON answer is an error"),
        pytest.param(answering(200, ["tenanta"]), "not an object", id="a non-object answer is an error"),
    ],
)
def test_fetch_whoami_reports_failures(transport: httpx.MockTransport, message: str) -> None:
    with pytest.raises(ui.RagApiError, match=message):
        ui.fetch_whoami(SETTINGS, SIGNED_IN, transport=transport)


@pytest.mark.parametrize(
    ("claims", "user"),
    [
        pytest.param({"email": "a@x", "sub": "1"}, "a@x", id="email is preferred"),
        pytest.param({"cognito:username": "alice", "sub": "1"}, "alice", id="then the Cognito user name"),
        pytest.param({"sub": "1"}, "1", id="then the subject"),
        pytest.param(None, None, id="no claims name no user"),
    ],
)
def test_user_of(claims: dict[str, str] | None, user: str | None) -> None:
    assert ui.user_of(claims) == user


# --- the page ------------------------------------------------------------------------------


def page(headers, env, transport):  # type: ignore[no-untyped-def]
    # AppTest runs this body as a script, so it imports what it uses and has no annotations
    # (they would be evaluated there). This module already put platform/apps on sys.path.
    from app_ui.app import render

    render(headers, env, transport)


def run_page(headers: dict[str, str], env: dict[str, str], transport: httpx.BaseTransport | None = None) -> AppTest:
    at = AppTest.from_function(page, args=(headers, env, transport))
    at.run(timeout=30)
    assert not at.exception, [e.value for e in at.exception]
    return at


def shown_text(at: AppTest) -> str:
    return "\n".join(e.value for e in [*at.title, *at.markdown])


def test_the_script_refuses_a_request_without_the_tenant_header(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    at = AppTest.from_file(str(SCRIPT))
    at.run(timeout=30)
    assert not at.exception
    assert [e.value for e in at.error] == [
        "Access refused: the request has no x-auth-request-tenantid header; sign in through tenanta's address."
    ]
    assert not at.title and not at.markdown and not at.json


def test_the_page_shows_tenant_and_identity_from_rag_api() -> None:
    seen: list[httpx.Request] = []
    at = run_page(SIGNED_IN, ENV, rag_api(lambda _: httpx.Response(200, json=WHOAMI), seen))
    assert not at.error
    assert [e.value for e in at.title] == ["Tenant tenanta"]
    text = shown_text(at)
    assert "alice@tenanta.example.com" in text
    assert APP_UI_ID in text
    assert json.loads(at.json[0].value) == WHOAMI
    assert len(seen) == 1


@pytest.mark.parametrize(
    ("headers", "env", "transport", "error"),
    [
        pytest.param(SIGNED_IN, {"RAG_API_URL": "http://rag-api:8080"}, None, "The UI is misconfigured: TENANT_ID is required", id="a misconfigured UI shows only the problem"),
        pytest.param({**SIGNED_IN, "X-Auth-Request-Tenantid": "tenantb"}, ENV, None, "Access refused: this UI serves tenant 'tenanta'", id="another tenant's request is refused"),
        pytest.param({"X-Auth-Request-Tenantid": "tenanta"}, ENV, None, "Access refused: the request carries no bearer token", id="a request without a token is refused"),
        pytest.param(SIGNED_IN, ENV, answering(403, {"detail": "RBAC: access denied"}), "rag-api is unavailable", id="a rag-api refusal shows only the error"),
        pytest.param(SIGNED_IN, ENV, answering(200, {**WHOAMI, "tenant": "tenantb"}), "rag-api answered for tenant 'tenantb'", id="another tenant's rag-api answer is not shown"),
    ],
)
def test_the_page_shows_nothing_but_the_error(
    headers: dict[str, str], env: dict[str, str], transport: httpx.BaseTransport | None, error: str
) -> None:
    seen: list[httpx.Request] = []
    at = run_page(headers, env, transport or rag_api(lambda _: httpx.Response(200, json=WHOAMI), seen))
    [shown] = [e.value for e in at.error]
    assert shown.startswith(error)
    assert not at.title and not at.markdown and not at.json
    assert seen == []  # a refused request never reaches rag-api
