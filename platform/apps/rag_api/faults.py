"""Deliberate misbehaviour, switched on by environment for rollout and chaos tests.

Errors are deterministic rather than random: request ``i`` (counting from 0, probes excluded)
fails when ``floor((i + 1) * rate) > floor(i * rate)``, so after ``n`` requests exactly
``floor(n * rate)`` have failed. A test can then assert an exact count, and Flagger sees the
configured error rate from the first analysis interval on.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from fractions import Fraction

from starlette.types import ASGIApp, Receive, Scope, Send

# Kubelet and Flagger must keep seeing the truth about liveness and readiness.
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
FAULT_HEADER = "x-rag-api-fault"


class ErrorSchedule:
    """Decides, request by request, which requests fail so that exactly ``rate`` of them do."""

    def __init__(self, rate: Fraction) -> None:
        if not 0 <= rate <= 1:
            raise ValueError(f"error rate {rate} is outside 0..1")
        self.rate = rate
        self._next = 0
        self._lock = threading.Lock()

    def next_fails(self) -> tuple[int, bool]:
        """Take the next request index; return it and whether that request must fail."""
        with self._lock:
            index = self._next
            self._next += 1
        return index, math.floor((index + 1) * self.rate) > math.floor(index * self.rate)


class FaultInjection:
    """ASGI middleware adding latency and failing a fixed fraction of non-probe requests."""

    def __init__(self, app: ASGIApp, error_rate: Fraction, latency_ms: int) -> None:
        self.app = app
        self.schedule = ErrorSchedule(error_rate)
        self.latency_ms = latency_ms

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        if self.latency_ms:
            await asyncio.sleep(self.latency_ms / 1000)
        if self.schedule.rate:
            index, fails = self.schedule.next_fails()
            if fails:
                await _injected_error(send, index, self.schedule.rate)
                return
        await self.app(scope, receive, send)


async def _injected_error(send: Send, index: int, rate: Fraction) -> None:
    body = json.dumps(
        {
            "detail": (
                f"injected fault: FAULT_ERROR_RATE={float(rate):g} fails this request "
                f"(#{index} since start); this is not a real error"
            ),
            "fault": "error_rate",
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 500,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (FAULT_HEADER.encode(), b"error-rate"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
