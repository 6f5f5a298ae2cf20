"""The tenant's chat UI (Streamlit).

Run it with ``streamlit run platform/apps/app_ui/app.py`` and ``TENANT_ID``, ``RAG_API_URL``,
``LLM_MODELS`` and ``EMBEDDING_MODELS`` set (``RAG_API_TIMEOUT_SECONDS`` optional). It shows
nothing unless the request that opened the session carries this tenant's
``x-auth-request-tenantid`` and a bearer token, which the reverse proxy in front of the UI adds
for a signed-in user. It asks rag-api who the caller is, then lets the user chat with the
tenant's documents: each question goes to rag-api's ``POST /rag`` as that user, and the
conversation is kept under a session id that also sits in the URL, so a reload resumes it.

Everything above ``render`` is plain Python so it can be tested without Streamlit.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import quote, urlsplit

import httpx
import streamlit as st

TENANT_HEADER = "x-auth-request-tenantid"
# The identity headers rag-api needs, plus the request id and trace context, which Istio
# cannot propagate by itself (https://istio.io/latest/docs/tasks/observability/distributed-tracing/overview/).
FORWARDED_HEADERS = (
    "authorization", TENANT_HEADER, "x-request-id", "traceparent", "tracestate",
    "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags",
)
# A second copy of an identity header would make "which one counts" depend on who reads it.
SINGLE_HEADERS = ("authorization", TENANT_HEADER)
TIMEOUT_S = 5.0  # /whoami and /sessions: small answers from rag-api itself
ANSWER_TIMEOUT_S = 60.0  # /rag waits for retrieval and the model
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{8,128}")  # the pattern rag-api enforces
SESSION_PARAM = "session"  # the query parameter that keeps a conversation across reloads
MAX_QUESTION_CHARS = 2000


class ConfigError(Exception):
    """The environment cannot configure the UI; the message names the variable."""


class QuestionError(ValueError):
    """The question cannot be sent as asked; the message says why."""


class RagApiError(Exception):
    """rag-api could not answer; the message says what went wrong, with status and detail."""


def model_list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """The comma-separated model ids in ``env[name]``, parsed as rag-api does (first = default)."""
    raw = env.get(name, "")
    if not raw.strip():
        raise ConfigError(f"{name} is required: the comma-separated models this tenant may use, default first")
    models = tuple(entry.strip() for entry in raw.split(","))
    if "" in models:
        raise ConfigError(f"{name}={raw!r} has an empty entry")
    repeated = sorted({m for m in models if models.count(m) > 1})
    if repeated:
        raise ConfigError(f"{name} lists {', '.join(repeated)} more than once")
    return models


@dataclass(frozen=True)
class Settings:
    tenant_id: str
    rag_api_url: str
    llm_models: tuple[str, ...]
    embedding_models: tuple[str, ...]
    answer_timeout_s: float = ANSWER_TIMEOUT_S

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
        raw_timeout = env.get("RAG_API_TIMEOUT_SECONDS", "").strip() or str(ANSWER_TIMEOUT_S)
        timeout = float(raw_timeout) if re.fullmatch(r"\d+(\.\d*)?", raw_timeout) else 0.0
        if not 0 < timeout <= 600:
            raise ConfigError(f"RAG_API_TIMEOUT_SECONDS={raw_timeout!r} is not a number of seconds in (0, 600]")
        return cls(tenant_id, url, model_list(env, "LLM_MODELS"), model_list(env, "EMBEDDING_MODELS"), timeout)


def _lowercase(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def refusal(headers: Mapping[str, str], tenant_id: str) -> str | None:
    """Why this request must not see the UI, or ``None`` when it may.

    ``headers`` may be ``st.context.headers``, whose ``get_all`` reveals repeated header lines.
    """
    get_all = getattr(headers, "get_all", None)
    for name in SINGLE_HEADERS if get_all else ():
        if len(get_all(name)) > 1:
            return f"the request carries {len(get_all(name))} {name} headers; exactly one is allowed"
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


def new_session_id() -> str:
    # token_urlsafe already uses only [A-Za-z0-9_-]; the filter keeps that promise explicit.
    return re.sub(r"[^A-Za-z0-9_-]", "", secrets.token_urlsafe(16))


def requested_session(value: object) -> str | None:
    """The session id from the URL if it is one rag-api would accept, else ``None``."""
    return value if isinstance(value, str) and SESSION_ID.fullmatch(value) else None


def rag_request(
    settings: Settings, question: str, session_id: str, llm_model: str, embedding_model: str
) -> dict[str, str]:
    """The ``POST /rag`` body; refuses what rag-api would refuse, before sending it."""
    if not question.strip():
        raise QuestionError("the question is empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise QuestionError(f"the question has {len(question)} characters; at most {MAX_QUESTION_CHARS} are allowed")
    if not SESSION_ID.fullmatch(session_id):
        raise QuestionError(f"session id {session_id!r} does not match {SESSION_ID.pattern}")
    for kind, model, allowed in (
        ("LLM", llm_model, settings.llm_models), ("embedding", embedding_model, settings.embedding_models)
    ):
        if model not in allowed:
            raise QuestionError(f"{kind} model {model!r} is not one of {settings.tenant_id}'s: {', '.join(allowed)}")
    return {"question": question, "session_id": session_id, "llm_model": llm_model,
            "embedding_model": embedding_model}


def detail_of(response: httpx.Response) -> str:
    """rag-api's explanation of a failed request, as one line."""
    try:
        body = response.json()
    except ValueError:
        return " ".join(response.text.split())[:300] or "(empty body)"
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):  # FastAPI's validation errors: one entry per bad field
        return "; ".join(f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}" if isinstance(e, dict)
                         else str(e) for e in detail)
    return json.dumps(body)[:300]


