"""JSON log lines on stdout, one per event, for the container runtime to collect."""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOGGER = "rag_api"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        return json.dumps(line, default=str)


class _StdoutHandler(logging.Handler):
    """Writes to whatever ``sys.stdout`` is at the time, so redirected output is honoured."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - logging must never break a request
            self.handleError(record)


def configure() -> logging.Logger:
    """Set up the ``rag_api`` logger once; later calls return it unchanged."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(handler, _StdoutHandler) for handler in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(_JsonFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        # uvicorn configures the root logger; without this each line would appear twice.
        logger.propagate = False
    return logger


def event(logger: logging.Logger, level: int, msg: str, **fields: Any) -> None:
    logger.log(level, msg, extra={"fields": fields})


class AccessLog:
    """ASGI middleware: one ``access`` line per HTTP request, after the response is sent."""

    def __init__(self, app: ASGIApp, tenant: str) -> None:
        self.app = app
        self.tenant = tenant
        self.logger = logging.getLogger(f"{LOGGER}.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets if the app raises before responding

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            headers = dict(scope.get("headers", []))
            request_id = headers.get(b"x-request-id")
            event(
                self.logger,
                logging.INFO,
                "access",
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=round((time.perf_counter() - start) * 1000, 3),
                tenant=self.tenant,
                request_id=request_id.decode("latin-1") if request_id else None,
            )
