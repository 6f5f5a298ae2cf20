"""Unit tests of the rag-api service (platform/apps/rag_api), in process and as a process."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import httpx
import pytest
from test_rag_fakes import HAIKU, NOVA, TENANTA_DOCS, HashEmbedder, Stack, rag_settings, stack, write_corpus

APPS_DIR = Path(__file__).resolve().parents[1] / "platform" / "apps"
if str(APPS_DIR) not in sys.path:
    sys.path.insert(0, str(APPS_DIR))

from rag_api import __version__, identity, ingest, xfcc  # noqa: E402
from rag_api.app import create_app  # noqa: E402
from rag_api.aws import Backends  # noqa: E402
from rag_api.config import ConfigError, Settings  # noqa: E402
from rag_api.faults import FAULT_HEADER, ErrorSchedule  # noqa: E402

GATEWAY_ID = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway"
RAG_API_ID = "spiffe://cluster.local/ns/tenanta/sa/rag-api"
APP_UI_ID = "spiffe://cluster.local/ns/tenanta/sa/app-ui"
HASH = "4f4b3a1d0e5c7a9b8c6d2e1f0a3b5c7d9e1f2a4b6c8d0e2f4a6b8c0d2e4f6a8b"
# What a tenant sidecar adds for a request that came in through the ingress gateway.
GATEWAY_XFCC = f'By={RAG_API_ID};Hash={HASH};Subject="";URI={GATEWAY_ID}'
CLAIMS = {
    "sub": "3f1c2b9e-5d6a-4e7f-8a9b-0c1d2e3f4a5b",
    "iss": "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_TenantA",
    "aud": "7abc1234def5678ghij9012klmn",
    "email": "alice@tenanta.example.com",
    "custom:tenantid": "tenanta",
    "token_use": "id",
    "exp": 1893456000,
}
# The RAG variables every Deployment sets (see Settings); tests add or override the rest.
RAG_ENV = {
    "DOCUMENTS_BUCKET": "platform-tenant-documents",
    "DOCUMENTS_PREFIX": "tenanta/",
    "SESSIONS_TABLE": "tenanta-sessions",
    "AWS_REGION": "us-east-1",
    "LLM_MODELS": f"{HAIKU},{NOVA}",
    "EMBEDDING_MODELS": "all-MiniLM-L6-v2",
}


def b64url(data: bytes, *, pad: bool) -> str:
    encoded = base64.urlsafe_b64encode(data).decode()
    return encoded if pad else encoded.rstrip("=")


def jwt_payload(claims: dict[str, object], *, pad: bool = False) -> str:
    return b64url(json.dumps(claims).encode(), pad=pad)


@dataclass(frozen=True)
class Service:
    """tenanta's settings (its index in place) and backends aimed at moto and the fake Bedrock."""

    settings: Settings
    backends: Backends

    def but(self, **changes: object) -> Settings:
        return replace(self.settings, **changes)


@pytest.fixture(scope="module")
def rag_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Settings]]:
    """moto and the fake Bedrock holding tenanta's index (hash embedder); stopped after the module."""
    with stack(HashEmbedder()) as made:
        settings = made.space()
        made.upload(settings, ingest.build_index(write_corpus(tmp_path_factory.mktemp("c"), TENANTA_DOCS),
                                                 "tenanta", made.embedder))
        yield made, settings


@pytest.fixture
def service(rag_stack: tuple[Stack, Settings]) -> Service:
    """Fresh backends for one app; their clients are closed with the module's stack."""
    made, settings = rag_stack
    return Service(settings, made.backends())


@asynccontextmanager
async def serving(settings: Settings, backends: Backends) -> AsyncIterator[httpx.AsyncClient]:
    """Yield a client of a started app (lifespan run, index loaded); shut the app down afterwards."""
    app = create_app(settings, backends=backends)
    async with app.router.lifespan_context(app):
        assert await asyncio.to_thread(app.state.loader.wait, 30), app.state.readiness.pending()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tenanta.example.com") as client:
            yield client


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- x-forwarded-client-cert ---------------------------------------------------------------


@dataclass(frozen=True)
class XfccCase:
    name: str
    header: str
    elements: list[list[tuple[str, str]]]
    caller: str | None

    def __str__(self) -> str:
        return self.name