def failure(method: str, path: str, response: httpx.Response) -> str:
    status = f"{response.status_code} {response.reason_phrase}"
    message = f"rag-api answered {status} to {method} {path}: {detail_of(response)}"
    if response.status_code == 401:
        message += " (the sign-in may have expired: reload the page)"
    elif response.headers.get("retry-after"):
        message += f" (try again in {response.headers['retry-after']} s)"
    return message


def _source(entry: object) -> dict[str, Any]:
    # A live answer has objects with the chunk text; a stored turn only has document names.
    if isinstance(entry, str):
        return {"document": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("document"), str):
        raise RagApiError(f"rag-api sent a source that is not a document: {entry!r:.200}")
    return {k: entry[k] for k in ("document", "chunk", "score", "text") if entry.get(k) is not None}


def _check_owner(settings: Settings, session_id: str, body: Mapping[str, Any]) -> None:
    if body.get("tenant") != settings.tenant_id:
        raise RagApiError(f"rag-api answered for tenant {body.get('tenant')!r}, not {settings.tenant_id!r}; hidden")
    if body.get("session_id") != session_id:
        raise RagApiError(f"rag-api answered for session {body.get('session_id')!r}, not {session_id!r}; hidden")


def _turn(question: object, entry: Mapping[str, Any]) -> dict[str, Any]:
    sources = entry.get("sources")
    if not isinstance(question, str) or not isinstance(entry.get("answer"), str) or not isinstance(sources, list):
        raise RagApiError("rag-api sent a turn without question, answer text or list of sources")
    return {"turn": entry.get("turn"), "question": question, "answer": entry["answer"],
            "sources": [_source(s) for s in sources],
            **{key: entry.get(key) for key in ("llm_model", "embedding_model", "created")}}


def turn_from_answer(settings: Settings, request: Mapping[str, str], body: Mapping[str, Any]) -> dict[str, Any]:
    """One turn from a ``POST /rag`` answer, after checking it belongs to this tenant and session."""
    _check_owner(settings, request["session_id"], body)
    return _turn(request["question"], body)


