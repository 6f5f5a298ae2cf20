"""The RAG service end to end with the real embedding model, moto and a Converse fake:
readiness on the tenant's index, answers with sources, session memory, and what happens when
DynamoDB or Bedrock fail."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError, ReadTimeoutError
from botocore.httpsession import URLLib3Session
from test_rag_fakes import (
    BUCKET,
    RETIRED,
    TENANTA_DOCS,
    TENANTB_DOCS,
    Stack,
    identity_headers,
    serving,
    stack,
    write_corpus,
)

from fixtures.wait import eventually
from rag_api import embedding, ingest
from rag_api.aws import Backends
from rag_api.config import Settings
from rag_api.embedding import DEFAULT_MODEL, EmbeddingError
from rag_api.index import IndexBundle
from rag_api.sessions import SessionStore, Turn

SESSION = "session-0001"
REFUND_QUESTION = "How long does a refund of a monthly plan take?"
HOURS_QUESTION = "When can I call phone support?"


@pytest.fixture(scope="module")
def embedder() -> embedding.Embedder:
    """The real all-MiniLM-L6-v2, loaded once for this module (one intra-op thread)."""
    return embedding.load(DEFAULT_MODEL, threads=1)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, embedder: embedding.Embedder) -> dict[str, IndexBundle]:
    """tenanta's and tenantb's indexes, built from small corpora in a temporary folder."""
    root = tmp_path_factory.mktemp("corpora")
    return {
        tenant: ingest.build_index(write_corpus(root / tenant, docs), tenant, embedder)
        for tenant, docs in (("tenanta", TENANTA_DOCS), ("tenantb", TENANTB_DOCS))
    }


@pytest.fixture(scope="module")
def world(embedder: embedding.Embedder) -> Iterator[Stack]:
    """moto and the fake Bedrock for this module; stopped afterwards."""
    with stack(embedder) as made:
        yield made


@pytest.fixture
def tenanta(world: Stack, bundles: dict[str, IndexBundle]) -> Settings:
    """Settings of a fresh prefix holding tenanta's good index and a fresh sessions table."""
    settings = world.space()
    world.upload(settings, bundles["tenanta"])
    return settings


def ask(client: Any, question: str, session: str = SESSION, *, sub: str = "alice-sub", **fields: Any) -> Any:
    return client.post("/rag", json={"question": question, "session_id": session, **fields},
                       headers=identity_headers(sub=sub))


def stored(world: Stack, settings: Settings) -> dict[tuple[str, int], dict[str, Any]]:
    return {(i["session_id"]["S"], int(i["turn"]["N"])): i for i in world.items(settings.sessions_table)}


def log_lines(out: str, event: str) -> list[dict[str, Any]]:
    return [line for line in map(json.loads, out.splitlines()) if line.get("event") == event]


# --- readiness --------------------------------------------------------------------------------


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def other_model(bundle: IndexBundle) -> IndexBundle:
    manifest = json.loads(bundle.manifest)
    return replace(bundle, manifest=json.dumps({**manifest, "embedding_model": "all-mpnet-base-v2"}).encode())


@dataclass(frozen=True)
class BadIndex:
    name: str
    make: Callable[[dict[str, IndexBundle]], IndexBundle | None]
    reason: str

    def __str__(self) -> str:
        return f"with {self.name} the service is not ready"


BAD_INDEXES = [
    BadIndex("no index", lambda b: None, "manifest.json does not exist"),
    BadIndex("a corrupt index file", lambda b: replace(b["tenanta"], index=flip_last_byte(b["tenanta"].index)),
             "checksum mismatch: index.faiss"),
    BadIndex("tenantb's index in tenanta's prefix", lambda b: b["tenantb"], "belongs to tenant 'tenantb'"),
    BadIndex("an index of another embedding model", lambda b: other_model(b["tenanta"]),
             "embedding model 'all-mpnet-base-v2'"),
]