XFCC_CASES = [
    XfccCase(
        "an Envoy element with an empty quoted Subject parses",
        GATEWAY_XFCC,
        [[("By", RAG_API_ID), ("Hash", HASH), ("Subject", ""), ("URI", GATEWAY_ID)]],
        GATEWAY_ID,
    ),
    XfccCase(
        "with two elements the caller is the URI of the last one",
        f"By={APP_UI_ID};Hash={HASH};URI={GATEWAY_ID},By={RAG_API_ID};Hash={HASH};URI={APP_UI_ID}",
        [
            [("By", APP_UI_ID), ("Hash", HASH), ("URI", GATEWAY_ID)],
            [("By", RAG_API_ID), ("Hash", HASH), ("URI", APP_UI_ID)],
        ],
        APP_UI_ID,
    ),
    XfccCase(
        "quoted values keep commas, semicolons, equals signs and escaped quotes",
        f'By={RAG_API_ID};Subject="CN=alice, O=Tenant \\"A\\"; OU=x";URI={APP_UI_ID}',
        [[("By", RAG_API_ID), ("Subject", 'CN=alice, O=Tenant "A"; OU=x'), ("URI", APP_UI_ID)]],
        APP_UI_ID,
    ),
    XfccCase(
        "a quoted element separator does not split the element",
        f'Subject="a,b";URI={APP_UI_ID},URI={GATEWAY_ID}',
        [[("Subject", "a,b"), ("URI", APP_UI_ID)], [("URI", GATEWAY_ID)]],
        GATEWAY_ID,
    ),
    XfccCase(
        "keys are case-insensitive and canonicalised",
        f"by={RAG_API_ID};HASH={HASH};uri={APP_UI_ID};dns=app-ui.tenanta.svc",
        [[("By", RAG_API_ID), ("Hash", HASH), ("URI", APP_UI_ID), ("DNS", "app-ui.tenanta.svc")]],
        APP_UI_ID,
    ),
    XfccCase(
        "repeated URI and DNS keys are kept and the SPIFFE URI wins",
        f"By={RAG_API_ID};URI=https://example.com/x;URI={APP_UI_ID};DNS=a.example;DNS=b.example",
        [
            [
                ("By", RAG_API_ID),
                ("URI", "https://example.com/x"),
                ("URI", APP_UI_ID),
                ("DNS", "a.example"),
                ("DNS", "b.example"),
            ]
        ],
        APP_UI_ID,
    ),
    XfccCase(
        "whitespace around separators is ignored",
        f" By={RAG_API_ID} ; URI={GATEWAY_ID} , By={RAG_API_ID};URI = {APP_UI_ID} ",
        [[("By", RAG_API_ID), ("URI", GATEWAY_ID)], [("By", RAG_API_ID), ("URI", APP_UI_ID)]],
        APP_UI_ID,
    ),
    XfccCase(
        "an element without a URI has no caller identity",
        f"By={RAG_API_ID};Hash={HASH}",
        [[("By", RAG_API_ID), ("Hash", HASH)]],
        None,
    ),
    XfccCase(
        "a URL-encoded Cert value is kept verbatim",
        f'By={RAG_API_ID};Cert="-----BEGIN%20CERTIFICATE-----%0AMIIB%0A-----END%20CERTIFICATE-----%0A";URI={APP_UI_ID}',
        [
            [
                ("By", RAG_API_ID),
                ("Cert", "-----BEGIN%20CERTIFICATE-----%0AMIIB%0A-----END%20CERTIFICATE-----%0A"),
                ("URI", APP_UI_ID),
            ]
        ],
        APP_UI_ID,
    ),
]


@pytest.mark.parametrize("case", XFCC_CASES, ids=str)
def test_xfcc_parses(case: XfccCase) -> None:
    elements = xfcc.parse(case.header)
    assert [list(element.pairs) for element in elements] == case.elements
    assert xfcc.caller_spiffe_id(elements) == case.caller


