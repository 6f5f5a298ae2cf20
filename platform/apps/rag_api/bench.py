"""What the RAG path costs on this machine: ``python -m rag_api.bench [--chunks N]``.

Prints one JSON object: model load time, embedding time per question, FAISS search time
(median of repeated calls, on an index of ``--chunks`` chunks) and index build time per 1000
chunks. ``measure`` returns the same numbers to other code (``make bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rag_api import embedding, index, ingest

QUESTIONS = (
    "What is the refund policy for annual plans?",
    "When is phone support available on weekends?",
    "How do I reset the password of a locked account?",
)
# Plain English words, so a synthetic chunk costs the tokenizer what a real paragraph does.
_WORDS = (
    "the customer may request a refund within thirty days of the purchase and support answers every "
    "question about plans invoices passwords accounts shipping warranty hours regions and billing by "
    "phone or email on weekdays while urgent security issues are handled around the clock"
).split()


def synthetic_corpus(folder: Path, chunks: int, chars: int = 600) -> None:
    """``chunks`` one-paragraph documents of about ``chars`` characters each (one chunk each)."""
    for number in range(chunks):
        words, i = [], number + 1
        while sum(len(w) + 1 for w in words) < chars:
            i = (i * 1103515245 + 12345) % 2**31  # a fixed pseudo-random walk: the same corpus every run
            words.append(_WORDS[(i >> 16) % len(_WORDS)])
        (folder / f"doc-{number:05d}.md").write_text(" ".join(words) + ".\n", encoding="utf-8")


def _median_ms(call: Callable[[], Any], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(samples), 3)


def measure(
    model: str = embedding.DEFAULT_MODEL, *, chunks: int = 1000, repeats: int = 20, threads: int | None = None
) -> dict[str, Any]:
    start = time.perf_counter()
    embedder = embedding.load(model, threads)
    load_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="rag-bench-") as tmp:
        synthetic_corpus(Path(tmp), chunks)
        start = time.perf_counter()
        bundle = ingest.build_index(Path(tmp), "bench", embedder)
        build_s = time.perf_counter() - start
    loaded = index.verify(bundle, tenant="bench", model=model, dimension=embedder.dimension)
    vector = embedder.encode([QUESTIONS[0]])[0]
    per_question_ms = _median_ms(lambda: [embedder.encode([q]) for q in QUESTIONS], repeats) / len(QUESTIONS)
    return {
        "embedding_model": model,
        "threads": threads,
        "model_load_s": round(load_s, 3),
        "embed_question_ms": round(per_question_ms, 3),
        "search_ms": _median_ms(lambda: loaded.search(vector, 3), repeats),
        "index_chunks": len(loaded.chunks),
        "build_s_per_1000_chunks": round(build_s * 1000 / len(loaded.chunks), 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rag_api.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=1000, help="chunks in the benchmark index (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=20, help="calls per median (default: %(default)s)")
    args = parser.parse_args(argv)
    threads = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit() else None
    print(json.dumps(measure(chunks=args.chunks, repeats=args.repeats, threads=threads)))


if __name__ == "__main__":
    main()
