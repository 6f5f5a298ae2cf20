"""A readiness registry: the service is ready when nothing holds readiness.

Startup holds ``startup`` until the lifespan has run; later work that must finish before
traffic arrives (loading the tenant's index) takes its own hold and releases it when done.
``GET /readyz`` reports 503 with the pending holds, which is what the kubelet's readiness probe
and Flagger's pre-rollout check read.
"""

from __future__ import annotations

import threading


class Readiness:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holds: dict[str, str] = {}

    def hold(self, name: str, reason: str) -> None:
        """Mark the service not ready until ``release(name)``; ``reason`` is shown on /readyz."""
        with self._lock:
            self._holds[name] = reason

    def release(self, name: str) -> None:
        with self._lock:
            self._holds.pop(name, None)

    def pending(self) -> dict[str, str]:
        """The holds still in place, name -> reason."""
        with self._lock:
            return dict(self._holds)

    @property
    def ready(self) -> bool:
        with self._lock:
            return not self._holds