@pytest.mark.parametrize(
    ("header", "message"),
    [
        pytest.param("", "empty header", id="an empty header is refused"),
        pytest.param(f"URI={APP_UI_ID},", "empty element", id="a trailing comma is refused"),
        pytest.param(f"URI={APP_UI_ID};;By=x", "empty element or pair", id="an empty pair is refused"),
        pytest.param("By", "has no '='", id="a key without a value is refused"),
        pytest.param("=x", "empty key", id="an empty key is refused"),
        pytest.param('Subject="CN=a;URI=x', "unterminated", id="an unterminated quote is refused"),
        pytest.param('Subject="a"b;URI=x', "after the value", id="text after a closing quote is refused"),
        pytest.param('Subject=a"b"', "inside an unquoted value", id="a quote inside a bare value is refused"),
        pytest.param('Subject="a\\', "dangling", id="a dangling backslash is refused"),
    ],
)
def test_xfcc_refuses_malformed(header: str, message: str) -> None:
    with pytest.raises(xfcc.XfccError, match=re.escape(message)):
        xfcc.parse(header)


def test_xfcc_element_accessors() -> None:
    [element] = xfcc.parse(f"By={RAG_API_ID};URI={APP_UI_ID};Custom=1")
    assert element.by == RAG_API_ID
    assert element.uris == [APP_UI_ID]
    assert element.first("uri") == APP_UI_ID
    assert element.values("Custom") == ["1"]
    assert element.first("Subject") is None


# --- x-jwt-payload and x-forwarded-for -----------------------------------------------------

# '>>>' and '???' encode to base64 characters that differ between the two alphabets.
URL_ALPHABET_CLAIMS = {"note": ">>>???", **CLAIMS}


@pytest.mark.parametrize(
    "encoded",
    [
        pytest.param(jwt_payload(CLAIMS, pad=False), id="an unpadded payload decodes"),
        pytest.param(jwt_payload(CLAIMS, pad=True), id="a padded payload decodes"),
    ],
)
def test_jwt_payload_decodes(encoded: str) -> None:
    assert identity.decode_jwt_payload(encoded) == CLAIMS


def test_jwt_payload_uses_the_url_alphabet() -> None:
    encoded = jwt_payload(URL_ALPHABET_CLAIMS)
    assert "-" in encoded or "_" in encoded
    assert identity.decode_jwt_payload(encoded) == URL_ALPHABET_CLAIMS


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param("", "not base64url", id="an empty value is malformed"),
        pytest.param("not base64!", "not base64url", id="characters outside the alphabet are malformed"),
        pytest.param(
            base64.standard_b64encode(json.dumps(URL_ALPHABET_CLAIMS).encode()).decode(),
            "not base64url",
            id="the standard base64 alphabet is malformed",
        ),
        pytest.param("abcde", "not base64url", id="an impossible length is malformed"),
        pytest.param(b64url(b"not json", pad=False), "does not decode to JSON", id="non-JSON is malformed"),
        pytest.param(b64url(b"\xff\xfe", pad=False), "does not decode to JSON", id="non-UTF-8 is malformed"),
        pytest.param(b64url(b"[1, 2]", pad=False), "not an object", id="a JSON array is malformed"),
    ],
)
def test_jwt_payload_refuses_malformed(value: str, message: str) -> None:
    with pytest.raises(identity.HeaderError, match=re.escape(message)):
        identity.decode_jwt_payload(value)


def test_forwarded_for_joins_header_lines_and_the_rightmost_entry_is_the_client() -> None:
    entries = identity.forwarded_for(["203.0.113.7, 10.0.0.1", " ,198.51.100.20 "])
    assert entries == ["203.0.113.7", "10.0.0.1", "198.51.100.20"]
    assert identity.client_address(entries) == "198.51.100.20"
    assert identity.client_address([]) is None


# --- probes and /whoami --------------------------------------------------------------------


@pytest.mark.anyio
async def test_probes_answer_after_startup(service: Service) -> None:
    async with serving(service.settings, service.backends) as client:
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


@pytest.mark.anyio
async def test_readiness_is_held_until_startup_and_by_any_registered_hold(service: Service) -> None:
    app = create_app(service.settings, backends=service.backends)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://rag-api") as client:
        before = await client.get("/readyz")
        async with app.router.lifespan_context(app):
            assert await asyncio.to_thread(app.state.loader.wait, 30)
            app.state.readiness.hold("maintenance", "draining for maintenance")
            held = await client.get("/readyz")
            app.state.readiness.release("maintenance")
            released = await client.get("/readyz")
        after = await client.get("/readyz")
        health_after = await client.get("/healthz")
    assert before.status_code == 503
    assert before.json()["waiting_for"]["startup"] == "application startup has not finished"
    assert before.json()["waiting_for"]["model"] == "loading embedding model all-MiniLM-L6-v2"
    assert before.json()["waiting_for"]["index"].startswith("waiting for the embedding model before loading s3://")
    assert (held.status_code, held.json()) == (
        503,
        {"status": "not ready", "waiting_for": {"maintenance": "draining for maintenance"}},
    )
    assert released.status_code == 200
    assert (after.status_code, list(after.json()["waiting_for"])) == (503, ["shutdown"])
    assert health_after.status_code == 200