@pytest.mark.parametrize("case", BAD_INDEXES, ids=str)
def test_not_ready_until_a_good_index_is_uploaded(world: Stack, bundles: dict[str, IndexBundle], case: BadIndex,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    settings = world.space()
    bad = case.make(bundles)
    if bad is not None:
        world.put_files(settings, bad)
    uri = f"s3://{BUCKET}/{settings.documents_prefix}index/{DEFAULT_MODEL}/"
    seen: list[dict[str, Any]] = []

    def logged(event: str, count: int) -> bool:
        seen.extend(map(json.loads, capsys.readouterr().out.splitlines()))
        return len([line for line in seen if line.get("event") == event]) >= count

    with serving(settings, world.backends(), ready=False) as client:
        state = client.app.state  # type: ignore[attr-defined]
        eventually(lambda: case.reason in state.readiness.pending().get("index", ""), timeout=30,
                   what=f"readiness to name {case.reason!r}")
        refused = [client.get("/readyz"), client.get("/healthz"), ask(client, REFUND_QUESTION)]
        # One line per attempt, and the attempts go on every INDEX_RETRY_SECONDS.
        eventually(lambda: logged("index_unavailable", 3), timeout=10, what="three index_unavailable lines")
        world.upload(settings, bundles["tenanta"])
        assert state.loader.wait(30), state.readiness.pending()
        accepted = [client.get("/readyz"), ask(client, REFUND_QUESTION)]
    logged("index_loaded", 1)
    readyz, healthz, rag = refused
    assert (readyz.status_code, list(readyz.json()["waiting_for"])) == (503, ["index"])
    assert uri in readyz.json()["waiting_for"]["index"] and "retrying every 0.2s" in readyz.json()["waiting_for"]["index"]
    assert healthz.status_code == 200
    assert rag.status_code == 503 and case.reason in rag.json()["detail"] and rag.headers["retry-after"] == "2"
    unavailable = [line for line in seen if line.get("event") == "index_unavailable"]
    assert all(line["s3_uri"] == uri and case.reason in line["reason"] and line["level"] == "error"
               for line in unavailable)
    assert [r.status_code for r in accepted] == [200, 200]
    assert [line["event"] for line in seen if line.get("event", "").startswith("index_")][-1] == "index_loaded"


def test_a_model_that_cannot_load_holds_readiness_with_the_reason(world: Stack, tenanta: Settings,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    backends = world.backends()

    def broken(name: str) -> embedding.Embedder:
        raise EmbeddingError(f"cannot load embedding model {name!r}: OSError: no weights")

    backends.load_embedder = broken
    with serving(tenanta, backends, ready=False) as client:
        eventually(lambda: "no weights" in client.get("/readyz").json()["waiting_for"].get("model", ""), timeout=10)
        waiting = client.get("/readyz").json()["waiting_for"]
    assert set(waiting) == {"model", "index"}
    [first, *_] = log_lines(capsys.readouterr().out, "model_unavailable")
    assert first["embedding_model"] == DEFAULT_MODEL and "no weights" in first["reason"]


def test_threads_follow_omp_num_threads(embedder: embedding.Embedder) -> None:
    import faiss

    assert faiss.omp_get_max_threads() == 1


# --- answers and sessions ---------------------------------------------------------------------


def test_an_answer_cites_the_retrieved_chunks_and_the_next_turn_sees_the_first(world: Stack, tenanta: Settings) -> None:
    calls = len(world.bedrock.calls)
    with serving(tenanta, world.backends()) as client:
        first = ask(client, REFUND_QUESTION)
        second = ask(client, HOURS_QUESTION, top_k=1)
    one, two = first.json(), second.json()
    assert (first.status_code, one["turn"], one["history_turns"], one["tenant"]) == (200, 1, 0, "tenanta")
    assert [s["document"] for s in one["sources"]][0] == "refunds.md" and len(one["sources"]) == 3
    assert [s["score"] for s in one["sources"]] == sorted((s["score"] for s in one["sources"]), reverse=True)
    assert "30 days" in one["answer"] and "[source: refunds.md#0]" in one["answer"]
    assert (two["turn"], two["history_turns"], [s["document"] for s in two["sources"]]) == (2, 1, ["support-hours.md"])
    call_one, call_two = world.bedrock.calls[calls:]
    system = call_one["system"][0]["text"]
    for source in one["sources"]:
        assert f"<context>\n[source: {source['document']}#{source['chunk']}]\n{source['text']}\n</context>" in system
    assert system.count("<context>\n[source: ") == 3
    assert call_one["inferenceConfig"] == {"maxTokens": 512, "temperature": 0}
    assert call_two["messages"] == [
        {"role": "user", "content": [{"text": REFUND_QUESTION}]},
        {"role": "assistant", "content": [{"text": one["answer"]}]},
        {"role": "user", "content": [{"text": HOURS_QUESTION}]},
    ]


def test_history_holds_the_last_ten_turns_oldest_first(world: Stack, tenanta: Settings) -> None:
    store = SessionStore(world.dynamodb, tenanta.sessions_table)
    for n in range(1, 13):
        store.append("alice-sub", SESSION, Turn(n, f"question {n}", f"answer {n}", ["refunds.md"], "m", DEFAULT_MODEL,
                                                "2026-01-01T00:00:00.000+00:00"), tenant="tenanta")
    with serving(tenanta, world.backends()) as client:
        answer = ask(client, REFUND_QUESTION).json()
    messages = world.bedrock.calls[-1]["messages"]
    assert (answer["turn"], answer["history_turns"], len(messages)) == (13, 10, 21)
    assert [m["content"][0]["text"] for m in messages[:2]] == ["question 3", "answer 3"]
    assert [m["content"][0]["text"] for m in messages[-3:]] == ["question 12", "answer 12", REFUND_QUESTION]


def test_sessions_are_separate_per_user_and_per_session_id(world: Stack, tenanta: Settings) -> None:
    with serving(tenanta, world.backends()) as client:
        alice_1 = ask(client, REFUND_QUESTION, sub="alice-sub").json()
        alice_2 = ask(client, HOURS_QUESTION, sub="alice-sub").json()
        bob_1 = ask(client, HOURS_QUESTION, sub="bob-sub").json()
        alice_other = ask(client, HOURS_QUESTION, "session-0002", sub="alice-sub").json()

        def listing(session: str, sub: str) -> list[tuple[int, str]]:
            response = client.get(f"/sessions/{session}", headers=identity_headers(sub=sub))
            assert response.status_code == 200, response.text
            return [(t["turn"], t["question"]) for t in response.json()["turns"]]

        listings = {(s, u): listing(s, u) for s in (SESSION, "session-0002", "never-used-1") for u in ("alice-sub", "bob-sub")}
        full = client.get(f"/sessions/{SESSION}", headers=identity_headers(sub="alice-sub")).json()
    assert [(a["turn"], a["history_turns"]) for a in (alice_1, alice_2, bob_1, alice_other)] == [(1, 0), (2, 1), (1, 0), (1, 0)]
    assert listings == {
        (SESSION, "alice-sub"): [(1, REFUND_QUESTION), (2, HOURS_QUESTION)],
        (SESSION, "bob-sub"): [(1, HOURS_QUESTION)],
        ("session-0002", "alice-sub"): [(1, HOURS_QUESTION)],
        ("session-0002", "bob-sub"): [],
        ("never-used-1", "alice-sub"): [],
        ("never-used-1", "bob-sub"): [],
    }
    assert full["tenant"] == "tenanta" and full["turns"][0]["answer"] == alice_1["answer"]
    assert full["turns"][0]["sources"] == list(dict.fromkeys(s["document"] for s in alice_1["sources"]))
    assert set(stored(world, tenanta)) == {(f"alice-sub#{SESSION}", 1), (f"alice-sub#{SESSION}", 2),
                                           (f"bob-sub#{SESSION}", 1), ("alice-sub#session-0002", 1)}


# --- failures of DynamoDB and Bedrock -----------------------------------------------------------


@contextmanager
def outage(client: Any, operation: str = "") -> Iterator[None]:
    """Every DynamoDB call of ``client`` (or only ``operation``) fails to connect, until exit."""
    event = "before-send.dynamodb" + (f".{operation}" if operation else "")

    def refuse(**kwargs: Any) -> None:
        raise EndpointConnectionError(endpoint_url=kwargs["request"].url)

    client.meta.events.register(event, refuse, unique_id="test-outage")
    try:
        yield
    finally:
        client.meta.events.unregister(event, unique_id="test-outage")


@pytest.mark.chaos
@pytest.mark.parametrize("operation", ["", "PutItem"], ids=["when DynamoDB is down", "when only storing fails"])
def test_a_session_store_outage_is_503_and_no_turn_is_lost(world: Stack, tenanta: Settings, operation: str) -> None:
    backends = world.backends()
    with serving(tenanta, backends) as client:
        first = ask(client, REFUND_QUESTION)
        before = stored(world, tenanta)
        calls = len(world.bedrock.calls)
        with outage(backends.dynamodb, operation):
            start = time.perf_counter()
            down = ask(client, HOURS_QUESTION)
            elapsed = time.perf_counter() - start
            listing = client.get(f"/sessions/{SESSION}", headers=identity_headers())
        model_calls = len(world.bedrock.calls) - calls
        during = stored(world, tenanta)
        again = ask(client, HOURS_QUESTION)
        after = stored(world, tenanta)
    assert first.status_code == 200
    assert (down.status_code, down.headers["retry-after"]) == (503, "2")
    assert down.json()["detail"].startswith("session store unavailable: ")
    assert elapsed < 5, "two attempts, no long backoff"
    assert model_calls == (1 if operation else 0), "with the store down nothing is asked of the model"
    assert listing.status_code == (200 if operation else 503)
    assert during == before
    assert again.json()["turn"] == 2
    assert after[(f"alice-sub#{SESSION}", 1)] == before[(f"alice-sub#{SESSION}", 1)]


@pytest.mark.chaos
def test_a_hanging_session_store_answers_503_within_seconds(world: Stack, tenanta: Settings,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # A listening socket that never accepts: connections succeed, responses never come.
    with socket.create_server(("127.0.0.1", 0), backlog=8) as hole:
        for name, value in {"AWS_ENDPOINT_URL_S3": world.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_ENDPOINT_URL_DYNAMODB": f"http://127.0.0.1:{hole.getsockname()[1]}",
                            "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": world.bedrock.url,
                            "AWS_SECRET_ACCESS_KEY": "testing"}.items():
            monkeypatch.setenv(name, value)
        backends = Backends.from_settings(tenanta)  # the production clients and their timeouts
        backends.load_embedder = lambda name: world.embedder
        with serving(tenanta, backends) as client:
            start = time.perf_counter()
            response = ask(client, REFUND_QUESTION)
            elapsed = time.perf_counter() - start
    assert response.status_code == 503
    assert "session store unavailable" in response.json()["detail"] and "timeout" in response.json()["detail"].lower()
    assert elapsed < 8, f"a hanging DynamoDB held the request {elapsed:.1f}s"


def test_a_turn_stored_meanwhile_by_another_request_is_never_overwritten(world: Stack, tenanta: Settings) -> None:
    backends = world.backends()
    other = Turn(2, "asked concurrently", "its answer", [], "m", DEFAULT_MODEL, "2026-01-01T00:00:00.000+00:00")
    raced: list[bool] = []

    def race(**kwargs: Any) -> None:
        if not raced:  # just before our put of turn 2, another request stores turn 2
            raced.append(True)
            SessionStore(world.dynamodb, tenanta.sessions_table).append("alice-sub", SESSION, other, tenant="tenanta")

    with serving(tenanta, backends) as client:
        ask(client, REFUND_QUESTION)
        backends.dynamodb.meta.events.register("before-call.dynamodb.PutItem", race)
        mine = ask(client, HOURS_QUESTION)
    turns = stored(world, tenanta)
    assert (mine.status_code, mine.json()["turn"]) == (200, 3)
    assert turns[(f"alice-sub#{SESSION}", 2)]["question"]["S"] == "asked concurrently"
    assert turns[(f"alice-sub#{SESSION}", 3)]["question"]["S"] == HOURS_QUESTION


def test_a_put_retried_after_a_lost_response_is_not_stored_twice(world: Stack, tenanta: Settings) -> None:
    backends = world.backends()
    lost: list[bool] = []

    def deliver_then_lose_the_response(request: Any, **kwargs: Any) -> None:
        if not lost:
            lost.append(True)
            URLLib3Session().send(request)  # DynamoDB stores the turn...
            raise ReadTimeoutError(endpoint_url=request.url)  # ...and its answer never arrives

    backends.dynamodb.meta.events.register("before-send.dynamodb.PutItem", deliver_then_lose_the_response)
    with serving(tenanta, backends) as client:
        answer = ask(client, REFUND_QUESTION)
    assert lost == [True]
    assert (answer.status_code, answer.json()["turn"]) == (200, 1)
    assert list(stored(world, tenanta)) == [(f"alice-sub#{SESSION}", 1)]


def test_a_failing_model_is_502_and_stores_nothing(world: Stack, tenanta: Settings) -> None:
    with serving(tenanta, world.backends()) as client:
        response = ask(client, REFUND_QUESTION, llm_model=RETIRED)
    assert response.status_code == 502
    assert response.json()["detail"].startswith(f"model {RETIRED} failed: ValidationException")
    assert stored(world, tenanta) == {}
