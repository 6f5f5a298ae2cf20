"""Retrieval quality: recall@3 of each tenant's labelled questions through the full path
(gateway, sidecar, rag-api, its FAISS index) is at least 0.9."""

from __future__ import annotations

import pytest

from fixtures.corpus import recall_at
from fixtures.platform import Outcome

pytestmark = pytest.mark.standalone_required

MIN_RECALL_AT_3 = 0.9


def test_recall_at_3(chat, corpus, tenant, record_fact):
    questions = corpus(tenant).questions
    assert len(questions) >= 10, f"{tenant}: {len(questions)} labelled questions are too few to measure recall"
    scores, misses = [], []
    for q in questions:
        body = chat.ask(tenant, q.question, top_k=3).expect(Outcome.OK).json()
        retrieved = [s["document"] for s in body["sources"]]
        scores.append(recall_at(3, set(q.documents), retrieved))
        if scores[-1] < 1:
            misses.append(f"{q.question!r}: expected {sorted(q.documents)}, got {retrieved}")
    recall = sum(scores) / len(scores)
    record_fact("rag_recall", {"tenant": tenant.name, "k": 3, "recall": round(recall, 4),
                               "questions": len(scores)})
    assert recall >= MIN_RECALL_AT_3, f"{tenant}: recall@3 {recall:.3f} < {MIN_RECALL_AT_3}; misses:\n" + "\n".join(misses)


def test_recall_at_is_what_it_says():
    assert recall_at(3, {"a"}, ["b", "c", "a", "a"]) == 1
    assert recall_at(3, {"a", "d"}, ["a", "a", "b", "d"]) == 0.5
    assert recall_at(3, {"a"}, []) == 0