@pytest.mark.anyio
async def test_whoami_reports_everything_the_proxies_established(service: Service) -> None:
    settings = service.but(tenant_host="tenanta.example.com", app_version="1.2.3")
    async with serving(settings, service.backends) as client:
        response = await client.get(
            "/whoami",
            headers={
                "host": "tenanta.example.com",
                "x-forwarded-client-cert": GATEWAY_XFCC,
                "x-jwt-payload": jwt_payload(CLAIMS),
                "x-auth-request-tenantid": "tenanta",
                "x-forwarded-for": "10.9.8.7, 203.0.113.7",
                "x-envoy-external-address": "203.0.113.7",
                "x-request-id": "6f1d2c3b-0a9e-4d8c-b7a6-5f4e3d2c1b0a",
            },
        )
    assert response.status_code == 200
    assert response.json() == {
        "tenant": "tenanta",
        "version": "1.2.3",
        "host": "tenanta.example.com",
        "peer": {"spiffe_id": GATEWAY_ID, "by": RAG_API_ID, "xfcc": GATEWAY_XFCC},
        "claims": CLAIMS,
        "tenant_header": "tenanta",
        "client_address": "203.0.113.7",
        "forwarded_for": ["10.9.8.7", "203.0.113.7"],
        "external_address": "203.0.113.7",
        "request_id": "6f1d2c3b-0a9e-4d8c-b7a6-5f4e3d2c1b0a",
    }


@pytest.mark.anyio
async def test_whoami_reports_null_for_what_no_proxy_established(service: Service) -> None:
    async with serving(service.settings, service.backends) as client:
        response = await client.get("/whoami")
    assert response.status_code == 200
    assert response.json() == {
        "tenant": "tenanta",
        "version": __version__,
        "host": "tenanta.example.com",
        "peer": {"spiffe_id": None, "by": None, "xfcc": None},
        "claims": None,
        "tenant_header": None,
        "client_address": None,
        "forwarded_for": [],
        "external_address": None,
        "request_id": None,
    }


@pytest.mark.anyio
async def test_whoami_names_the_last_xfcc_element_and_the_rightmost_forwarded_for(service: Service) -> None:
    header = f'By={APP_UI_ID};Subject="O=a, CN=b";URI={GATEWAY_ID},By={RAG_API_ID};Hash={HASH};URI={APP_UI_ID}'
    async with serving(service.settings, service.backends) as client:
        response = await client.get(
            "/whoami",
            headers=[
                ("x-forwarded-client-cert", header),
                ("x-forwarded-for", "1.1.1.1, 2.2.2.2"),
                ("x-forwarded-for", "203.0.113.9"),
            ],
        )
    body = response.json()
    assert body["peer"] == {"spiffe_id": APP_UI_ID, "by": RAG_API_ID, "xfcc": header}
    assert (body["client_address"], body["forwarded_for"]) == ("203.0.113.9", ["1.1.1.1", "2.2.2.2", "203.0.113.9"])


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("headers", "message"),
    [
        pytest.param(
            [("x-jwt-payload", "%%%")], "x-jwt-payload is not base64url", id="a malformed x-jwt-payload is 400"
        ),
        pytest.param(
            [("x-jwt-payload", b64url(b"[]", pad=False))], "not an object", id="a non-object x-jwt-payload is 400"
        ),
        pytest.param(
            [("x-jwt-payload", jwt_payload(CLAIMS)), ("x-jwt-payload", jwt_payload(CLAIMS))],
            "appears 2 times",
            id="a repeated x-jwt-payload is 400",
        ),
        pytest.param(
            [("x-forwarded-client-cert", 'URI="unterminated')],
            "x-forwarded-client-cert is malformed",
            id="a malformed x-forwarded-client-cert is 400",
        ),
    ],
)
async def test_whoami_refuses_malformed_proxy_headers(
    service: Service, headers: list[tuple[str, str]], message: str
) -> None:
    async with serving(service.settings, service.backends) as client:
        response = await client.get("/whoami", headers=headers)
    assert response.status_code == 400
    assert message in response.json()["detail"]


