"""Build a tenant's index from its corpus and publish it where rag_api reads it.

    python -m rag_api.ingest --tenant tenanta --corpus platform/tenants/tenanta/corpus \\
        (--bucket platform-tenant-documents --prefix tenanta/ | --out DIR) [--embedding-model all-MiniLM-L6-v2]

``--out DIR`` writes ``manifest.json``, ``index.faiss`` and ``chunks.jsonl`` into DIR;
``--bucket/--prefix`` uploads them to ``s3://B/P index/<model>/`` (boto3 finds the endpoint and
credentials in its usual variables). The same steps are a Python API: ``build_index`` returns
the files as bytes, ``write``/``upload`` publish them.

Documents are the corpus's ``*.md``, ``*.markdown`` and ``*.txt`` files (``questions.yaml`` and
anything else is not a document). A document is cut into chunks at paragraph boundaries; a
paragraph longer than a chunk is cut between sentences, a sentence between words. Text is
never cut inside a word, so no marker or identifier is ever split across two chunks.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss

from rag_api import embedding, index
from rag_api.embedding import DEFAULT_MODEL, Embedder
from rag_api.index import IndexBundle

MAX_CHUNK_CHARS = 800
DOCUMENT_SUFFIXES = (".md", ".markdown", ".txt")
_TENANT = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_HEADING = re.compile(r"^#{1,6}\s+(.+)$", re.MULTILINE)


class IngestError(Exception):
    """The corpus cannot be indexed; the message names the file or the problem."""


@dataclass(frozen=True)
class Document:
    name: str
    """Path relative to the corpus folder, with '/' (the file name for a flat corpus)."""
    text: str
    """The text with line endings normalised to '\\n'."""
    sha256: str
    """Of the file's bytes, as the manifest records it."""


# --- documents and chunks --------------------------------------------------------------------


def documents(corpus_dir: Path) -> list[Document]:
    """Every document under ``corpus_dir``, by name. Hidden paths are skipped."""
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise IngestError(f"corpus {corpus_dir} is not a directory")
    found = []
    for path in sorted(corpus_dir.rglob("*")):
        relative = path.relative_to(corpus_dir)
        if not path.is_file() or path.suffix.lower() not in DOCUMENT_SUFFIXES:
            continue
        if any(part.startswith(".") for part in relative.parts):
            continue
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise IngestError(f"document {relative.as_posix()} is not UTF-8: {error}") from None
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        found.append(Document(relative.as_posix(), text, index.sha256(data)))
    if not any(doc.text.strip() for doc in found):
        raise IngestError(
            f"corpus {corpus_dir} has no documents to index ({', '.join('*' + s for s in DOCUMENT_SUFFIXES)} "
            "with some text); refusing to publish an empty index"
        )
    return found


def _pack(pieces: Iterable[str], separator: str, limit: int) -> list[str]:
    """Join consecutive pieces with ``separator`` while the result stays within ``limit``."""
    packed: list[str] = []
    for piece in pieces:
        if packed and len(packed[-1]) + len(separator) + len(piece) <= limit:
            packed[-1] += separator + piece
        else:
            packed.append(piece)
    return packed


def _split_paragraph(paragraph: str, limit: int) -> list[str]:
    if len(paragraph) <= limit:
        return [paragraph]
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(paragraph):
        if len(sentence) <= limit:
            pieces.append(sentence)
        else:
            # A single word longer than the limit stays whole: cutting it could split a marker.
            pieces.extend(_pack(sentence.split(), " ", limit))
    return _pack(pieces, " ", limit)


def chunk_text(text: str, limit: int = MAX_CHUNK_CHARS) -> list[str]:
    """Cut a document into chunks of at most ``limit`` characters (a longer word stays whole)."""
    units: list[str] = []
    for paragraph in _PARAGRAPH_BREAK.split(text):
        paragraph = paragraph.strip()
        if paragraph:
            units.extend(_split_paragraph(paragraph, limit))
    # A heading belongs to what follows it, not to the end of the previous chunk.
    merged: list[str] = []
    for unit in units:
        if merged and _HEADING.fullmatch(merged[-1]) and len(merged[-1]) + 2 + len(unit) <= limit:
            merged[-1] += "\n\n" + unit
        else:
            merged.append(unit)
    return _pack(merged, "\n\n", limit)


def _title(name: str, text: str) -> str:
    heading = _HEADING.search(text)
    return heading.group(1).strip() if heading else Path(name).stem.replace("-", " ").replace("_", " ")


def chunk_corpus(docs: list[Document], limit: int = MAX_CHUNK_CHARS) -> list[index.Chunk]:
    chunks: list[index.Chunk] = []
    for doc in docs:
        for number, piece in enumerate(chunk_text(doc.text, limit)):
            chunks.append(index.Chunk(id=len(chunks), document=doc.name, chunk=number, text=piece))
    return chunks


