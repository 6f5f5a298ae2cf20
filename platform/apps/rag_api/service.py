"""One RAG turn: history, retrieval, the model, and storing the turn.

Everything here blocks (the embedding model, faiss, boto3); the HTTP layer runs it on a worker thread.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from rag_api import llm, logs
from rag_api.config import Settings
from rag_api.loader import RagState
from rag_api.sessions import SessionStore, Turn, TurnTaken

# Two requests of one session racing for the same turn number: the loser takes the next one.
_STORE_ATTEMPTS = 3


class NotReady(Exception):
    """The index or the model is not loaded yet."""


class NotAllowed(Exception):
    """A model the tenant's configuration does not list."""


class RagService:
    def __init__(
        self, settings: Settings, state: RagState, sessions: SessionStore, bedrock: Any, logger: logging.Logger
    ) -> None:
        self.settings = settings
        self.state = state
        self.sessions = sessions
        self.bedrock = bedrock
        self.logger = logger

    def resolve(self, llm_model: str | None, embedding_model: str | None) -> tuple[str, str]:
        """The models to use, defaults filled in; ``NotAllowed`` for one the tenant may not use."""
        tenant = self.settings.tenant_id
        llm_model = llm_model if llm_model is not None else self.settings.llm_models[0]
        embedding_model = embedding_model if embedding_model is not None else self.settings.embedding_models[0]
        if llm_model not in self.settings.llm_models:
            raise NotAllowed(
                f"llm_model {llm_model!r} is not allowed for tenant {tenant} "
                f"(allowed: {', '.join(self.settings.llm_models)})"
            )
        if embedding_model not in self.settings.embedding_models:
            raise NotAllowed(
                f"embedding_model {embedding_model!r} is not allowed for tenant {tenant} "
                f"(allowed: {', '.join(self.settings.embedding_models)})"
            )
        return llm_model, embedding_model

    def ask(
        self, owner: str, session_id: str, question: str, *, llm_model: str, embedding_model: str, top_k: int | None
    ) -> dict[str, Any]:
        """Answer ``question`` in ``owner``'s session and store the turn.

        Raises ``NotReady``, ``SessionStoreUnavailable`` (nothing was stored) or
        ``llm.ModelError`` (nothing was stored).
        """
        if not self.state.loaded.is_set():
            raise NotReady("the index is not loaded yet")
        embedder = self.state.embedders[embedding_model]
        loaded = self.state.indexes[embedding_model]
        k = top_k if top_k is not None else self.settings.retrieval_top_k
        timings: dict[str, float] = {}

        def lap(name: str, start: float) -> float:
            now = time.perf_counter()
            timings[f"{name}_ms"] = round((now - start) * 1000, 3)
            return now

        start = time.perf_counter()
        # History first: with the store down, fail before spending a model call.
        history = self.sessions.recent(owner, session_id)
        start = lap("history", start)
        vector = embedder.encode([question])[0]
        start = lap("embed", start)
        hits = loaded.search(vector, k)
        start = lap("search", start)
        answer = llm.converse(
            self.bedrock, llm_model, llm.system_prompt(self.settings.tenant_id, hits), llm.messages(history, question)
        )
        start = lap("llm", start)

        documents = list(dict.fromkeys(hit.chunk.document for hit in hits))
        number = (history[-1].turn if history else 0) + 1
        for attempt in range(_STORE_ATTEMPTS):
            turn = Turn(
                turn=number,
                question=question,
                answer=answer,
                sources=documents,
                llm_model=llm_model,
                embedding_model=embedding_model,
                created=datetime.now(UTC).isoformat(timespec="milliseconds"),
            )
            try:
                self.sessions.append(owner, session_id, turn, tenant=self.settings.tenant_id)
                break
            except TurnTaken:
                if attempt == _STORE_ATTEMPTS - 1:
                    raise
                latest = self.sessions.recent(owner, session_id, limit=1)
                number = (latest[-1].turn if latest else 0) + 1
        lap("store", start)
        logs.event(
            self.logger, logging.INFO, "answered", event="rag_answer", tenant=self.settings.tenant_id,
            turn=number, history_turns=len(history), llm_model=llm_model, embedding_model=embedding_model,
            top_k=k, sources=[f"{h.chunk.document}#{h.chunk.chunk}" for h in hits], **timings,
        )
        return {
            "tenant": self.settings.tenant_id,
            "session_id": session_id,
            "turn": number,
            "answer": answer,
            "sources": [
                {"document": h.chunk.document, "chunk": h.chunk.chunk, "score": round(h.score, 6), "text": h.chunk.text}
                for h in hits
            ],
            "llm_model": llm_model,
            "embedding_model": embedding_model,
            "history_turns": len(history),
        }

    def session(self, owner: str, session_id: str) -> dict[str, Any]:
        """``owner``'s turns of ``session_id``; an unknown session (or another user's) has none."""
        turns = self.sessions.turns(owner, session_id)
        return {
            "tenant": self.settings.tenant_id,
            "session_id": session_id,
            "turns": [turn.describe() for turn in turns],
        }