@pytest.mark.anyio
@pytest.mark.parametrize(("method", "status"), [("GET", 405), ("POST", 401)], ids=["GET /rag is 405", "POST /rag without identity is 401"])
async def test_rag_answers_only_a_post_with_an_identity(service: Service, method: str, status: int) -> None:
    # The full contract of /rag is in tests/test_rag_http.py and tests/test_rag_service.py.
    async with serving(service.settings, service.backends) as client:
        response = await client.request(method, "/rag", json={"question": "What is our refund policy?"})
    assert response.status_code == status


@pytest.mark.anyio
async def test_every_request_writes_one_json_access_line(service: Service, capsys: pytest.CaptureFixture[str]) -> None:
    async with serving(service.settings, service.backends) as client:
        capsys.readouterr()
        await client.get("/whoami", headers={"x-request-id": "req-1"})
        await client.get("/missing")
        out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines()]
    access = [line for line in lines if line["msg"] == "access"]
    assert [(a["method"], a["path"], a["status"], a["request_id"]) for a in access] == [
        ("GET", "/whoami", 200, "req-1"),
        ("GET", "/missing", 404, None),
    ]
    assert all(isinstance(a["duration_ms"], float) and a["duration_ms"] >= 0 for a in access)
    assert all(a["tenant"] == "tenanta" for a in access)


# --- faults --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "requests", "failures"),
    [
        pytest.param("0", 100, 0, id="rate 0 fails none of 100"),
        pytest.param("0.2", 100, 20, id="rate 0.2 fails exactly 20 of 100"),
        pytest.param("0.29", 100, 29, id="rate 0.29 fails exactly 29 of 100"),
        pytest.param("0.333", 1000, 333, id="rate 0.333 fails exactly 333 of 1000"),
        pytest.param("0.05", 30, 1, id="rate 0.05 fails exactly 1 of 30"),
        pytest.param("1", 50, 50, id="rate 1 fails all of 50"),
    ],
)
def test_error_schedule_realises_exactly_the_rate(rate: str, requests: int, failures: int) -> None:
    schedule = ErrorSchedule(Settings.from_env({**VALID, "FAULT_ERROR_RATE": rate}).fault_error_rate)
    outcomes = [schedule.next_fails() for _ in range(requests)]
    assert [index for index, _ in outcomes] == list(range(requests))
    assert sum(fails for _, fails in outcomes) == failures


@pytest.mark.anyio
@pytest.mark.chaos
async def test_error_rate_fails_exactly_that_share_of_requests_and_never_a_probe(service: Service) -> None:
    async with serving(service.but(fault_error_rate=Fraction(1, 5)), service.backends) as client:
        statuses = []
        failed = None
        for _ in range(100):
            response = await client.get("/whoami")
            statuses.append(response.status_code)
            probes = [await client.get("/healthz"), await client.get("/readyz")]
            assert [probe.status_code for probe in probes] == [200, 200]
            if response.status_code == 500:
                failed = response
    assert statuses.count(500) == 20
    assert statuses.count(200) == 80
    assert [i for i, status in enumerate(statuses) if status == 500] == list(range(4, 100, 5))
    assert failed is not None and failed.headers[FAULT_HEADER] == "error-rate"
    assert failed.json()["fault"] == "error_rate"
    assert "injected fault" in failed.json()["detail"]


@pytest.mark.anyio
@pytest.mark.chaos
async def test_latency_delays_requests_but_not_probes(service: Service) -> None:
    latency_s = 0.3
    async with serving(service.but(fault_latency_ms=int(latency_s * 1000)), service.backends) as client:
        start = time.perf_counter()
        whoami = await client.get("/whoami")
        whoami_s = time.perf_counter() - start
        start = time.perf_counter()
        probes = [await client.get("/healthz"), await client.get("/readyz")]
        probes_s = time.perf_counter() - start
    assert whoami.status_code == 200 and whoami_s >= latency_s - 0.005  # timer granularity
    assert [probe.status_code for probe in probes] == [200, 200] and probes_s < latency_s


@pytest.mark.anyio
@pytest.mark.chaos
async def test_crash_on_start_fails_the_lifespan(service: Service) -> None:
    app = create_app(service.but(fault_crash_on_start=True), backends=service.backends)
    with pytest.raises(RuntimeError, match="FAULT_CRASH_ON_START=true"):
        async with app.router.lifespan_context(app):
            pass