# --- the index -------------------------------------------------------------------------------


def _embedding_input(chunk: index.Chunk, titles: dict[str, str]) -> str:
    # A later chunk of a document rarely repeats what the document is about; its title does.
    title = titles[chunk.document]
    return chunk.text if title in chunk.text else f"{title}\n\n{chunk.text}"


def build_index(corpus_dir: Path, tenant: str, model: Embedder | str = DEFAULT_MODEL) -> IndexBundle:
    """Chunk, embed and index ``corpus_dir`` for ``tenant``; the same inputs give the same bytes."""
    if not _TENANT.match(tenant):
        raise IngestError(f"tenant {tenant!r} is not a tenant id (a DNS label)")
    docs = documents(corpus_dir)
    embedder = embedding.load(model) if isinstance(model, str) else model
    chunks = chunk_corpus(docs)
    titles = {doc.name: _title(doc.name, doc.text) for doc in docs}
    vectors = embedder.encode([_embedding_input(c, titles) for c in chunks])
    faiss_index = faiss.IndexFlatIP(embedder.dimension)
    faiss_index.add(vectors)
    index_bytes = index.serialize(faiss_index)
    chunks_bytes = b"".join(
        json.dumps(
            {"id": c.id, "document": c.document, "chunk": c.chunk, "text": c.text}, ensure_ascii=False
        ).encode("utf-8")
        + b"\n"
        for c in chunks
    )
    manifest = {
        "format": index.FORMAT,
        "tenant": tenant,
        "embedding_model": embedder.name,
        "dimension": embedder.dimension,
        "chunks": len(chunks),
        "files": {index.INDEX: index.sha256(index_bytes), index.CHUNKS: index.sha256(chunks_bytes)},
        "documents": {doc.name: doc.sha256 for doc in docs},
    }
    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
    return IndexBundle(manifest=manifest_bytes, index=index_bytes, chunks=chunks_bytes)


def write(bundle: IndexBundle, out_dir: Path) -> list[Path]:
    """Write the three files into ``out_dir`` (created if needed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in bundle.files().items():
        (out_dir / name).write_bytes(data)
        paths.append(out_dir / name)
    return paths


def upload(bundle: IndexBundle, s3: Any, bucket: str, prefix: str) -> str:
    """Upload to ``s3://bucket/<prefix>index/<model>/``; returns that URI.

    The manifest goes last, so a reader that finds it finds the files it describes (a reader
    that comes in between sees a checksum mismatch, refuses, and retries).
    """
    if prefix and not prefix.endswith("/"):
        raise IngestError(f"prefix {prefix!r} must end with '/'")
    model = json.loads(bundle.manifest)["embedding_model"]
    key = index.location(prefix, model)
    for name, data in sorted(bundle.files().items(), key=lambda item: item[0] == index.MANIFEST):
        s3.put_object(Bucket=bucket, Key=key + name, Body=data)
    return f"s3://{bucket}/{key}"


# --- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rag_api.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--tenant", required=True, help="the tenant id written into the manifest")
    parser.add_argument("--corpus", required=True, type=Path, help="folder of the tenant's documents")
    parser.add_argument("--embedding-model", default=DEFAULT_MODEL, choices=sorted(embedding.SUPPORTED_MODELS))
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="write the index files into this folder")
    target.add_argument("--bucket", help="upload to this S3 bucket (needs --prefix)")
    parser.add_argument("--prefix", help="the tenant's key prefix in the bucket, ending in '/' (e.g. tenanta/)")
    args = parser.parse_args(argv)
    if args.bucket and args.prefix is None:
        parser.error("--bucket needs --prefix")
    if args.out and args.prefix is not None:
        parser.error("--prefix goes with --bucket, not --out")
    start = time.perf_counter()
    try:
        bundle = build_index(args.corpus, args.tenant, args.embedding_model)
    except (IngestError, embedding.EmbeddingError) as error:
        print(f"rag_api.ingest: {error}", file=sys.stderr)
        return 2
    manifest = json.loads(bundle.manifest)
    summary = {"tenant": args.tenant, "embedding_model": manifest["embedding_model"], "chunks": manifest["chunks"],
               "documents": len(manifest["documents"]), "build_seconds": round(time.perf_counter() - start, 3)}
    if args.out:
        summary["written"] = [str(p) for p in write(bundle, args.out)]
    else:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            summary["uploaded"] = upload(bundle, boto3.client("s3"), args.bucket, args.prefix)
        except (BotoCoreError, ClientError, IngestError) as error:
            print(f"rag_api.ingest: upload to s3://{args.bucket}/{args.prefix} failed: {error}", file=sys.stderr)
            return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
