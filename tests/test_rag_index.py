"""The index format: what rag_api accepts and what it refuses (rag_api.index)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import faiss
import numpy as np
import pytest
from test_rag_fakes import HashEmbedder, aws_client, moto_server

from rag_api import index, ingest
from rag_api.index import IndexBundle, IndexRefused

MODEL, DIMENSION = HashEmbedder.name, HashEmbedder.dimension


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> IndexBundle:
    """A tenanta index of two small documents, built with the hash embedder."""
    corpus = tmp_path_factory.mktemp("corpus")
    (corpus / "refunds.md").write_text("# Refunds\n\nRefunds are paid within 30 days.\n", encoding="utf-8")
    (corpus / "hours.md").write_text("# Support hours\n\nWe answer the phone from 9 to 17.\n", encoding="utf-8")
    return ingest.build_index(corpus, "tenanta", HashEmbedder())


def with_manifest(bundle: IndexBundle, **changes: object) -> IndexBundle:
    manifest = json.loads(bundle.manifest)
    manifest.update(changes)
    return replace(bundle, manifest=json.dumps(manifest).encode())


def with_file(bundle: IndexBundle, name: str, data: bytes) -> IndexBundle:
    """``name`` replaced by ``data`` and the manifest's checksum updated to match."""
    changed = replace(bundle, **{"index" if name == index.INDEX else "chunks": data})
    files = {**json.loads(bundle.manifest)["files"], name: index.sha256(data)}
    return with_manifest(changed, files=files)


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def flat_l2(bundle: IndexBundle) -> bytes:
    original = faiss.deserialize_index(np.frombuffer(bundle.index, dtype=np.uint8))
    other = faiss.IndexFlatL2(DIMENSION)
    other.add(original.reconstruct_n(0, original.ntotal))
    return index.serialize(other)


@dataclass(frozen=True)
class Refusal:
    name: str
    change: Callable[[IndexBundle], IndexBundle]
    reason: str

    def __str__(self) -> str:
        return self.name


REFUSALS = [
    Refusal("a manifest that is not JSON is refused", lambda b: replace(b, manifest=b"{nope"), "is not JSON"),
    Refusal("a manifest of another format is refused", lambda b: with_manifest(b, format=2), "format 2"),
    Refusal("another tenant's index is refused", lambda b: with_manifest(b, tenant="tenantb"),
            "belongs to tenant 'tenantb', not to 'tenanta'"),
    Refusal("an index of another embedding model is refused",
            lambda b: with_manifest(b, embedding_model="other-model"), "embedding model 'other-model'"),
    Refusal("a manifest with another dimension is refused", lambda b: with_manifest(b, dimension=768), "dimension 768"),
    Refusal("a corrupt index.faiss is refused", lambda b: replace(b, index=flip_last_byte(b.index)),
            "checksum mismatch: index.faiss"),
    Refusal("a corrupt chunks.jsonl is refused", lambda b: replace(b, chunks=b.chunks + b"\n"),
            "checksum mismatch: chunks.jsonl"),
    Refusal("a chunk count the index disagrees with is refused", lambda b: with_manifest(b, chunks=3),
            "holds 2 vectors of dimension 384; the manifest says 3"),
    Refusal("garbage with a matching checksum is refused", lambda b: with_file(b, index.INDEX, b"garbage" * 50),
            "is not a faiss index"),
    Refusal("an L2 index is refused", lambda b: with_file(b, index.INDEX, flat_l2(b)), "inner product"),
    Refusal("a chunks file with a chunk missing is refused",
            lambda b: with_file(b, index.CHUNKS, b.chunks.splitlines(keepends=True)[0]), "has 1 chunks"),
    Refusal("chunks out of order are refused",
            lambda b: with_file(b, index.CHUNKS, b"".join(reversed(b.chunks.splitlines(keepends=True)))),
            "line 1 is not chunk 0"),
]


@pytest.mark.parametrize("case", REFUSALS, ids=str)
def test_verify_refuses_an_index_that_disagrees_with_itself_or_the_service(bundle: IndexBundle, case: Refusal) -> None:
    loaded = index.verify(bundle, tenant="tenanta", model=MODEL, dimension=DIMENSION)  # positive control
    assert len(loaded.chunks) == 2
    with pytest.raises(IndexRefused) as refused:
        index.verify(case.change(bundle), tenant="tenanta", model=MODEL, dimension=DIMENSION)
    assert case.reason in refused.value.reason


def test_search_returns_the_closest_chunks_best_first(bundle: IndexBundle) -> None:
    loaded = index.verify(bundle, tenant="tenanta", model=MODEL, dimension=DIMENSION)
    [vector] = HashEmbedder().encode(["When do you answer the phone?"])
    hits = loaded.search(vector, 5)
    assert [hit.chunk.document for hit in hits] == ["hours.md", "refunds.md"]
    assert hits[0].score > hits[1].score
    assert loaded.search(vector, 1)[0].chunk.text.startswith("# Support hours")


def test_fetch_reads_what_upload_wrote_and_names_a_missing_index(bundle: IndexBundle) -> None:
    with moto_server() as endpoint:
        s3 = aws_client("s3", endpoint)
        try:
            s3.create_bucket(Bucket="docs")
            with pytest.raises(IndexRefused, match=r"s3://docs/tenanta/index/all-MiniLM-L6-v2/manifest.json does not exist"):
                index.fetch(s3, "docs", "tenanta/", MODEL)
            uri = ingest.upload(bundle, s3, "docs", "tenanta/")
            fetched = index.fetch(s3, "docs", "tenanta/", MODEL)
            with pytest.raises(IndexRefused, match="cannot read s3://nope/"):
                index.fetch(s3, "nope", "tenanta/", MODEL)
        finally:
            s3.close()
    assert uri == "s3://docs/tenanta/index/all-MiniLM-L6-v2/"
    assert fetched == bundle


def test_index_files_are_written_into_the_out_folder(bundle: IndexBundle, tmp_path: Path) -> None:
    paths = ingest.write(bundle, tmp_path / "out")
    assert sorted(p.name for p in paths) == sorted(index.FILES)
    assert (tmp_path / "out" / "index.faiss").read_bytes() == bundle.index
