"""Ingestion (rag_api.ingest): documents, chunks, the index it builds, its command line."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_rag_fakes import APPS_DIR, aws_client, moto_server

from rag_api import embedding, index, ingest
from rag_api.embedding import DEFAULT_MODEL
from rag_api.ingest import IngestError, chunk_text

REFUNDS = """# Refund policy

Refunds for monthly plans are paid back to the original card within 30 days. Marker TENANTX-7Q2X-ORCHID.

Annual plans are refunded pro rata for every full month left on the plan.
"""
HOURS = """# Support hours

Phone support is open from 9:00 to 17:00 on weekdays; on weekends we answer email only. TENANTX-K3LM-LILY
"""


@pytest.fixture(scope="module")
def embedder() -> embedding.Embedder:
    """The real all-MiniLM-L6-v2, loaded once for this module, one intra-op thread."""
    return embedding.load(DEFAULT_MODEL, threads=1)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Two documents, a questions.yaml and files that are not documents; removed by tmp_path."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "refunds.md").write_text(REFUNDS, encoding="utf-8")
    (folder / "support-hours.md").write_text(HOURS, encoding="utf-8")
    (folder / "questions.yaml").write_text("markers: [TENANTX-7Q2X-ORCHID]\nquestions: []\n", encoding="utf-8")
    (folder / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / ".draft.md").write_text("not published", encoding="utf-8")
    return folder


# --- chunking ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunking:
    name: str
    text: str
    chunks: list[str]
    limit: int = 60

    def __str__(self) -> str:
        return self.name


P40 = "a" * 39 + "."
CHUNKING = [
    Chunking("a short document is one chunk", "# T\n\nshort text.\n", ["# T\n\nshort text."]),
    Chunking("paragraphs are packed while they fit", f"{P40}\n\n{'b' * 15}\n\n{'c' * 30}",
             [f"{P40}\n\n{'b' * 15}", "c" * 30]),
    Chunking("a line of spaces separates paragraphs", "one.\n  \ntwo.",
             ["one.\n\ntwo."]),
    Chunking("a heading starts the chunk of the paragraph after it", f"{P40}\n\n## Hours\n\n{'d' * 40}",
             [P40, f"## Hours\n\n{'d' * 40}"]),
    Chunking("a long paragraph is cut between sentences", f"{P40} {P40} short one.",
             [P40, f"{P40} short one."]),
    Chunking("a long sentence is cut between words", " ".join(["word"] * 20),
             [" ".join(["word"] * 12), " ".join(["word"] * 8)]),
    Chunking("a word longer than the limit stays whole", f"x {'M' * 70} y", ["x", "M" * 70, "y"]),
]


@pytest.mark.parametrize("case", CHUNKING, ids=str)
def test_chunking(case: Chunking) -> None:
    assert chunk_text(case.text, case.limit) == case.chunks


MARKERS = ["TENANTX-7Q2X-ORCHID", "TENANTY-0000-FERN"]
words = st.one_of(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=25),
    st.sampled_from([*MARKERS, "end.", "Why?", "#", "##"]),
)
paragraphs = st.lists(st.lists(words, min_size=1, max_size=60).map(" ".join), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(paragraphs=paragraphs, limit=st.integers(min_value=30, max_value=200))
def test_chunks_keep_every_word_in_order_never_split_one_and_stay_within_the_limit(
    paragraphs: list[str], limit: int
) -> None:
    text = "\n\n".join(paragraphs)
    chunks = chunk_text(text, limit)
    assert " ".join(chunks).split() == text.split()
    assert all(len(chunk) <= limit for chunk in chunks)
    for marker in MARKERS:
        assert sum(chunk.count(marker) for chunk in chunks) == text.count(marker)


# --- documents --------------------------------------------------------------------------------


def test_documents_are_the_text_files_only(corpus: Path) -> None:
    (corpus / "more").mkdir()
    (corpus / "more" / "notes.txt").write_text("nested notes", encoding="utf-8")
    docs = ingest.documents(corpus)
    assert [doc.name for doc in docs] == ["more/notes.txt", "refunds.md", "support-hours.md"]
    assert docs[1].sha256 == hashlib.sha256((corpus / "refunds.md").read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("files", "message"),
    [
        pytest.param({}, "has no documents to index", id="an empty folder is refused"),
        pytest.param({"questions.yaml": "questions: []"}, "has no documents to index",
                     id="a folder with only questions.yaml is refused"),
        pytest.param({"a.md": " \n\n "}, "has no documents to index", id="blank documents are refused"),
        pytest.param({"latin1.md": b"caf\xe9"}, "latin1.md is not UTF-8", id="a document that is not UTF-8 is refused"),
    ],
)
def test_a_corpus_without_usable_documents_is_refused(tmp_path: Path, files: dict[str, object], message: str) -> None:
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(str(content), encoding="utf-8")
    with pytest.raises(IngestError, match=message):
        ingest.documents(tmp_path)


def test_a_missing_corpus_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="is not a directory"):
        ingest.documents(tmp_path / "nope")


# --- building the index with the real model ----------------------------------------------------


def test_build_index_is_deterministic_and_follows_the_contract(corpus: Path, embedder: embedding.Embedder) -> None:
    first = ingest.build_index(corpus, "tenantx", embedder)
    second = ingest.build_index(corpus, "tenantx", embedder)
    assert first == second
    manifest = json.loads(first.manifest)
    assert manifest == {
        "format": 1,
        "tenant": "tenantx",
        "embedding_model": "all-MiniLM-L6-v2",
        "dimension": 384,
        "chunks": 2,
        "files": {"index.faiss": index.sha256(first.index), "chunks.jsonl": index.sha256(first.chunks)},
        "documents": {name: hashlib.sha256((corpus / name).read_bytes()).hexdigest()
                      for name in ("refunds.md", "support-hours.md")},
    }
    rows = [json.loads(line) for line in first.chunks.decode().splitlines()]
    assert [(r["id"], r["document"], r["chunk"]) for r in rows] == [(0, "refunds.md", 0), (1, "support-hours.md", 0)]
    assert "TENANTX-7Q2X-ORCHID" in rows[0]["text"]


@pytest.mark.parametrize(
    ("question", "document"),
    [
        pytest.param("How long until my money is returned?", "refunds.md", id="a refund question finds refunds.md"),
        pytest.param("Can I call you on Saturday?", "support-hours.md", id="an opening hours question finds hours"),
    ],
)
def test_the_built_index_finds_the_document_that_answers(
    corpus: Path, embedder: embedding.Embedder, question: str, document: str
) -> None:
    loaded = index.verify(ingest.build_index(corpus, "tenantx", embedder), tenant="tenantx",
                          model=DEFAULT_MODEL, dimension=384)
    [best, *_] = loaded.search(embedder.encode([question])[0], 2)
    assert best.chunk.document == document


def test_an_invalid_tenant_is_refused(corpus: Path, embedder: embedding.Embedder) -> None:
    with pytest.raises(IngestError, match="'Tenant X' is not a tenant id"):
        ingest.build_index(corpus, "Tenant X", embedder)


# --- command line -----------------------------------------------------------------------------


def test_cli_writes_the_three_files_into_out(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             embedder: embedding.Embedder) -> None:
    assert ingest.main(["--tenant", "tenantx", "--corpus", str(corpus), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["tenant"], summary["chunks"], summary["documents"]) == ("tenantx", 2, 2)
    written = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert written == ingest.build_index(corpus, "tenantx", embedder).files()


def test_cli_uploads_to_s3_with_boto3_variables(corpus: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with moto_server() as endpoint:
        for name, value in {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        s3 = aws_client("s3", endpoint)
        try:
            s3.create_bucket(Bucket="docs")
            argv = ["--tenant", "tenantx", "--corpus", str(corpus), "--bucket", "docs", "--prefix", "tenantx/"]
            assert ingest.main(argv) == 0
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket="docs")["Contents"]]
            loaded = index.verify(index.fetch(s3, "docs", "tenantx/", DEFAULT_MODEL), tenant="tenantx",
                                  model=DEFAULT_MODEL, dimension=384)
            capsys.readouterr()
            assert ingest.main([*argv[:-3], "missing-bucket", "--prefix", "tenantx/"]) == 1
        finally:
            s3.close()
    failed = capsys.readouterr()
    assert failed.out == "" and "upload to s3://missing-bucket/tenantx/ failed: " in failed.err
    assert sorted(keys) == [f"tenantx/index/all-MiniLM-L6-v2/{name}" for name in sorted(index.FILES)]
    assert len(loaded.chunks) == 2


def test_cli_refuses_an_empty_corpus_as_a_process(tmp_path: Path) -> None:
    (tmp_path / "questions.yaml").write_text("questions: []\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "rag_api.ingest", "--tenant", "tenantx", "--corpus", str(tmp_path),
         "--out", str(tmp_path / "out")],
        env={"PYTHONPATH": str(APPS_DIR), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done
    assert "has no documents to index" in done.stderr and "refusing to publish an empty index" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--tenant", "t", "--corpus", "c"], id="neither --out nor --bucket is refused"),
        pytest.param(["--tenant", "t", "--corpus", "c", "--bucket", "b"], id="--bucket without --prefix is refused"),
        pytest.param(["--tenant", "t", "--corpus", "c", "--out", "o", "--bucket", "b"], id="--out with --bucket is refused"),
        pytest.param(["--tenant", "t", "--corpus", "c", "--out", "o", "--embedding-model", "x"], id="an unknown model is refused"),
    ],
)
def test_cli_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        ingest.main(argv)
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_bench_reports_the_costs_of_the_rag_path(embedder: embedding.Embedder) -> None:
    from rag_api import bench

    numbers = bench.measure(chunks=8, repeats=2, threads=1)
    assert numbers["index_chunks"] == 8
    assert all(numbers[key] > 0 for key in ("model_load_s", "embed_question_ms", "search_ms",
                                            "build_s_per_1000_chunks"))
