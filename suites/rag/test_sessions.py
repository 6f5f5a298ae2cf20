"""Session memory: per tenant, per user and per session id; it outlives the service and a
session-store outage loses no stored turn."""

from __future__ import annotations

import pytest

from fixtures.platform import Outcome
from fixtures.wait import eventually
from suites.rag.conftest import new_session

pytestmark = pytest.mark.standalone_required


def _turns(chat, tenant, session, user="alice") -> list[tuple[int, str]]:
    return [(t["turn"], t["question"]) for t in chat.history(tenant, session, user=user)]


def test_turns_are_kept_per_session_id(chat, corpus, tenant):
    qs = [q.question for q in corpus(tenant).questions[:3]]
    one, two = new_session(), new_session()
    for i, q in enumerate(qs[:2], start=1):
        body = chat.ask(tenant, q, one).expect(Outcome.OK).json()
        assert (body["turn"], body["history_turns"]) == (i, i - 1), body
    body = chat.ask(tenant, qs[2], two).expect(Outcome.OK).json()
    assert (body["turn"], body["history_turns"]) == (1, 0), body
    assert _turns(chat, tenant, one) == [(1, qs[0]), (2, qs[1])]
    assert _turns(chat, tenant, two) == [(1, qs[2])]


def test_another_user_with_the_same_session_id_sees_nothing(chat, corpus, tenant):
    session = new_session()
    q = corpus(tenant).questions[0].question
    chat.ask(tenant, q, session).expect(Outcome.OK)
    # Control: alice sees her turn; bob, same tenant and session id, sees an empty session.
    assert _turns(chat, tenant, session) == [(1, q)]
    assert _turns(chat, tenant, session, user="bob") == []
    body = chat.ask(tenant, q, session, user="bob").expect(Outcome.OK).json()
    assert (body["turn"], body["history_turns"]) == (1, 0), body
    assert _turns(chat, tenant, session) == [(1, q)]


@pytest.mark.chaos
def test_sessions_survive_a_rag_api_restart(platform, chat, corpus, tenant, requires):
    requires("faults")
    session = new_session()
    qs = [q.question for q in corpus(tenant).questions[:3]]
    for q in qs[:2]:
        chat.ask(tenant, q, session).expect(Outcome.OK)
    with platform.fault("workload-app-killed", tenant=tenant.name):
        down = chat.ask(tenant, qs[2], session)
        assert down.status is None or down.status >= 500, down.describe()
    # The restarted process has nothing in memory: the turns come from the session store.
    assert _turns(chat, tenant, session) == [(1, qs[0]), (2, qs[1])]
    body = chat.ask(tenant, qs[2], session).expect(Outcome.OK).json()
    assert (body["turn"], body["history_turns"]) == (3, 2), body


@pytest.mark.chaos
def test_session_store_outage_degrades_clearly_and_loses_nothing(platform, chat, corpus, tenant, requires):
    requires("faults")
    session = new_session()
    qs = [q.question for q in corpus(tenant).questions[:4]]
    for q in qs[:2]:
        chat.ask(tenant, q, session).expect(Outcome.OK)
    with platform.fault("session-store-unavailable"):
        for q in qs[2:4]:
            res = chat.ask(tenant, q, session)
            assert res.status == 503, res.describe()
            assert "session store unavailable" in res.json()["detail"], res.describe()
            assert res.headers.get("retry-after"), res.describe()
    # Back: the stored turns are all there, the refused ones were not half-stored, and the
    # next turn continues the numbering.
    def recovered():
        res = chat.ask(tenant, qs[2], session)
        assert res.status == 200, res.describe()
        return res.json()
    body = eventually(recovered, timeout=20, what="rag-api answers again after the outage")
    assert (body["turn"], body["history_turns"]) == (3, 2), body
    assert _turns(chat, tenant, session) == [(1, qs[0]), (2, qs[1]), (3, qs[2])]
