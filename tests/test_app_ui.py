"""Unit tests of the tenant chat UI (platform/apps/app_ui).

The page runs as ``streamlit run`` runs it: ``AppTest.from_file`` on app.py, against a fake
rag-api on loopback that records every request. AppTest 1.67 cannot seed request headers
(``AppTest.context`` takes only browser fields; headers come from the session's client, which
AppTest mocks), so the ``browser`` fixture replaces the ``headers`` property of ``st.context``'s
class for the test: the app reads ``st.context.headers`` exactly as in production, with no
test-only switch in app.py.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
import streamlit as st
from streamlit.runtime.context import StreamlitHeaders
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest

APPS_DIR = Path(__file__).resolve().parents[1] / "platform" / "apps"
if str(APPS_DIR) not in sys.path:
    sys.path.insert(0, str(APPS_DIR))

from app_ui import app as ui  # noqa: E402

SCRIPT = APPS_DIR / "app_ui" / "app.py"
LLM = ("anthropic.claude-3-haiku-20240307-v1:0", "amazon.nova-lite-v1:0",
       "arn:aws:bedrock:us-east-1:111122223333:provisioned-model/tenanta-support")
EMBEDDING = ("all-MiniLM-L6-v2",)
ENV = {"TENANT_ID": "tenanta", "RAG_API_URL": "http://rag-api:8080", "LLM_MODELS": ",".join(LLM),
       "EMBEDDING_MODELS": EMBEDDING[0]}
SETTINGS = ui.Settings("tenanta", "http://rag-api:8080", LLM, EMBEDDING)
SESSION = "s3ss10n-Abc_123"
APP_UI_ID = "spiffe://cluster.local/ns/tenanta/sa/app-ui"
SIGNED_IN = {
    "X-Auth-Request-Tenantid": "tenanta",
    "Authorization": "Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln",
    "X-Request-Id": "req-42",
    "Traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "Cookie": "_oauth2_proxy=secret",
}
WHOAMI = {"tenant": "tenanta", "version": "1.0.0", "peer": {"spiffe_id": APP_UI_ID},
          "claims": {"email": "alice@tenanta.example.com", "custom:tenantid": "tenanta"}}
ANSWER = "Refunds are issued within 14 days. [source: refunds.md#0]"
SOURCES = [{"document": "refunds.md", "chunk": 0, "score": 0.812, "text": "Refunds are issued within 14 days."},
           {"document": "hours.md", "chunk": 2, "score": 0.4, "text": "Support is open 9-17 CET."}]


# --- a fake rag-api on loopback ------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any  # JSON, or bytes sent as they are
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class FakeRagApi:
    """rag-api's HTTP contract (whoami, sessions, rag) on a free loopback port.

    It records every request, keeps turns per session like the real one, and serves queued
    one-shot replies first, so a test can make one call fail and the next succeed.
    """

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.stored: dict[str, list[dict[str, Any]]] = {}
        self.queued: dict[tuple[str, str], list[Reply]] = {}
        self.released = threading.Event()  # ends delayed replies at teardown
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.fake = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def queue(self, method: str, path: str, reply: Reply) -> None:
        self.queued.setdefault((method, path), []).append(reply)

    def requests(self, method: str, path_prefix: str = "/") -> list[Received]:
        return [r for r in self.received if r.method == method and r.path.startswith(path_prefix)]

    def reply(self, method: str, path: str, body: Any) -> Reply:
        if self.queued.get((method, path)):
            return self.queued[(method, path)].pop(0)
        if (method, path) == ("GET", "/whoami"):
            return Reply(200, WHOAMI)
        if method == "GET" and path.startswith("/sessions/"):
            session_id = unquote(path.removeprefix("/sessions/"))
            return Reply(200, {"tenant": "tenanta", "session_id": session_id, "turns": self.stored.get(session_id, [])})
        if (method, path) == ("POST", "/rag"):
            turns = self.stored.setdefault(body["session_id"], [])
            turns.append({"turn": len(turns) + 1, "question": body["question"], "answer": ANSWER,
                          "sources": [s["document"] for s in SOURCES], "llm_model": body["llm_model"],
                          "created": "2025-01-01T00:00:00Z"})
            return Reply(200, {"tenant": "tenanta", "session_id": body["session_id"], "turn": len(turns),
                               "answer": ANSWER, "sources": SOURCES, "llm_model": body["llm_model"],
                               "embedding_model": body["embedding_model"], "history_turns": len(turns) - 1})
        return Reply(404, {"detail": "Not Found"})

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        fake: FakeRagApi = self.server.fake  # type: ignore[attr-defined]
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        body = json.loads(raw) if raw else None
        fake.received.append(Received(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        reply = fake.reply(self.command, self.path, body)
        fake.released.wait(reply.delay)
        data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "text/plain" if isinstance(reply.body, bytes) else "application/json")
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the UI gave up waiting (the timeout case)
            pass

    do_POST = do_GET

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module")
def components_scanned_once() -> Iterator[None]:
    """Scans the installed packages for Streamlit components once for this module, not once per
    AppTest (each scan reads the metadata of every distribution in the venv, most of a page
    test's time); the real scan is back afterwards."""
    from streamlit.components.v2 import manifest_scanner

    found = manifest_scanner.scan_component_manifests()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(manifest_scanner, "scan_component_manifests", lambda max_workers=None: list(found))
        yield


@pytest.fixture
def rag(monkeypatch: pytest.MonkeyPatch, components_scanned_once: None) -> Iterator[FakeRagApi]:
    """A running fake rag-api, with the UI's environment pointing at it; stopped afterwards."""
    fake = FakeRagApi()
    for name, value in {**ENV, "RAG_API_URL": fake.url, "RAG_API_TIMEOUT_SECONDS": "10"}.items():
        monkeypatch.setenv(name, value)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    yield fake
    fake.close()


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any], None]:
    """Sets the headers of the request that opened the browser session, as ``st.context.headers``
    returns them to the app (a dict, or a list of pairs for repeated headers); undone afterwards."""

    def sign_in(headers: Mapping[str, str] | list[tuple[str, str]]) -> None:
        pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
        monkeypatch.setattr(type(st.context), "headers", property(lambda _: StreamlitHeaders(pairs)))

    sign_in(SIGNED_IN)
    return sign_in


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[str | None, str, bytes]]:
    """Every file the app hands Streamlit's media storage (what a download button serves), by
    file id: (file name, MIME type, bytes). The recording is undone afterwards."""
    stored: dict[str, tuple[str | None, str, bytes]] = {}
    original = MemoryMediaFileStorage.load_and_get_id

    def recording(self: MemoryMediaFileStorage, data: Any, mimetype: str, kind: Any, filename: str | None = None) -> str:
        file_id = original(self, data, mimetype, kind, filename)
        stored[file_id] = (filename, mimetype, data)
        return file_id

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", recording)
    return stored


