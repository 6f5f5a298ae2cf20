"""The HTTP contract of POST /rag and GET /sessions/{id}: identity, models, and bad input.

Retrieval quality does not matter here, so the index is built with the hash embedder; the
real model's tests are in tests/test_rag_service.py. Every bad input is a 4xx that says what
is wrong; the test client re-raises any server error, so a 500 cannot pass unnoticed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient
from test_rag_fakes import (
    HAIKU,
    NOVA,
    TENANTA_ARN,
    TENANTA_DOCS,
    TENANTB_ARN,
    HashEmbedder,
    Stack,
    identity_headers,
    serving,
    stack,
    write_corpus,
)

from rag_api import ingest
from rag_api.rag import MAX_BODY_BYTES

SESSION = "session-0001"
QUESTION = {"question": "How long do refunds take?", "session_id": SESSION}


@dataclass
class Served:
    client: TestClient
    stack: Stack


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One ready tenanta app on moto and the fake Bedrock, shared by this module's stateless tests."""
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"), TENANTA_DOCS)
    with stack(HashEmbedder()) as made:
        settings = made.space()
        made.upload(settings, ingest.build_index(corpus, "tenanta", made.embedder))
        with serving(settings, made.backends()) as client:
            yield Served(client, made)


def post(client: TestClient, body: Any = None, *, headers: dict[str, str] | None = None, raw: bytes | None = None,
         content_type: str | None = "application/json") -> Any:
    sent = {**identity_headers(), **(headers or {})}
    if content_type is not None:
        sent["content-type"] = content_type
    data = raw if raw is not None else json.dumps(QUESTION if body is None else body).encode()
    return client.post("/rag", content=data, headers=sent)


# --- identity ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    name: str
    headers: dict[str, str]
    status: int
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.name} -> {self.status}"


CALLERS = [
    Caller("a tenanta user", identity_headers(), 200),
    Caller("no verified identity", {"x-auth-request-tenantid": "tenanta"}, 401, "x-jwt-payload"),
    Caller("a malformed x-jwt-payload", {**identity_headers(), "x-jwt-payload": "%%%"}, 401, "not base64url"),
    Caller("a token without custom:tenantid", {**identity_headers(), "x-jwt-payload": "eyJzdWIiOiJhIn0"}, 401,
           "no custom:tenantid claim"),
    Caller("a tenantb token", identity_headers(claim="tenantb"), 403, "custom:tenantid 'tenantb'"),
    Caller("no tenant header", {"x-jwt-payload": identity_headers()["x-jwt-payload"]}, 401,
           "x-auth-request-tenantid is missing"),
    Caller("a tenantb tenant header", identity_headers(header="tenantb"), 403, "x-auth-request-tenantid 'tenantb'"),
    Caller("a token without sub", identity_headers(sub=None), 401, "sub claim"),
]


@pytest.mark.parametrize("case", CALLERS, ids=str)
def test_rag_checks_both_tenant_statements(served: Served, case: Caller) -> None:
    response = served.client.post("/rag", json=QUESTION, headers=case.headers)
    assert response.status_code == case.status, response.text
    if case.status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
    if case.detail:
        assert case.detail in response.json()["detail"]


@pytest.mark.parametrize("case", CALLERS, ids=str)
def test_sessions_checks_both_tenant_statements(served: Served, case: Caller) -> None:
    response = served.client.get(f"/sessions/{SESSION}", headers=case.headers)
    assert response.status_code == case.status, response.text
    if case.detail:
        assert case.detail in response.json()["detail"]


