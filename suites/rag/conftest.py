"""Fixtures of the RAG suite: a signed-in user's chat through the gateway, each tenant's
corpus (documents, marker strings, labelled questions) read from the platform under test,
and the emulated Bedrock's record of the calls a test made."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from fixtures import corpus as corpora
from fixtures.platform import CallResult, Tenant, user_headers


class Chat:
    """POST /api/rag and GET /api/sessions/<id> on a tenant's host, as its signed-in user."""

    def __init__(self, platform: Any) -> None:
        self.platform = platform
        self._tokens: dict[tuple[str, str], str] = {}

    def token(self, tenant: Tenant, user: str = "alice") -> str:
        key = (tenant.name, user)
        if key not in self._tokens:
            self._tokens[key] = self.platform.idp(tenant).token(user)
        return self._tokens[key]

    def ask(self, tenant: Tenant, question: str, session_id: str | None = None, *, host: str | None = None,
            user: str = "alice", token_of: Tenant | None = None, timeout: float = 30.0, **fields: Any) -> CallResult:
        """Ask on ``host`` (default: the tenant's own) with the tenant's headers and the token
        of ``user`` in ``token_of``'s pool (default: the tenant's)."""
        body = {"question": question, "session_id": session_id or new_session(), **fields}
        return self.post(tenant, json.dumps(body).encode(), host=host, user=user, token_of=token_of, timeout=timeout)

    def post(self, tenant: Tenant, body: bytes, *, content_type: str = "application/json", host: str | None = None,
             user: str = "alice", token_of: Tenant | None = None, timeout: float = 30.0) -> CallResult:
        headers = {**user_headers(tenant, self.token(token_of or tenant, user)), "content-type": content_type}
        return self.platform.gateway().request(host or tenant.host, "/api/rag", method="POST", body=body,
                                               headers=headers, timeout=timeout)

    def history(self, tenant: Tenant, session_id: str, *, user: str = "alice") -> list[dict]:
        res = self.platform.gateway().request(tenant.host, f"/api/sessions/{session_id}",
                                              headers=user_headers(tenant, self.token(tenant, user)))
        assert res.status == 200, res.describe()
        return res.json()["turns"]


class CallLog:
    """The emulated Bedrock's record of Converse calls (``platform.llm_calls()``, capability
    "llm-call-log"), read as the calls made since this object was created.

    The record is not the test's own: an emulator reused on kind still holds the calls of
    earlier runs, and a full record drops its oldest call for each new one, so a position
    taken before is no position after. :meth:`since` lines the two readings up instead."""

    def __init__(self, platform: Any) -> None:
        self.platform = platform
        self.before = platform.llm_calls()

    def since(self) -> list[dict]:
        return appended(self.before, self.platform.llm_calls())


def appended(before: list[dict], after: list[dict]) -> list[dict]:
    """The calls ``after`` holds that ``before`` did not: what follows the longest tail of
    ``before`` that ``after`` starts with (the part of the old record still kept). When
    nothing of ``before`` is left, all of ``after`` is new."""
    if not after:
        return []
    for dropped, first in enumerate(before):
        kept = len(before) - dropped
        if first == after[0] and after[:kept] == before[dropped:]:
            return after[kept:]
    return list(after)


def new_session() -> str:
    return "s-" + secrets.token_hex(8)


@pytest.fixture(scope="session")
def chat(platform) -> Chat:
    """A :class:`Chat` on the session's platform (tokens cached per tenant and user)."""
    return Chat(platform)


@pytest.fixture(scope="session")
def corpus(request):
    """``corpus(tenant)``: the tenant's :class:`fixtures.corpus.Corpus` from the platform under test."""
    platform_dir = Path(request.config.getoption("--platform-dir")).resolve()
    cache: dict[str, corpora.Corpus] = {}

    def load(tenant: Tenant | str) -> corpora.Corpus:
        name = str(tenant)
        if name not in cache:
            cache[name] = corpora.load_corpus(platform_dir, name)
        return cache[name]
    return load


def leaked_markers(text: str, others: list[corpora.Corpus]) -> list[str]:
    """Marker strings of other tenants that appear in ``text``."""
    return [m for c in others for m in c.markers if m in text]