# --- configuration -------------------------------------------------------------------------


TENANTA_ARN = "arn:aws:bedrock:us-east-1:111122223333:provisioned-model/tenanta-support"


def test_settings_from_a_full_environment() -> None:
    settings = Settings.from_env(
        {
            "TENANT_ID": "tenanta",
            "TENANT_HOST": "tenanta.example.com",
            "APP_VERSION": "1.1.0-canary.1",
            "FAULT_ERROR_RATE": "0.25",
            "FAULT_LATENCY_MS": "150",
            "FAULT_CRASH_ON_START": "FALSE",
            **RAG_ENV,
            "LLM_MODELS": f" {HAIKU} , {NOVA},{TENANTA_ARN}",
            "RETRIEVAL_TOP_K": "5",
            "INDEX_RETRY_SECONDS": "0.5",
            "OMP_NUM_THREADS": "1",
        }
    )
    assert settings == Settings(
        tenant_id="tenanta",
        tenant_host="tenanta.example.com",
        app_version="1.1.0-canary.1",
        fault_error_rate=Fraction(1, 4),
        fault_latency_ms=150,
        fault_crash_on_start=False,
        documents_bucket="platform-tenant-documents",
        documents_prefix="tenanta/",
        sessions_table="tenanta-sessions",
        aws_region="us-east-1",
        llm_models=(HAIKU, NOVA, TENANTA_ARN),
        embedding_models=("all-MiniLM-L6-v2",),
        retrieval_top_k=5,
        index_retry_seconds=0.5,
        threads=1,
    )


def test_settings_defaults_turn_every_fault_off() -> None:
    settings = Settings.from_env({"TENANT_ID": "tenantb", "FAULT_ERROR_RATE": "", "FAULT_LATENCY_MS": " ", **RAG_ENV})
    assert settings == rag_settings(
        tenant_id="tenantb", app_version=__version__, llm_models=(HAIKU, NOVA), index_retry_seconds=5.0, threads=None
    )
    assert (settings.retrieval_top_k, settings.fault_error_rate, settings.fault_latency_ms) == (3, 0, 0)


