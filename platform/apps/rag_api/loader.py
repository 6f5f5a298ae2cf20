"""Loads the embedding models and the tenant's indexes in the background.

The process is live at once (``/healthz``) while readiness holds ``model`` and ``index``; a
Deployment therefore never routes traffic to a pod without a verified index, and a missing or
refused index is visible on ``/readyz`` and in one log line per attempt instead of a crash loop.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from rag_api import index, logs
from rag_api.aws import Backends
from rag_api.config import Settings
from rag_api.embedding import Embedder
from rag_api.readiness import Readiness


class RagState:
    """What the loader produced; requests read it once ``loaded`` is set."""

    def __init__(self) -> None:
        self.embedders: dict[str, Embedder] = {}
        self.indexes: dict[str, index.LoadedIndex] = {}
        self.loaded = threading.Event()


class Loader:
    def __init__(self, settings: Settings, backends: Backends, readiness: Readiness, logger: logging.Logger) -> None:
        self.settings = settings
        self.backends = backends
        self.readiness = readiness
        self.logger = logger
        self.state = RagState()
        self._stopping = threading.Event()
        # Held while logging, so no line of ours follows the shutdown line.
        self._log_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.uris = {
            model: f"s3://{settings.documents_bucket}/{index.location(settings.documents_prefix, model)}"
            for model in settings.embedding_models
        }
        readiness.hold("model", f"loading embedding model {', '.join(settings.embedding_models)}")
        readiness.hold("index", f"waiting for the embedding model before loading {', '.join(self.uris.values())}")

    def start(self) -> None:
        # A daemon: a pod told to stop while the model is still loading must not wait for it.
        self._thread = threading.Thread(target=self._run, name="rag-loader", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        with self._log_lock:
            self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait(self, timeout: float) -> bool:
        """Block until loaded (True) or ``timeout`` seconds passed (False)."""
        return self.state.loaded.wait(timeout)

    def _log(self, level: int, msg: str, **fields: Any) -> None:
        with self._log_lock:
            if not self._stopping.is_set():
                logs.event(self.logger, level, msg, tenant=self.settings.tenant_id, **fields)

    def _pause(self) -> bool:
        """Wait before the next attempt; False when shutting down."""
        return not self._stopping.wait(self.settings.index_retry_seconds)

    def _run(self) -> None:
        try:
            if self._load_models():
                self._load_indexes()
        except Exception as error:  # noqa: BLE001 - a dead loader would leave the pod unready forever, silently
            self.readiness.hold("index", f"the loader failed: {type(error).__name__}: {error}")
            self._log(logging.ERROR, "loader failed", event="loader_failed", reason=f"{type(error).__name__}: {error}")

    def _load_models(self) -> bool:
        retry = self.settings.index_retry_seconds
        for name in self.settings.embedding_models:
            while not self._stopping.is_set():
                start = time.perf_counter()
                try:
                    self.state.embedders[name] = self.backends.load_embedder(name)
                except Exception as error:  # noqa: BLE001 - reported and retried like an index
                    reason = str(error)
                    self.readiness.hold("model", f"{reason}; retrying every {retry:g}s")
                    self._log(logging.ERROR, f"embedding model {name} unavailable: {reason}",
                              event="model_unavailable", embedding_model=name, reason=reason, retry_seconds=retry)
                    if not self._pause():
                        return False
                    continue
                self._log(logging.INFO, f"embedding model {name} loaded", event="model_loaded",
                          embedding_model=name, seconds=round(time.perf_counter() - start, 3))
                break
        if self._stopping.is_set():
            return False
        self.readiness.release("model")
        return True

    def _load_indexes(self) -> None:
        retry = self.settings.index_retry_seconds
        pending = list(self.settings.embedding_models)
        while pending and not self._stopping.is_set():
            failures = []
            for model in list(pending):
                start = time.perf_counter()
                uri = self.uris[model]
                try:
                    bundle = index.fetch(self.backends.s3, self.settings.documents_bucket,
                                         self.settings.documents_prefix, model)
                    loaded = index.verify(bundle, tenant=self.settings.tenant_id, model=model,
                                          dimension=self.state.embedders[model].dimension)
                except index.IndexRefused as refused:
                    failures.append(f"{uri}: {refused.reason}")
                    self._log(logging.ERROR, f"index {uri} unavailable: {refused.reason}", event="index_unavailable",
                              s3_uri=uri, reason=refused.reason, retry_seconds=retry)
                    continue
                self.state.indexes[model] = loaded
                pending.remove(model)
                self._log(logging.INFO, f"index {uri} loaded", event="index_loaded", s3_uri=uri,
                          chunks=len(loaded.chunks), documents=len(loaded.manifest.get("documents", {})),
                          seconds=round(time.perf_counter() - start, 3))
            if pending:
                self.readiness.hold("index", "; ".join(failures) + f"; retrying every {retry:g}s")
                if not self._pause():
                    return
        if not pending:
            self.state.loaded.set()
            self.readiness.release("index")