# --- models -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "status", "model"),
    [
        pytest.param({}, 200, HAIKU, id="no llm_model uses the tenant's first model"),
        pytest.param({"llm_model": NOVA}, 200, NOVA, id="a listed model is used"),
        pytest.param({"llm_model": TENANTA_ARN}, 200, TENANTA_ARN, id="the tenant's own provisioned model is used"),
        pytest.param({"llm_model": TENANTB_ARN}, 400, None, id="tenantb's provisioned model is refused"),
        pytest.param({"llm_model": "amazon.titan-text-express-v1"}, 400, None, id="an unlisted model is refused"),
        pytest.param({"embedding_model": "all-mpnet-base-v2"}, 400, None, id="an unlisted embedding model is refused"),
    ],
)
def test_only_the_tenants_models_are_used(served: Served, fields: dict[str, str], status: int,
                                          model: str | None) -> None:
    calls = len(served.stack.bedrock.calls)
    response = post(served.client, {**QUESTION, **fields})
    assert response.status_code == status, response.text
    new_calls = served.stack.bedrock.calls[calls:]
    if status == 200:
        assert response.json()["llm_model"] == model
        assert [call["model"] for call in new_calls] == [model]
    else:
        assert "not allowed for tenant tenanta" in response.json()["detail"]
        assert new_calls == []


# --- bad input --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadInput:
    name: str
    status: int
    detail: str
    body: Any = None
    raw: bytes | None = None
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.name} is {self.status}"


def question(**changes: Any) -> dict[str, Any]:
    return {**QUESTION, **changes}


BAD_INPUT = [
    BadInput("text/plain", 415, "Content-Type must be application/json", content_type="text/plain"),
    BadInput("no content type", 415, "Content-Type must be application/json", content_type=None),
    BadInput("a latin-1 charset", 415, "not 'application/json; charset=latin-1'",
             content_type="application/json; charset=latin-1"),
    BadInput("malformed JSON", 400, "not valid JSON", raw=b'{"question": '),
    BadInput("an empty body", 400, "not valid JSON", raw=b""),
    BadInput("a body that is not UTF-8", 400, "not UTF-8", raw=b'{"question": "caf\xe9"}'),
    BadInput("JSON nested too deeply", 400, "not valid JSON", raw=b"[" * 8000 + b"]" * 8000),
    BadInput("a Content-Length that is no number", 400, "Content-Length", headers={"content-length": "1e3"}),
    BadInput("a JSON array", 422, "model_type", body=[QUESTION]),
    BadInput("an unknown field", 422, "extra_forbidden", body=question(temperature=1)),
    BadInput("a missing question", 422, "missing", body={"session_id": SESSION}),
    BadInput("a null question", 422, "string_type", body=question(question=None)),
    BadInput("a number as question", 422, "string_type", body=question(question=42)),
    BadInput("an empty question", 422, "string_too_short", body=question(question="")),
    BadInput("a blank question", 422, "must not be blank", body=question(question=" \n\t ")),
    BadInput("a question over 2000 characters", 422, "string_too_long", body=question(question="q" * 2001)),
    BadInput("a NUL in the question", 422, "NUL", body=question(question="a\x00b")),
    BadInput("a lone surrogate in the question", 400, "lone surrogate", raw=b'{"question": "\\ud800", "session_id": "'
             + SESSION.encode() + b'"}'),
    BadInput("a lone surrogate in an unknown key", 400, "lone surrogate", raw=b'{"\\udfff": 1}'),
    BadInput("a short session id", 422, "string_pattern_mismatch", body=question(session_id="short")),
    BadInput("a session id with '#'", 422, "string_pattern_mismatch", body=question(session_id="abcd#efgh")),
    BadInput("a session id with a newline", 422, "string_pattern_mismatch", body=question(session_id="abcdefgh\n")),
    BadInput("a session id over 128 characters", 422, "string_pattern_mismatch", body=question(session_id="s" * 129)),
    BadInput("top_k 0", 422, "greater_than_equal", body=question(top_k=0)),
    BadInput("top_k 11", 422, "less_than_equal", body=question(top_k=11)),
    BadInput("top_k as a string", 422, "int_type", body=question(top_k="3")),
    BadInput("top_k as a float", 422, "int_type", body=question(top_k=3.0)),
    BadInput("top_k true", 422, "int_type", body=question(top_k=True)),
    BadInput("NaN as top_k", 400, "NaN is not JSON", raw=b'{"question": "q?", "session_id": "' + SESSION.encode()
             + b'", "top_k": NaN}'),
    BadInput("Infinity as question", 400, "Infinity is not JSON", raw=b'{"question": Infinity}'),
    BadInput("an empty llm_model", 422, "string_too_short", body=question(llm_model="")),
]


