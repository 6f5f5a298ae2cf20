"""Malformed or oversized requests get a 4xx that says what is wrong, never a 5xx."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures.platform import Outcome
from suites.rag.conftest import new_session

pytestmark = pytest.mark.standalone_required

GOOD = {"question": "What are your support hours?", "session_id": "s-validation-0001"}


def _with(**changes) -> bytes:
    body = {**GOOD, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


BAD = {
    "not json": (b"what are your support hours?", "application/json"),
    "truncated json": (b'{"question": "hours?", "session_id": "s-valid', "application/json"),
    "json array": (b'["question"]', "application/json"),
    "json null": (b"null", "application/json"),
    "empty body": (b"", "application/json"),
    "form encoded": (b"question=hours&session_id=s-validation-0001", "application/x-www-form-urlencoded"),
    "text/plain": (_with(), "text/plain"),
    "question missing": (_with(question=...), "application/json"),
    "question empty": (_with(question=""), "application/json"),
    "question blank": (_with(question=" \n\t "), "application/json"),
    "question too long": (_with(question="why " * 501), "application/json"),
    "question not a string": (_with(question={"$ne": None}), "application/json"),
    "session id missing": (_with(session_id=...), "application/json"),
    "session id too short": (_with(session_id="abc"), "application/json"),
    "session id with a slash": (_with(session_id="../../tenantb/s-1"), "application/json"),
    "session id with a hash": (_with(session_id="alice#s-validation-0001"), "application/json"),
    "session id not ascii": (_with(session_id="sessión-0001"), "application/json"),
    "top_k zero": (_with(top_k=0), "application/json"),
    "top_k too large": (_with(top_k=1000), "application/json"),
    "top_k a string": (_with(top_k="3; drop"), "application/json"),
    "unknown field": (_with(tenant="tenantb"), "application/json"),
    "invalid utf-8": (b'{"question": "\xff\xfe", "session_id": "s-validation-0001"}', "application/json"),
    "deeply nested": (b'{"question": ' + b"[" * 5000 + b"]" * 5000 + b', "session_id": "s-validation-0001"}',
                      "application/json"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_request_gets_a_4xx(chat, tenant, case):
    body, content_type = BAD[case]
    # Control: the same tenant, host and token, with a good request.
    chat.post(tenant, _with(session_id=new_session()), content_type="application/json").expect(Outcome.OK)
    res = chat.post(tenant, body, content_type=content_type)
    assert res.status is not None and 400 <= res.status < 500, f"{case}: {res.describe()}"
    assert res.json().get("detail"), f"{case}: a 4xx must say why: {res.describe()}"


def test_oversized_body_is_refused_with_413(chat, tenant):
    body = _with(question="a" * 1000, padding="x" * (64 * 1024))
    res = chat.post(tenant, body)
    assert res.status == 413, res.describe()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.dictionaries(st.sampled_from(["question", "session_id", "top_k", "llm_model", "embedding_model",
                                              "history", "tenant"]), JSON_VALUES, max_size=5))
def test_no_body_makes_rag_api_fail(chat, platform, extra):
    tenant = platform.tenants[0]
    res = chat.post(tenant, json.dumps({**GOOD, **extra}).encode())
    assert res.status is not None and res.status < 500, res.describe()