def run(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, [e.value for e in at.exception]  # never a traceback on the page
    return at


def open_ui(query: dict[str, str] | None = None) -> AppTest:
    at = AppTest.from_file(str(SCRIPT), default_timeout=15)
    at.query_params.update(query or {})
    return run(at)


def ask(at: AppTest, question: str) -> AppTest:
    at.chat_input[0].set_value(question)
    return run(at)


def texts(at: AppTest) -> list[str]:
    return [t.value for t in at.text]


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


# --- configuration, access check, request building -----------------------------------------


@pytest.mark.parametrize(("change", "message"), [
    pytest.param({"TENANT_ID": ""}, "TENANT_ID is required", id="a missing TENANT_ID is refused"),
    pytest.param({"RAG_API_URL": ""}, "RAG_API_URL is required", id="a missing RAG_API_URL is refused"),
    pytest.param({"RAG_API_URL": "rag-api:8080"}, "RAG_API_URL='rag-api:8080'", id="a RAG_API_URL without scheme is refused"),
    pytest.param({"LLM_MODELS": None}, "LLM_MODELS is required", id="missing LLM_MODELS are refused"),
    pytest.param({"EMBEDDING_MODELS": " "}, "EMBEDDING_MODELS is required", id="blank EMBEDDING_MODELS are refused"),
    pytest.param({"LLM_MODELS": "a,,b"}, "LLM_MODELS='a,,b' has an empty entry", id="an empty model entry is refused"),
    pytest.param({"LLM_MODELS": "a,b,a"}, "LLM_MODELS lists a more than once", id="a repeated model is refused"),
    pytest.param({"RAG_API_TIMEOUT_SECONDS": "0"}, "RAG_API_TIMEOUT_SECONDS='0'", id="a zero timeout is refused"),
    pytest.param({"RAG_API_TIMEOUT_SECONDS": "nan"}, "RAG_API_TIMEOUT_SECONDS='nan'", id="a timeout that is no number is refused"),
])
def test_settings_refuse_a_bad_environment(change: dict[str, str | None], message: str) -> None:
    env = {k: v for k, v in {**ENV, **change}.items() if v is not None}
    with pytest.raises(ui.ConfigError, match=message):
        ui.Settings.from_env(env)


def test_settings_parse_model_lists_in_order_and_drop_a_trailing_slash() -> None:
    env = {**ENV, "RAG_API_URL": "http://rag-api:8080/", "LLM_MODELS": " , ".join(LLM), "RAG_API_TIMEOUT_SECONDS": "2.5"}
    assert ui.Settings.from_env(env) == ui.Settings("tenanta", "http://rag-api:8080", LLM, EMBEDDING, 2.5)
    assert ui.Settings.from_env(ENV) == SETTINGS and SETTINGS.answer_timeout_s == 60


@pytest.mark.parametrize(("headers", "refused_because"), [
    pytest.param(SIGNED_IN, None, id="tenant header and bearer token are let in"),
    pytest.param({k.lower(): v for k, v in SIGNED_IN.items()}, None, id="header names are case-insensitive"),
    pytest.param({**SIGNED_IN, "Authorization": "bearer abc"}, None, id="the bearer scheme is case-insensitive"),
    pytest.param(StreamlitHeaders(SIGNED_IN.items()), None, id="st.context headers are let in"),
    pytest.param({"Authorization": SIGNED_IN["Authorization"]}, "no x-auth-request-tenantid header", id="no tenant header is refused"),
    pytest.param({**SIGNED_IN, "X-Auth-Request-Tenantid": "tenantb"}, "request is for tenant 'tenantb'", id="another tenant's header is refused"),
    pytest.param({"X-Auth-Request-Tenantid": "tenanta"}, "no bearer token", id="no Authorization header is refused"),
    pytest.param({**SIGNED_IN, "Authorization": "Basic YTpi"}, "no bearer token", id="a Basic credential is refused"),
    pytest.param({**SIGNED_IN, "Authorization": "Bearer "}, "no bearer token", id="an empty bearer token is refused"),
    pytest.param(StreamlitHeaders([*SIGNED_IN.items(), ("x-auth-request-tenantid", "tenantb")]),
                 "2 x-auth-request-tenantid headers", id="a repeated tenant header is refused"),
    pytest.param(StreamlitHeaders([*SIGNED_IN.items(), ("authorization", "Bearer other")]),
                 "2 authorization headers", id="a repeated Authorization header is refused"),
])
def test_refusal(headers: Mapping[str, str], refused_because: str | None) -> None:
    reason = ui.refusal(headers, "tenanta")
    if refused_because is None:
        assert reason is None
    else:
        assert reason is not None and refused_because in reason


def test_only_identity_and_trace_headers_are_forwarded() -> None:
    assert ui.forwarded_headers(SIGNED_IN) == {
        "authorization": SIGNED_IN["Authorization"], "x-auth-request-tenantid": "tenanta",
        "x-request-id": "req-42", "traceparent": SIGNED_IN["Traceparent"],
    }


def test_new_session_ids_are_valid_and_distinct() -> None:
    ids = {ui.new_session_id() for _ in range(50)}
    assert len(ids) == 50 and all(ui.SESSION_ID.fullmatch(i) for i in ids)


@pytest.mark.parametrize(("value", "accepted"), [
    (SESSION, True), ("a" * 128, True), ("short", False), ("a" * 129, False), ("../whoami", False),
    ("abc def ghi", False), (None, False), (["abcdefgh"], False),
])
def test_only_a_valid_session_id_from_the_url_is_used(value: object, accepted: bool) -> None:
    assert ui.requested_session(value) == (value if accepted else None)


@pytest.mark.parametrize(("question", "session_id", "llm", "message"), [
    pytest.param("  ", SESSION, LLM[0], "the question is empty", id="a blank question is not sent"),
    pytest.param("x" * 2001, SESSION, LLM[0], "2001 characters", id="a too long question is not sent"),
    pytest.param("q", "bad id!", LLM[0], "session id 'bad id!'", id="a bad session id is not sent"),
    pytest.param("q", SESSION, LLM[2].replace("tenanta", "tenantb"), "is not one of tenanta's", id="another tenant's model is not sent"),
])
def test_rag_request_refuses_what_rag_api_would(question: str, session_id: str, llm: str, message: str) -> None:
    with pytest.raises(ui.QuestionError, match=message):
        ui.rag_request(SETTINGS, question, session_id, llm, EMBEDDING[0])


# --- calling rag-api (in-process transport) ------------------------------------------------


def answering(status: int, body: Any = None, text: str | None = None, headers: dict[str, str] | None = None) -> httpx.MockTransport:
    return httpx.MockTransport(lambda _: httpx.Response(status, json=body, text=text, headers=headers))


def raising(error: type[httpx.TransportError]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error("boom", request=request)
    return httpx.MockTransport(handler)


@pytest.mark.parametrize(("transport", "message"), [
    pytest.param(answering(422, {"detail": [{"loc": ["body", "question"], "msg": "String should have at least 1 character"}]}),
                 "422 Unprocessable Entity to POST /rag: body.question: String should have at least 1 character",
                 id="a validation error names the field"),
    pytest.param(answering(500, text="upstream connect error or disconnect/reset before headers"),
                 "500 Internal Server Error to POST /rag: upstream connect error", id="a text body is the detail"),
    pytest.param(answering(503, {"detail": "not ready"}, headers={"Retry-After": "5"}), "not ready (try again in 5 s)",
                 id="Retry-After is passed on"),
    pytest.param(answering(200, text="<html>"), "body that is not JSON", id="a non-JSON answer is an error"),
    pytest.param(answering(200, ["x"]), "JSON that is not an object", id="a non-object answer is an error"),
    pytest.param(answering(200, {"tenant": "tenanta", "session_id": SESSION, "answer": 1, "sources": []}),
                 "without question, answer text", id="an answer without text is an error"),
    pytest.param(answering(200, {"tenant": "tenanta", "session_id": SESSION, "answer": "a", "sources": [{"chunk": 1}]}),
                 "source that is not a document", id="a source without document is an error"),
    pytest.param(answering(200, {"tenant": "tenanta", "session_id": "other-session", "answer": "a", "sources": []}),
                 "for session 'other-session'", id="another session's answer is an error"),
    pytest.param(raising(httpx.ConnectError), "rag-api is unreachable at http://rag-api:8080/rag: ConnectError",
                 id="a refused connection is an error"),
])
def test_ask_reports_failures(transport: httpx.MockTransport, message: str) -> None:
    with pytest.raises(ui.RagApiError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ui.RagApi(SETTINGS, SIGNED_IN, transport).ask("q", SESSION, LLM[0], EMBEDDING[0])


def test_history_lists_stored_turns_with_their_documents() -> None:
    stored = {"turn": 1, "question": "q", "answer": "a", "sources": ["refunds.md"], "llm_model": LLM[0], "created": "t"}
    api = ui.RagApi(SETTINGS, SIGNED_IN, answering(200, {"tenant": "tenanta", "session_id": SESSION, "turns": [stored]}))
    assert api.history(SESSION) == [{**stored, "sources": [{"document": "refunds.md"}], "embedding_model": None}]
    bad = ui.RagApi(SETTINGS, SIGNED_IN, answering(200, {"tenant": "tenantb", "session_id": SESSION, "turns": []}))
    with pytest.raises(ui.RagApiError, match="for tenant 'tenantb'"):
        bad.history(SESSION)


@pytest.mark.parametrize(("claims", "user"), [
    pytest.param({"email": "a@x", "sub": "1"}, "a@x", id="email is preferred"),
    pytest.param({"cognito:username": "alice", "sub": "1"}, "alice", id="then the Cognito user name"),
    pytest.param({"sub": "1"}, "1", id="then the subject"),
    pytest.param(None, None, id="no claims name no user"),
])
def test_user_of(claims: dict[str, str] | None, user: str | None) -> None:
    assert ui.user_of(claims) == user


def test_transcripts_hold_every_turn() -> None:
    turns = [{"turn": 1, "question": "q1", "answer": "a1", "sources": [{"document": "d.md", "chunk": 3}], "llm_model": "m"}]
    assert json.loads(ui.transcript_json("tenanta", SESSION, turns)) == {"tenant": "tenanta", "session_id": SESSION, "turns": turns}
    markdown = ui.transcript_markdown("tenanta", SESSION, turns)
    assert "**Question:** q1" in markdown and "**Answer:** a1" in markdown and "Sources: d.md#3" in markdown
    assert ui.transcript_name("tenant a/..", SESSION, "md") == f"chat-tenant_a_..-{SESSION}.md"


# --- the page, run from the file against the fake rag-api ----------------------------------


def test_the_pickers_offer_exactly_the_tenants_models(rag: FakeRagApi, browser: Any) -> None:
    at = open_ui()
    assert at.selectbox(key="llm_model").options == list(LLM)
    assert at.selectbox(key="llm_model").value == LLM[0]
    assert at.selectbox(key="embedding_model").options == list(EMBEDDING)
    assert [e.value for e in at.title] == ["Tenant tenanta"]
    assert "alice@tenanta.example.com" in "\n".join(m.value for m in at.markdown)
    assert not errors(at) and [r.path for r in rag.received] == ["/whoami"]


def test_a_question_carries_the_chosen_models_the_session_and_the_identity(rag: FakeRagApi, browser: Any) -> None:
    at = open_ui()
    session_id = at.session_state["session_id"]
    assert ui.SESSION_ID.fullmatch(session_id) and at.query_params["session"] == session_id
    at.selectbox(key="llm_model").select(LLM[2])
    ask(at, "How long do refunds take?")

    [sent] = rag.requests("POST", "/rag")
    assert sent.body == {"question": "How long do refunds take?", "session_id": session_id,
                         "llm_model": LLM[2], "embedding_model": EMBEDDING[0]}
    assert {k: sent.headers.get(k) for k in ui.forwarded_headers(SIGNED_IN)} == ui.forwarded_headers(SIGNED_IN)
    assert "cookie" not in sent.headers
    assert [m.name for m in at.chat_message] == ["user", "assistant"]
    assert texts(at) == ["How long do refunds take?", ANSWER, SOURCES[0]["text"], SOURCES[1]["text"]]
    assert [e.label for e in at.main.expander] == ["refunds.md (chunk 0, score 0.812)", "hours.md (chunk 2, score 0.400)"]
    assert any("Sources: refunds.md, hours.md" in c.value and LLM[2] in c.value for c in at.caption)

    ask(at, "And the support hours?")
    assert [r.body["session_id"] for r in rag.requests("POST", "/rag")] == [session_id, session_id]
    assert texts(at)[::4] == ["How long do refunds take?", "And the support hours?"]
    assert not errors(at)


ERRORS = [
    pytest.param(Reply(400, {"detail": f"llm_model {LLM[1]!r} not allowed for tenant 'tenanta'"}),
                 f"rag-api answered 400 Bad Request to POST /rag: llm_model {LLM[1]!r} not allowed for tenant 'tenanta'",
                 id="a refused model shows 400 and the detail"),
    pytest.param(Reply(401, {"detail": "no verified claims"}), "rag-api answered 401 Unauthorized to POST /rag: "
                 "no verified claims (the sign-in may have expired: reload the page)", id="401 asks to sign in again"),
    pytest.param(Reply(403, {"detail": "x-auth-request-tenantid 'tenanta' != custom:tenantid 'tenantb'"}),
                 "rag-api answered 403 Forbidden to POST /rag: x-auth-request-tenantid", id="403 names the mismatch"),
    pytest.param(Reply(502, {"detail": f"model {LLM[0]} failed: ThrottlingException"}),
                 f"rag-api answered 502 Bad Gateway to POST /rag: model {LLM[0]} failed", id="a model failure shows 502"),
    pytest.param(Reply(503, {"detail": "session store unavailable: timeout"}, {"Retry-After": "2"}),
                 "rag-api answered 503 Service Unavailable to POST /rag: session store unavailable: timeout "
                 "(try again in 2 s)", id="an unavailable session store shows 503 and when to retry"),
    pytest.param(Reply(200, {"tenant": "tenantb", "session_id": "x", "answer": "B's secret", "sources": []}),
                 "rag-api answered for tenant 'tenantb', not 'tenanta'", id="another tenant's answer is not shown"),
    pytest.param(Reply(200, {}, delay=5), "rag-api did not answer POST /rag within 0.5 s (ReadTimeout)",
                 id="a timeout says how long the UI waited"),
]


@pytest.mark.parametrize(("reply", "message"), ERRORS)
def test_a_rag_api_failure_is_shown_and_the_chat_goes_on(
    rag: FakeRagApi, browser: Any, monkeypatch: pytest.MonkeyPatch, reply: Reply, message: str
) -> None:
    at = open_ui()
    rag.queue("POST", "/rag", reply)
    if reply.delay:  # a short wait only for this question, so a busy machine cannot fail the others
        monkeypatch.setenv("RAG_API_TIMEOUT_SECONDS", "0.5")
    ask(at, "First question?")
    monkeypatch.setenv("RAG_API_TIMEOUT_SECONDS", "10")
    [shown] = errors(at)
    assert shown.startswith(message)
    assert "B's secret" not in texts(at) and not at.main.expander
    assert errors(run(at)) == [shown]  # a rerun from another widget still shows what failed

    ask(at, "Second question?")
    assert not errors(at)
    assert texts(at)[:2] == ["Second question?", ANSWER]
    assert [t["question"] for t in at.session_state["turns"]] == ["Second question?"]


def test_an_unreachable_rag_api_is_reported(rag: FakeRagApi, browser: Any) -> None:
    at = open_ui()
    rag.close()
    ask(at, "Anyone there?")
    [shown] = errors(at)
    assert shown.startswith(f"rag-api is unreachable at {rag.url}/rag: ConnectError")
    assert at.chat_input  # the chat is still there


@pytest.mark.parametrize(("headers", "env", "error"), [
    pytest.param({k: v for k, v in SIGNED_IN.items() if k != "X-Auth-Request-Tenantid"}, {},
                 "Access refused: the request has no x-auth-request-tenantid header", id="no tenant header is refused"),
    pytest.param({**SIGNED_IN, "X-Auth-Request-Tenantid": "tenantb"}, {},
                 "Access refused: this UI serves tenant 'tenanta', but the request is for tenant 'tenantb'",
                 id="another tenant's header is refused"),
    pytest.param({"X-Auth-Request-Tenantid": "tenanta"}, {}, "Access refused: the request carries no bearer token",
                 id="a request without a token is refused"),
    pytest.param([*SIGNED_IN.items(), ("X-Auth-Request-Tenantid", "tenantb")], {},
                 "Access refused: the request carries 2 x-auth-request-tenantid headers", id="two tenant headers are refused"),
    pytest.param(SIGNED_IN, {"LLM_MODELS": ""}, "The UI is misconfigured: LLM_MODELS is required",
                 id="a UI without LLM models shows only the problem"),
    pytest.param(SIGNED_IN, {"EMBEDDING_MODELS": ","}, "The UI is misconfigured: EMBEDDING_MODELS=',' has an empty entry",
                 id="a UI with an empty embedding model shows only the problem"),
])
def test_the_page_shows_nothing_but_the_refusal(
    rag: FakeRagApi, browser: Any, monkeypatch: pytest.MonkeyPatch, headers: Any, env: dict[str, str], error: str
) -> None:
    browser(headers)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    at = open_ui()
    [shown] = errors(at)
    assert shown.startswith(error)
    assert not at.title and not at.markdown and not at.selectbox and not at.chat_input
    assert rag.received == []  # a refused request never reaches rag-api


def test_another_tenants_whoami_shows_nothing(rag: FakeRagApi, browser: Any) -> None:
    rag.queue("GET", "/whoami", Reply(200, {**WHOAMI, "tenant": "tenantb"}))
    at = open_ui()
    assert errors(at) == ["rag-api answered for tenant 'tenantb', not 'tenanta'; showing nothing."]
    assert not at.chat_input and not rag.requests("GET", "/sessions/")


def test_the_downloads_hold_the_turns(rag: FakeRagApi, browser: Any, downloads: dict[str, Any]) -> None:
    at = open_ui()
    assert all(b.proto.disabled for b in at.download_button)  # nothing to download yet
    ask(ask(at, "How long do refunds take?"), "And the support hours?")
    session_id = at.session_state["session_id"]

    def served(label: str) -> tuple[str, str, bytes]:
        [button] = [b for b in at.download_button if b.label == label]
        assert not button.proto.disabled
        return downloads[PurePosixPath(button.proto.url).stem]

    name, mime, data = served("Download chat (JSON)")
    assert (name, mime) == (f"chat-tenanta-{session_id}.json", "application/json")
    transcript = json.loads(data)
    assert (transcript["tenant"], transcript["session_id"]) == ("tenanta", session_id)
    assert [(t["turn"], t["question"], t["answer"]) for t in transcript["turns"]] == [
        (1, "How long do refunds take?", ANSWER), (2, "And the support hours?", ANSWER)]
    assert transcript["turns"][0]["sources"] == SOURCES
    name, mime, data = served("Download chat (Markdown)")
    assert (name, mime) == (f"chat-tenanta-{session_id}.md", "text/markdown")
    assert "**Question:** And the support hours?" in data.decode() and "refunds.md#0" in data.decode()


def test_a_reload_resumes_the_conversation_from_rag_api(rag: FakeRagApi, browser: Any) -> None:
    rag.stored[SESSION] = [{"turn": 1, "question": "Earlier?", "answer": "Earlier answer.", "sources": ["hours.md"],
                            "llm_model": LLM[1], "created": "2025-01-01T00:00:00Z"}]
    at = open_ui({"session": SESSION})
    [history] = rag.requests("GET", "/sessions/")
    assert history.path == f"/sessions/{SESSION}" and history.headers["authorization"] == SIGNED_IN["Authorization"]
    assert texts(at) == ["Earlier?", "Earlier answer."]
    assert any("Sources: hours.md" in c.value for c in at.caption)
    ask(at, "Later?")
    assert rag.requests("POST", "/rag")[0].body["session_id"] == SESSION
    assert [t["turn"] for t in at.session_state["turns"]] == [1, 2]


def test_a_bad_session_in_the_url_starts_a_new_conversation(rag: FakeRagApi, browser: Any) -> None:
    at = open_ui({"session": "../whoami"})
    assert not rag.requests("GET", "/sessions/")
    assert at.query_params["session"] == at.session_state["session_id"] != "../whoami"


def test_unloadable_history_warns_and_the_chat_works(rag: FakeRagApi, browser: Any) -> None:
    rag.queue("GET", f"/sessions/{SESSION}", Reply(503, {"detail": "session store unavailable: timeout"}))
    at = open_ui({"session": SESSION})
    [warning] = [w.value for w in at.warning]
    assert warning.startswith("The earlier turns of this conversation could not be loaded: rag-api answered 503")
    ask(at, "Still there?")
    assert texts(at)[:2] == ["Still there?", ANSWER] and not errors(at)


def test_a_new_conversation_gets_a_new_session(rag: FakeRagApi, browser: Any) -> None:
    at = ask(open_ui(), "How long do refunds take?")
    first = at.session_state["session_id"]
    at.button[0].click()
    run(at)
    second = at.session_state["session_id"]
    assert second != first and at.query_params["session"] == second
    assert not texts(at) and all(b.proto.disabled for b in at.download_button)
    ask(at, "Fresh start?")
    assert [r.body["session_id"] for r in rag.requests("POST", "/rag")] == [first, second]


def test_a_closed_port_makes_the_page_say_rag_api_is_unavailable(
    rag: FakeRagApi, browser: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("RAG_API_URL", f"http://127.0.0.1:{port}")
    at = open_ui()
    [shown] = errors(at)
    assert shown.startswith(f"rag-api is unavailable: rag-api is unreachable at http://127.0.0.1:{port}/whoami: ConnectError")
    assert not at.chat_input