VALID = {"TENANT_ID": "tenanta", **RAG_ENV}


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        pytest.param(RAG_ENV, "TENANT_ID is required", id="a missing TENANT_ID is refused"),
        pytest.param({**VALID, "TENANT_ID": "  "}, "TENANT_ID is required", id="a blank TENANT_ID is refused"),
        pytest.param({**VALID, "TENANT_ID": "Tenant_A"}, "TENANT_ID='Tenant_A'", id="a TENANT_ID that is no DNS label is refused"),
        pytest.param({**VALID, "TENANT_HOST": "bad host"}, "TENANT_HOST='bad host'", id="a TENANT_HOST that is no hostname is refused"),
        pytest.param({**VALID, "APP_VERSION": "1 0"}, "APP_VERSION='1 0'", id="an APP_VERSION with a space is refused"),
        pytest.param({**VALID, "FAULT_ERROR_RATE": "1.5"}, "FAULT_ERROR_RATE='1.5'", id="an error rate above 1 is refused"),
        pytest.param({**VALID, "FAULT_ERROR_RATE": "-0.1"}, "FAULT_ERROR_RATE='-0.1'", id="a negative error rate is refused"),
        pytest.param({**VALID, "FAULT_ERROR_RATE": "nan"}, "FAULT_ERROR_RATE='nan'", id="a NaN error rate is refused"),
        pytest.param({**VALID, "FAULT_ERROR_RATE": "often"}, "FAULT_ERROR_RATE='often'", id="a word as error rate is refused"),
        pytest.param({**VALID, "FAULT_LATENCY_MS": "-5"}, "FAULT_LATENCY_MS='-5'", id="a negative latency is refused"),
        pytest.param({**VALID, "FAULT_LATENCY_MS": "1.5"}, "FAULT_LATENCY_MS='1.5'", id="a fractional latency is refused"),
        pytest.param({**VALID, "FAULT_LATENCY_MS": "9999999"}, "FAULT_LATENCY_MS='9999999'", id="a latency over 10 minutes is refused"),
        pytest.param({**VALID, "FAULT_CRASH_ON_START": "yes"}, "FAULT_CRASH_ON_START='yes'", id="a crash flag other than true or false is refused"),
        pytest.param({**VALID, "DOCUMENTS_BUCKET": ""}, "DOCUMENTS_BUCKET is required", id="a missing bucket is refused"),
        pytest.param({**VALID, "DOCUMENTS_BUCKET": "Docs_Bucket"}, "DOCUMENTS_BUCKET='Docs_Bucket'", id="a bucket name with capitals is refused"),
        pytest.param({**VALID, "DOCUMENTS_PREFIX": "tenanta"}, "DOCUMENTS_PREFIX='tenanta'", id="a prefix without a trailing slash is refused"),
        pytest.param({**VALID, "DOCUMENTS_PREFIX": "/tenanta/"}, "DOCUMENTS_PREFIX='/tenanta/'", id="a prefix with a leading slash is refused"),
        pytest.param({k: v for k, v in VALID.items() if k != "SESSIONS_TABLE"}, "SESSIONS_TABLE is required", id="a missing sessions table is refused"),
        pytest.param({**VALID, "SESSIONS_TABLE": "t#1"}, "SESSIONS_TABLE='t#1'", id="a table name with '#' is refused"),
        pytest.param({**VALID, "AWS_REGION": "moon"}, "AWS_REGION='moon'", id="a region that is no region is refused"),
        pytest.param({**VALID, "LLM_MODELS": " "}, "LLM_MODELS is required", id="an empty model list is refused"),
        pytest.param({**VALID, "LLM_MODELS": f"{HAIKU},,{NOVA}"}, "LLM_MODELS=", id="an empty model entry is refused"),
        pytest.param({**VALID, "LLM_MODELS": "claude 3"}, "LLM_MODELS: 'claude 3'", id="a model id with a space is refused"),
        pytest.param({**VALID, "LLM_MODELS": f"{HAIKU},{HAIKU}"}, "LLM_MODELS lists", id="a model listed twice is refused"),
        pytest.param({**VALID, "EMBEDDING_MODELS": "all-mpnet-base-v2"}, "EMBEDDING_MODELS: 'all-mpnet-base-v2' is not a supported", id="an embedding model the image does not carry is refused"),
        pytest.param({**VALID, "RETRIEVAL_TOP_K": "0"}, "RETRIEVAL_TOP_K='0'", id="top k 0 is refused"),
        pytest.param({**VALID, "RETRIEVAL_TOP_K": "11"}, "RETRIEVAL_TOP_K='11'", id="top k 11 is refused"),
        pytest.param({**VALID, "RETRIEVAL_TOP_K": "three"}, "RETRIEVAL_TOP_K='three'", id="a word as top k is refused"),
        pytest.param({**VALID, "INDEX_RETRY_SECONDS": "0"}, "INDEX_RETRY_SECONDS='0'", id="a zero retry interval is refused"),
        pytest.param({**VALID, "INDEX_RETRY_SECONDS": "inf"}, "INDEX_RETRY_SECONDS='inf'", id="an infinite retry interval is refused"),
        pytest.param({**VALID, "INDEX_RETRY_SECONDS": "soon"}, "INDEX_RETRY_SECONDS='soon'", id="a word as retry interval is refused"),
        pytest.param({**VALID, "OMP_NUM_THREADS": "0"}, "OMP_NUM_THREADS='0'", id="zero threads are refused"),
    ],
)
def test_settings_refuse_a_bad_value_naming_the_variable(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(env)
    [reported] = raised.value.problems
    assert reported.startswith(problem)


def test_settings_report_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"FAULT_ERROR_RATE": "2", "FAULT_CRASH_ON_START": "maybe"})
    assert [problem.split("=")[0].split(" ")[0] for problem in raised.value.problems] == [
        "TENANT_ID",
        "FAULT_ERROR_RATE",
        "FAULT_CRASH_ON_START",
        "DOCUMENTS_BUCKET",
        "DOCUMENTS_PREFIX",
        "SESSIONS_TABLE",
        "AWS_REGION",
        "LLM_MODELS",
        "EMBEDDING_MODELS",
    ]


# --- as a process --------------------------------------------------------------------------


# Nothing listens on port 9 (discard): the process runs, its index stays unavailable.
NO_AWS = {f"AWS_ENDPOINT_URL_{service}": "http://127.0.0.1:9" for service in ("S3", "DYNAMODB", "BEDROCK_RUNTIME")}


