"""A tenant's FAISS index in S3: its format, its verification, and search.

Layout (written by ``rag_api.ingest``)::

    s3://<bucket>/<prefix>index/<embedding-model>/manifest.json
                                                 /index.faiss    faiss.IndexFlatIP, one row per chunk
                                                 /chunks.jsonl   {"id", "document", "chunk", "text"} per line

The manifest names the tenant, the model, the dimension, the chunk count and the SHA-256 of
the other two files. An index is used only when every one of those agrees: a truncated
upload, another tenant's index copied into the wrong prefix, or an index built with another
model would otherwise answer questions from the wrong documents without any error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
from botocore.exceptions import BotoCoreError, ClientError

FORMAT = 1
MANIFEST, INDEX, CHUNKS = "manifest.json", "index.faiss", "chunks.jsonl"
FILES = (MANIFEST, INDEX, CHUNKS)
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


class IndexRefused(Exception):
    """The index cannot be used; ``reason`` says why in one line."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class Chunk:
    id: int
    document: str
    chunk: int
    text: str


@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    score: float


@dataclass(frozen=True)
class IndexBundle:
    """The three files of an index, as bytes."""

    manifest: bytes
    index: bytes
    chunks: bytes

    def files(self) -> dict[str, bytes]:
        return {MANIFEST: self.manifest, INDEX: self.index, CHUNKS: self.chunks}


def location(prefix: str, model: str) -> str:
    """The key prefix of ``model``'s index under a tenant's documents prefix."""
    return f"{prefix}index/{model}/"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def _deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


class LoadedIndex:
    """A verified index, ready for search. Search only reads, so threads may share it."""

    def __init__(self, manifest: dict[str, Any], index: faiss.Index, chunks: list[Chunk]) -> None:
        self.manifest = manifest
        self.tenant: str = manifest["tenant"]
        self.embedding_model: str = manifest["embedding_model"]
        self.index = index
        self.chunks = chunks

    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        """The ``k`` chunks closest to ``vector`` (shape ``(dimension,)``), best first."""
        k = min(k, len(self.chunks))
        if k <= 0:
            return []
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        scores, ids = self.index.search(query, k)
        return [Hit(self.chunks[i], float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]


def verify(bundle: IndexBundle, *, tenant: str, model: str, dimension: int) -> LoadedIndex:
    """Check every claim of the manifest against the files and the caller's expectations.

    Raises ``IndexRefused`` naming the first disagreement.
    """
    try:
        manifest = json.loads(bundle.manifest.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise IndexRefused(f"{MANIFEST} is not JSON: {error}") from None
    if not isinstance(manifest, dict):
        raise IndexRefused(f"{MANIFEST} is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise IndexRefused(f"{MANIFEST} has format {manifest.get('format')!r}; this service reads format {FORMAT}")
    if manifest.get("tenant") != tenant:
        raise IndexRefused(f"the index belongs to tenant {manifest.get('tenant')!r}, not to {tenant!r}")
    if manifest.get("embedding_model") != model:
        raise IndexRefused(f"the index was built with embedding model {manifest.get('embedding_model')!r}, not {model!r}")
    if manifest.get("dimension") != dimension:
        raise IndexRefused(f"the manifest says dimension {manifest.get('dimension')!r}; {model} has {dimension}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise IndexRefused(f"{MANIFEST} has no 'files' checksums")
    for name, data in ((INDEX, bundle.index), (CHUNKS, bundle.chunks)):
        if files.get(name) != sha256(data):
            raise IndexRefused(
                f"checksum mismatch: {name} has sha256 {sha256(data)}, the manifest says {files.get(name)!r}"
            )
    count = manifest.get("chunks")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise IndexRefused(f"the manifest says {count!r} chunks; expected a positive whole number")
    try:
        index = _deserialize(bundle.index)
    except RuntimeError as error:
        raise IndexRefused(f"{INDEX} is not a faiss index: {str(error).splitlines()[0]}") from None
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexRefused(f"{INDEX} does not use inner product (cosine on normalised vectors)")
    if index.d != dimension or index.ntotal != count:
        raise IndexRefused(
            f"{INDEX} holds {index.ntotal} vectors of dimension {index.d}; "
            f"the manifest says {count} of dimension {dimension}"
        )
    chunks = _parse_chunks(bundle.chunks)
    if len(chunks) != count:
        raise IndexRefused(f"{CHUNKS} has {len(chunks)} chunks; the manifest says {count}")
    return LoadedIndex(manifest, index, chunks)


def _parse_chunks(data: bytes) -> list[Chunk]:
    chunks = []
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise IndexRefused(f"{CHUNKS} is not UTF-8: {error}") from None
    for number, line in enumerate(lines):
        try:
            row = json.loads(line)
            chunk = Chunk(id=row["id"], document=row["document"], chunk=row["chunk"], text=row["text"])
        except (ValueError, TypeError, KeyError) as error:
            raise IndexRefused(f"{CHUNKS} line {number + 1} is not a chunk: {error!r}") from None
        types_ok = isinstance(chunk.document, str) and isinstance(chunk.text, str) and isinstance(chunk.chunk, int)
        if chunk.id != number or not types_ok:
            raise IndexRefused(f"{CHUNKS} line {number + 1} is not chunk {number} (id, document, chunk, text)")
        chunks.append(chunk)
    return chunks


def fetch(s3: Any, bucket: str, prefix: str, model: str) -> IndexBundle:
    """Download the three files of ``model``'s index; ``IndexRefused`` if any is unreadable."""
    key = location(prefix, model)
    data = {}
    for name in FILES:
        try:
            data[name] = s3.get_object(Bucket=bucket, Key=key + name)["Body"].read()
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in _MISSING_CODES:
                raise IndexRefused(f"s3://{bucket}/{key}{name} does not exist (no index was uploaded)") from None
            raise IndexRefused(f"cannot read s3://{bucket}/{key}{name}: {error}") from None
        except BotoCoreError as error:
            raise IndexRefused(f"cannot reach S3 for s3://{bucket}/{key}{name}: {error}") from None
    return IndexBundle(manifest=data[MANIFEST], index=data[INDEX], chunks=data[CHUNKS])