def turns_from_history(settings: Settings, session_id: str, body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The turns of a ``GET /sessions/{id}`` answer, after the same checks."""
    _check_owner(settings, session_id, body)
    turns = body.get("turns")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise RagApiError("rag-api sent a session whose turns are not a list of objects")
    return [_turn(t.get("question"), t) for t in turns]


class RagApi:
    """rag-api as the signed-in user: every call carries the caller's identity and trace headers."""

    def __init__(self, settings: Settings, headers: Mapping[str, str], transport: httpx.BaseTransport | None = None):
        self.settings = settings
        self.headers = forwarded_headers(headers)
        self.transport = transport

    def _call(self, method: str, path: str, timeout: float, body: object = None) -> dict[str, Any]:
        url = f"{self.settings.rag_api_url}{path}"
        try:
            with httpx.Client(transport=self.transport, timeout=timeout) as client:
                response = client.request(method, url, headers=self.headers, json=body)
        except httpx.TimeoutException as error:
            raise RagApiError(f"rag-api did not answer {method} {path} within {timeout:g} s "
                              f"({type(error).__name__})") from None
        except httpx.HTTPError as error:
            raise RagApiError(f"rag-api is unreachable at {url}: {type(error).__name__}: {error}") from None
        if response.status_code != 200:
            raise RagApiError(failure(method, path, response))
        try:
            answer = response.json()
        except ValueError:
            raise RagApiError(f"rag-api answered {method} {path} with 200 and a body that is not JSON") from None
        if not isinstance(answer, dict):
            raise RagApiError(f"rag-api answered {method} {path} with 200 and JSON that is not an object")
        return answer

    def whoami(self) -> dict[str, Any]:
        return self._call("GET", "/whoami", min(TIMEOUT_S, self.settings.answer_timeout_s))

    def history(self, session_id: str) -> list[dict[str, Any]]:
        path = f"/sessions/{quote(session_id, safe='')}"
        body = self._call("GET", path, min(TIMEOUT_S, self.settings.answer_timeout_s))
        return turns_from_history(self.settings, session_id, body)

    def ask(self, question: str, session_id: str, llm_model: str, embedding_model: str) -> dict[str, Any]:
        request = rag_request(self.settings, question, session_id, llm_model, embedding_model)
        body = self._call("POST", "/rag", self.settings.answer_timeout_s, request)
        return turn_from_answer(self.settings, request, body)


def user_of(claims: Mapping[str, Any] | None) -> str | None:
    """A human-readable user name from verified Cognito id token claims."""
    if not claims:
        return None
    for claim in ("email", "cognito:username", "username", "sub"):
        if claims.get(claim):
            return str(claims[claim])
    return None


def transcript_name(tenant_id: str, session_id: str, extension: str) -> str:
    return f"chat-{re.sub(r'[^A-Za-z0-9_.-]', '_', tenant_id)}-{session_id}.{extension}"


def transcript_json(tenant_id: str, session_id: str, turns: Sequence[Mapping[str, Any]]) -> str:
    transcript = {"tenant": tenant_id, "session_id": session_id, "turns": list(turns)}
    return json.dumps(transcript, indent=2, ensure_ascii=False)


def transcript_markdown(tenant_id: str, session_id: str, turns: Sequence[Mapping[str, Any]]) -> str:
    lines = [f"# Chat with tenant {tenant_id}", "", f"Session `{session_id}`", ""]
    for turn in turns:
        lines += [f"## Turn {turn.get('turn')}", "", f"**Question:** {turn['question']}", "",
                  f"**Answer:** {turn['answer']}", ""]
        names = [s["document"] + (f"#{s['chunk']}" if "chunk" in s else "") for s in turn["sources"]]
        lines += [f"Sources: {', '.join(names) or 'none'}", f"Model: {turn.get('llm_model')}", ""]
    return "\n".join(lines)


# --- rendering -----------------------------------------------------------------------------


def _halt(message: str) -> NoReturn:
    st.error(message)
    st.stop()


def _start_conversation(api: RagApi, session_id: str | None) -> None:
    """Put a conversation in session state: the one named in the URL, or a new one."""
    notice, turns = None, []
    if session_id is None:
        session_id = new_session_id()
    else:
        try:
            turns = api.history(session_id)
        except RagApiError as error:
            notice = f"The earlier turns of this conversation could not be loaded: {error}"
    st.session_state.update(session_id=session_id, turns=turns, failed=None, notice=notice)
    st.query_params[SESSION_PARAM] = session_id


def _show_turn(turn: Mapping[str, Any]) -> None:
    # st.text, not st.markdown: answers and documents are untrusted text, and markdown would
    # render links and images a prompt injection could plant.
    with st.chat_message("user"):
        st.text(turn["question"])
    with st.chat_message("assistant"):
        _show_answer(turn)


def _show_answer(turn: Mapping[str, Any]) -> None:
    st.text(turn["answer"])
    names = list(dict.fromkeys(s["document"] for s in turn["sources"]))
    st.caption(f"Sources: {', '.join(names) or 'none'} · model {turn.get('llm_model')}")
    for source in turn["sources"]:
        if "text" in source:
            score = f", score {source['score']:.3f}" if isinstance(source.get("score"), (int, float)) else ""
            with st.expander(f"{source['document']} (chunk {source.get('chunk')}{score})"):
                st.text(source["text"])


def _chat(api: RagApi, settings: Settings, llm_model: str, embedding_model: str) -> None:
    state = st.session_state
    question = st.chat_input(f"Ask {settings.tenant_id}'s documents", max_chars=MAX_QUESTION_CHARS)
    if state.notice:
        st.warning(state.notice)
    for turn in state.turns:
        _show_turn(turn)
    if question is not None:
        state.failed = None
        with st.chat_message("user"):
            st.text(question)
        with st.chat_message("assistant"):
            try:
                with st.spinner("Searching the documents and asking the model..."):
                    turn = api.ask(question, state.session_id, llm_model, embedding_model)
            except (RagApiError, QuestionError) as error:
                # Kept until the next question, so reruns from other widgets still show it.
                state.failed = {"question": question, "error": str(error)}
                st.error(str(error))
            else:
                state.turns.append(turn)
                _show_answer(turn)
    elif state.failed:
        with st.chat_message("user"):
            st.text(state.failed["question"])
        with st.chat_message("assistant"):
            st.error(state.failed["error"])


def render(headers: Mapping[str, str], env: Mapping[str, str]) -> None:
    """Draw the page for one run of the script."""
    try:
        settings = Settings.from_env(env)
    except ConfigError as error:
        _halt(f"The UI is misconfigured: {error}")
    reason = refusal(headers, settings.tenant_id)
    if reason is not None:
        _halt(f"Access refused: {reason}.")
    api = RagApi(settings, headers)
    if "whoami" not in st.session_state:
        # Once per browser session: its headers (and so the caller) cannot change, and a later
        # rag-api outage then shows up in the chat instead of hiding the conversation.
        try:
            whoami = api.whoami()
        except RagApiError as error:
            _halt(f"rag-api is unavailable: {error}")
        if whoami.get("tenant") != settings.tenant_id:
            _halt(f"rag-api answered for tenant {whoami.get('tenant')!r}, not {settings.tenant_id!r}; showing nothing.")
        st.session_state.whoami = whoami
    whoami = st.session_state.whoami
    if "session_id" not in st.session_state:
        _start_conversation(api, requested_session(st.query_params.get(SESSION_PARAM)))

    st.title(f"Tenant {settings.tenant_id}")
    with st.sidebar:
        peer = whoami.get("peer") or {}
        st.markdown(f"**Signed in as:** {user_of(whoami.get('claims')) or 'unknown (rag-api saw no verified token)'}")
        st.markdown(f"**This UI's workload identity, as rag-api sees it:** `{peer.get('spiffe_id')}`")
        st.markdown(f"**rag-api version:** `{whoami.get('version')}`")
        with st.expander("rag-api /whoami"):
            st.json(whoami)
        llm_model = st.selectbox("LLM model", settings.llm_models, key="llm_model")
        embedding_model = st.selectbox("Embedding model", settings.embedding_models, key="embedding_model")
        if st.button("New conversation"):
            _start_conversation(api, None)
        st.caption(f"Conversation `{st.session_state.session_id}`")
        downloads = st.container()
    _chat(api, settings, llm_model, embedding_model)
    # Drawn after the chat so the files include the turn this run added.
    session_id, turns = st.session_state.session_id, st.session_state.turns
    with downloads:
        for label, extension, mime, render_text in (
            ("Download chat (JSON)", "json", "application/json", transcript_json),
            ("Download chat (Markdown)", "md", "text/markdown", transcript_markdown),
        ):
            data = render_text(settings.tenant_id, session_id, turns)
            name = transcript_name(settings.tenant_id, session_id, extension)
            st.download_button(label, data, name, mime=mime, on_click="ignore", disabled=not turns)


if __name__ == "__main__":
    render(st.context.headers, os.environ)