def process_env(**overrides: str) -> dict[str, str]:
    ours = {"TENANT_ID", "TENANT_HOST", "APP_VERSION", "RETRIEVAL_TOP_K", "INDEX_RETRY_SECONDS", *RAG_ENV}
    env = {k: v for k, v in os.environ.items() if k not in ours and not k.startswith(("FAULT_", "AWS_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(APPS_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update({**RAG_ENV, **NO_AWS, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "OMP_NUM_THREADS": "1"})
    env.update(overrides)
    return env


PYTHON_M = [sys.executable, "-m", "rag_api", "--port", "0"]
# The image's command line (platform/apps/rag_api/Dockerfile), on any free port.
UVICORN = [
    *(sys.executable, "-m", "uvicorn", "rag_api.app:app", "--app-dir", str(APPS_DIR), "--port", "0"),
    *("--no-access-log", "--no-proxy-headers"),
]
LAUNCHERS = [pytest.param(PYTHON_M, id="python -m rag_api"), pytest.param(UVICORN, id="uvicorn rag_api.app:app")]


@pytest.mark.chaos
@pytest.mark.parametrize("command", LAUNCHERS)
def test_crash_on_start_exits_non_zero_with_a_log_line(command: list[str]) -> None:
    done = subprocess.run(
        command,
        env=process_env(TENANT_ID="tenanta", FAULT_CRASH_ON_START="true"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done
    [line] = [json.loads(line) for line in done.stdout.splitlines() if "crash_on_start" in line]
    assert (line["level"], line["msg"]) == ("critical", "FAULT_CRASH_ON_START=true: crashing at startup on purpose")
    assert "Application startup failed" in done.stderr


@pytest.mark.parametrize("command", LAUNCHERS)
def test_bad_configuration_exits_2_naming_each_variable(command: list[str]) -> None:
    done = subprocess.run(
        command,
        env=process_env(FAULT_ERROR_RATE="high"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done
    assert "refusing to start, invalid configuration" in done.stderr
    assert "TENANT_ID is required" in done.stderr
    assert "FAULT_ERROR_RATE='high' must be a number from 0 to 1" in done.stderr


@dataclass
class Running:
    url: str
    process: subprocess.Popen[str]
    stdout: list[str] = field(default_factory=list)


@contextmanager
def running(command: list[str], env: dict[str, str], timeout: float = 30) -> Iterator[Running]:
    """Start the service, yield once uvicorn reports its address; terminate it on exit."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr_lines: queue.Queue[str | None] = queue.Queue()
    found: Running | None = None

    def pump_stderr() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            stderr_lines.put(line)
        stderr_lines.put(None)

    threading.Thread(target=pump_stderr, daemon=True).start()
    try:
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while found is None:
            line = stderr_lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                raise AssertionError(f"{command} exited before serving:\n{''.join(seen)}")
            seen.append(line)
            match = re.search(r"Uvicorn running on (http://\S+)", line)
            if match:
                found = Running(url=match.group(1), process=process)
        yield found
    finally:
        process.terminate()
        try:
            out, _ = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
        if found is not None:
            found.stdout.extend(out.splitlines())


@pytest.mark.parametrize("command", LAUNCHERS)
def test_the_service_runs_as_a_process(command: list[str]) -> None:
    env = process_env(TENANT_ID="tenanta", APP_VERSION="9.9.9")
    with running(command, env) as service:
        with httpx.Client(base_url=service.url, timeout=10) as client:
            health = client.get("/healthz")
            whoami = client.get("/whoami", headers={"x-forwarded-client-cert": GATEWAY_XFCC})
    assert health.status_code == 200
    assert (whoami.json()["tenant"], whoami.json()["version"]) == ("tenanta", "9.9.9")
    assert whoami.json()["peer"]["spiffe_id"] == GATEWAY_ID
    lines = [json.loads(line) for line in service.stdout]
    access = [line for line in lines if line["msg"] == "access"]
    assert [(a["method"], a["path"], a["status"]) for a in access] == [("GET", "/healthz", 200), ("GET", "/whoami", 200)]
    # SIGTERM (what the kubelet sends) shuts down through the lifespan; uvicorn then re-raises it.
    assert lines[-1]["event"] == "shutdown"
    assert service.process.returncode == -signal.SIGTERM