@pytest.mark.parametrize("case", BAD_INPUT, ids=str)
def test_bad_input_is_a_4xx_that_says_why(served: Served, case: BadInput) -> None:
    response = post(served.client, case.body, raw=case.raw, content_type=case.content_type, headers=case.headers)
    assert response.status_code == case.status, response.text
    assert case.detail in json.dumps(response.json()["detail"])


def test_the_positive_control_of_the_bad_input_table_answers(served: Served) -> None:
    response = post(served.client, question(top_k=1, llm_model=NOVA, embedding_model="all-MiniLM-L6-v2"))
    assert response.status_code == 200, response.text
    assert len(response.json()["sources"]) == 1


any_text = st.text(st.characters(codec=None), max_size=40)  # surrogates included
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)
near_requests = st.fixed_dictionaries(
    {"question": json_values | any_text, "session_id": json_values | st.just(SESSION)},
    optional={"top_k": json_values, "llm_model": json_values, "embedding_model": json_values, "x": json_values},
)


@settings(max_examples=150, deadline=None)
@given(body=st.one_of(json_values, near_requests))
def test_no_json_value_makes_the_service_fail(served: Served, body: Any) -> None:
    raw = json.dumps(body, ensure_ascii=True).encode()  # escapes keep lone surrogates in the JSON
    response = post(served.client, raw=raw)
    assert response.status_code in {200, 400, 422}, response.text


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=200))
def test_no_byte_string_makes_the_service_fail(served: Served, raw: bytes) -> None:
    response = post(served.client, raw=raw)
    assert response.status_code in {400, 422}, response.text


def test_a_bad_session_id_in_the_path_is_refused(served: Served) -> None:
    response = served.client.get("/sessions/bad%23id", headers=identity_headers())
    assert response.status_code == 422


# --- size -------------------------------------------------------------------------------------


def padded(size: int) -> bytes:
    """A valid request of exactly ``size`` bytes (JSON whitespace as padding)."""
    body = json.dumps(QUESTION).encode()
    return body[:-1] + b" " * (size - len(body)) + b"}"


@pytest.mark.parametrize(
    ("size", "chunked", "status"),
    [
        pytest.param(MAX_BODY_BYTES, False, 200, id="a body of exactly 16 KiB is answered"),
        pytest.param(MAX_BODY_BYTES + 1, False, 413, id="a body one byte over 16 KiB is 413"),
        pytest.param(MAX_BODY_BYTES, True, 200, id="a chunked body of exactly 16 KiB is answered"),
        pytest.param(MAX_BODY_BYTES + 1, True, 413, id="a chunked body one byte over 16 KiB is 413"),
        pytest.param(10 * MAX_BODY_BYTES, True, 413, id="a chunked body of 160 KiB is 413"),
    ],
)
def test_bodies_over_16_kib_are_refused_before_parsing(served: Served, size: int, chunked: bool, status: int) -> None:
    data = padded(size)
    assert len(data) == size
    content = iter([data[i:i + 4096] for i in range(0, size, 4096)]) if chunked else data
    headers = {**identity_headers(), "content-type": "application/json"}
    response = served.client.post("/rag", content=content, headers=headers)
    assert response.status_code == status, response.text
    if status == 413:
        assert f"at most {MAX_BODY_BYTES} are accepted" in response.json()["detail"]


def test_a_declared_oversize_body_is_refused_from_its_content_length(served: Served) -> None:
    headers = {**identity_headers(), "content-type": "application/json", "content-length": "99999999999999999999"}
    response = served.client.post("/rag", content=b"{}", headers=headers)
    assert response.status_code == 413
