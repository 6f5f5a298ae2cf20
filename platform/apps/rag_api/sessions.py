"""Conversation memory in the tenant's DynamoDB table.

Key schema: ``session_id`` (string, partition key) = ``"<sub>#<session id>"`` and ``turn``
(number, sort key) counting from 1. The owner's ``sub`` is part of the key, so one user can
never read or extend another user's session, even with the same session id. Each turn is one
item written once, complete, with a conditional put: a retried or concurrent request can
never overwrite a turn that is already stored.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

HISTORY_TURNS = 10
MAX_LISTED_TURNS = 1000


class SessionStoreUnavailable(Exception):
    """DynamoDB failed or timed out; the message says which call and why."""


class TurnTaken(Exception):
    """Another request stored this turn number first."""


@dataclass(frozen=True)
class Turn:
    turn: int
    question: str
    answer: str
    sources: list[str]
    """Names of the documents the answer was given from."""
    llm_model: str
    embedding_model: str
    created: str
    """ISO 8601 UTC time the turn was stored."""

    def describe(self) -> dict[str, Any]:
        """The turn as GET /sessions/{id} shows it."""
        return {
            "turn": self.turn,
            "question": self.question,
            "answer": self.answer,
            "sources": self.sources,
            "llm_model": self.llm_model,
            "created": self.created,
        }


def key(owner: str, session_id: str) -> str:
    # A session id cannot contain '#', so the owner is everything before the last one.
    return f"{owner}#{session_id}"


def _text(item: dict[str, Any], name: str) -> str:
    return str(item.get(name, {}).get("S", ""))


def _parse(item: dict[str, Any]) -> Turn:
    sources = [str(entry.get("S", "")) for entry in item.get("sources", {}).get("L", [])]
    return Turn(
        turn=int(item["turn"]["N"]),
        question=_text(item, "question"),
        answer=_text(item, "answer"),
        sources=sources,
        llm_model=_text(item, "llm_model"),
        embedding_model=_text(item, "embedding_model"),
        created=_text(item, "created"),
    )


def _unavailable(action: str, error: Exception) -> SessionStoreUnavailable:
    if isinstance(error, ClientError):
        info = error.response.get("Error", {})
        reason = f"{info.get('Code', 'error')}: {info.get('Message', '')}".rstrip(": ")
    else:
        reason = f"{type(error).__name__}: {error}"
    return SessionStoreUnavailable(f"{action} failed: {reason}")


class SessionStore:
    def __init__(self, client: Any, table: str) -> None:
        self.client = client
        self.table = table

    def _query(self, owner: str, session_id: str, *, newest_first: bool, limit: int) -> list[Turn]:
        request: dict[str, Any] = {
            "TableName": self.table,
            "KeyConditionExpression": "session_id = :key",
            "ExpressionAttributeValues": {":key": {"S": key(owner, session_id)}},
            "ScanIndexForward": not newest_first,
            "ConsistentRead": True,
        }
        turns: list[Turn] = []
        try:
            while len(turns) < limit:
                page = self.client.query(**request, Limit=limit - len(turns))
                turns.extend(_parse(item) for item in page.get("Items", []))
                if "LastEvaluatedKey" not in page:
                    break
                request["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        except (BotoCoreError, ClientError) as error:
            raise _unavailable(f"reading session from table {self.table}", error) from None
        except (KeyError, ValueError, TypeError) as error:
            raise SessionStoreUnavailable(f"table {self.table} holds a malformed turn: {error!r}") from None
        return turns

    def recent(self, owner: str, session_id: str, limit: int = HISTORY_TURNS) -> list[Turn]:
        """The last ``limit`` turns, oldest first."""
        return list(reversed(self._query(owner, session_id, newest_first=True, limit=limit)))

    def turns(self, owner: str, session_id: str) -> list[Turn]:
        """Every turn (up to ``MAX_LISTED_TURNS``), oldest first."""
        return self._query(owner, session_id, newest_first=False, limit=MAX_LISTED_TURNS)

    def append(self, owner: str, session_id: str, turn: Turn, *, tenant: str) -> None:
        """Store ``turn`` unless that turn number exists (then ``TurnTaken``)."""
        # botocore retries a put whose response timed out; if the first attempt was stored,
        # the retry fails its condition. The write id tells our own earlier attempt apart
        # from another request's turn.
        write_id = uuid.uuid4().hex
        item = {
            "session_id": {"S": key(owner, session_id)},
            "turn": {"N": str(turn.turn)},
            "tenant": {"S": tenant},
            "owner": {"S": owner},
            "question": {"S": turn.question},
            "answer": {"S": turn.answer},
            "sources": {"L": [{"S": name} for name in turn.sources]},
            "llm_model": {"S": turn.llm_model},
            "embedding_model": {"S": turn.embedding_model},
            "created": {"S": turn.created},
            "write_id": {"S": write_id},
        }
        try:
            self.client.put_item(
                TableName=self.table, Item=item, ConditionExpression="attribute_not_exists(session_id)"
            )
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                if self._stored_by(item, write_id):
                    return
                raise TurnTaken(f"turn {turn.turn} of this session is already stored") from None
            raise _unavailable(f"storing turn {turn.turn} in table {self.table}", error) from None
        except BotoCoreError as error:
            raise _unavailable(f"storing turn {turn.turn} in table {self.table}", error) from None

    def _stored_by(self, item: dict[str, Any], write_id: str) -> bool:
        try:
            found = self.client.get_item(
                TableName=self.table,
                Key={"session_id": item["session_id"], "turn": item["turn"]},
                ConsistentRead=True,
            )
        except (BotoCoreError, ClientError) as error:
            raise _unavailable(f"checking turn {item['turn']['N']} in table {self.table}", error) from None
        return _text(found.get("Item", {}), "write_id") == write_id
