"""Test doubles of the RAG tests (imported by tests/test_rag_*.py), and tests that they behave.

- ``HashEmbedder``: a deterministic bag-of-words embedder with the real model's name and
  dimension, for tests where only the plumbing matters (the real one costs seconds to load).
- ``ConverseServer``: Bedrock's Converse on loopback, answering from the ``<context>``
  elements of the system prompt and recording each call.
- ``moto_server``/``aws_client``: S3 and DynamoDB from moto's server, in this process.
- ``Stack``/``serving``: all of them together, each test in its own S3 prefix and table, and
  a started rag_api app on top.
"""

from __future__ import annotations

import base64
import json
import re
import sys
import threading
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest

APPS_DIR = Path(__file__).resolve().parents[1] / "platform" / "apps"
if str(APPS_DIR) not in sys.path:
    sys.path.insert(0, str(APPS_DIR))

from starlette.testclient import TestClient  # noqa: E402

from rag_api import aws, ingest  # noqa: E402
from rag_api.app import create_app  # noqa: E402
from rag_api.aws import Backends  # noqa: E402
from rag_api.config import Settings  # noqa: E402
from rag_api.embedding import DEFAULT_MODEL, SUPPORTED_MODELS, Embedder  # noqa: E402
from rag_api.index import IndexBundle  # noqa: E402

REGION = "us-east-1"
HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
NOVA = "amazon.nova-lite-v1:0"
TENANTA_ARN = "arn:aws:bedrock:us-east-1:111122223333:provisioned-model/tenanta-support"
TENANTB_ARN = "arn:aws:bedrock:us-east-1:111122223333:provisioned-model/tenantb-support"
# Listed for the tenant but unknown to the fake Bedrock: calls to it fail like a retired model.
RETIRED = "anthropic.claude-v2:1"
BUCKET = "platform-tenant-documents"
TENANTA_DOCS = {
    "refunds.md": "# Refund policy\n\nMonthly plans are refunded to the original card within 30 days of a "
                  "request. Annual plans are refunded pro rata for each full month left. TENANTA-7Q2X-ORCHID\n",
    "support-hours.md": "# Support hours\n\nPhone support is open from 9:00 to 17:00 on weekdays. On weekends "
                        "we answer email within one day. TENANTA-K3LM-LILY\n",
    "security.md": "# Account security\n\nA locked account is unlocked by resetting the password from the "
                   "sign-in page; the reset link expires after 15 minutes. TENANTA-P9RT-FERN\n",
}
TENANTB_DOCS = {
    "refunds.md": "# Refunds\n\nWe do not refund annual plans; monthly plans can be cancelled at any time. "
                  "TENANTB-2B4D-CEDAR\n",
    "support-hours.md": "# Hours\n\nSupport is available around the clock, every day. TENANTB-8H1J-MAPLE\n",
}
_CONTEXT = re.compile(r"<context>\n\[source: (?P<doc>[^\n]+)#(?P<chunk>\d+)\]\n(?P<text>.*?)\n</context>", re.DOTALL)
_WORD = re.compile(r"\w+")


class HashEmbedder:
    """Each word adds 1 to a dimension chosen by its CRC32; rows are L2-normalised."""

    name = DEFAULT_MODEL
    dimension = SUPPORTED_MODELS[DEFAULT_MODEL]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in _WORD.findall(text.lower()):
                vectors[row, zlib.crc32(word.encode()) % self.dimension] += 1
            norm = float(np.linalg.norm(vectors[row]))
            if norm:
                vectors[row] /= norm
            else:
                vectors[row, 0] = 1.0
        return vectors


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if len(w) > 2}


def answer_from_context(system: str, question: str) -> str:
    """The sentence of the context sharing most words with the question, with its citation."""
    best: tuple[int, str, str] = (-1, "The documents do not cover this.", "")
    for block in _CONTEXT.finditer(system):
        for sentence in re.split(r"(?<=[.!?])\s+", block["text"]):
            overlap = len(_words(sentence) & _words(question))
            if overlap > best[0]:
                best = (overlap, sentence.strip(), f" [source: {block['doc']}#{block['chunk']}]")
    return best[1] + best[2]


class ConverseServer:
    """``POST /model/{modelId}/converse`` on 127.0.0.1; ``calls`` records each request body."""

    def __init__(self, models: Iterable[str]) -> None:
        self.models = set(models)
        self.calls: list[dict[str, Any]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server hook's name
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                match = re.fullmatch(r"/model/(?P<model>[^/]+)/converse", self.path)
                model = urllib.parse.unquote(match["model"]) if match else ""
                owner.calls.append({"model": model, **body})
                if model not in owner.models:
                    self._reply(400, {"message": f"The provided model identifier is invalid: {model}"},
                                error="ValidationException")
                    return
                question = body["messages"][-1]["content"][0]["text"]
                text = answer_from_context(body["system"][0]["text"], question)
                self._reply(200, {
                    "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
                    "stopReason": "end_turn",
                    "usage": {"inputTokens": 1, "outputTokens": 1, "totalTokens": 2},
                    "metrics": {"latencyMs": 1},
                })

            def _reply(self, status: int, payload: dict[str, Any], error: str | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                if error:
                    self.send_header("x-amzn-ErrorType", error)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> ConverseServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's server on a free loopback port, emptied; yields its URL and stops it on exit."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    try:
        # moto's state lives in this process, not in the server: start from nothing.
        urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=10).close()
        yield url
    finally:
        server.stop()


def aws_client(service: str, endpoint: str, **kwargs: Any) -> Any:
    return boto3.client(service, endpoint_url=endpoint, region_name=REGION, aws_access_key_id="testing",
                        aws_secret_access_key="testing", **kwargs)


def create_sessions_table(dynamodb: Any, name: str) -> None:
    """The table as the platform provisions it: session_id (S) + turn (N)."""
    dynamodb.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "session_id", "KeyType": "HASH"}, {"AttributeName": "turn", "KeyType": "RANGE"}],
        AttributeDefinitions=[{"AttributeName": "session_id", "AttributeType": "S"},
                              {"AttributeName": "turn", "AttributeType": "N"}],
        BillingMode="PAY_PER_REQUEST",
    )


def identity_headers(tenant: str = "tenanta", *, sub: str | None = "alice-sub", claim: str | None = None,
                     header: str | None = None) -> dict[str, str]:
    """What the sidecar writes for a verified user of ``tenant`` (claim/header override each side)."""
    claims: dict[str, Any] = {"iss": f"https://idp.example.com/{tenant}", "token_use": "id"}
    if sub is not None:
        claims["sub"] = sub
    claims["custom:tenantid"] = claim if claim is not None else tenant
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return {"x-jwt-payload": payload, "x-auth-request-tenantid": header if header is not None else tenant}


def write_corpus(folder: Path, docs: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def rag_settings(**overrides: Any) -> Settings:
    """tenanta's settings as its Deployment sets them; tests retry the index every 0.2 s."""
    values: dict[str, Any] = {
        "tenant_id": "tenanta",
        "documents_bucket": BUCKET,
        "documents_prefix": "tenanta/",
        "sessions_table": "tenanta-sessions",
        "aws_region": REGION,
        "llm_models": (HAIKU, NOVA, TENANTA_ARN, RETIRED),
        "embedding_models": (DEFAULT_MODEL,),
        "index_retry_seconds": 0.2,
        "threads": 1,
    }
    return Settings(**{**values, **overrides})


class Stack:
    """moto (S3, DynamoDB) and the fake Bedrock; clients to set up and inspect them."""

    def __init__(self, endpoint: str, bedrock: ConverseServer, embedder: Embedder) -> None:
        self.endpoint = endpoint
        self.bedrock = bedrock
        self.embedder = embedder
        self.s3 = aws_client("s3", endpoint)
        self.dynamodb = aws_client("dynamodb", endpoint)
        self._clients = [self.s3, self.dynamodb]
        self.s3.create_bucket(Bucket=BUCKET)
        self._spaces = 0

    def space(self, **overrides: Any) -> Settings:
        """Settings with a prefix and a sessions table of their own, so tests share nothing."""
        self._spaces += 1
        table = f"tenanta-sessions-{self._spaces}"
        create_sessions_table(self.dynamodb, table)
        return rag_settings(documents_prefix=f"tenanta-{self._spaces}/", sessions_table=table, **overrides)

    def upload(self, settings: Settings, bundle: IndexBundle) -> str:
        return ingest.upload(bundle, self.s3, settings.documents_bucket, settings.documents_prefix)

    def put_files(self, settings: Settings, bundle: IndexBundle, model: str = DEFAULT_MODEL) -> None:
        """The files under ``model``'s key whatever their manifest says (upload follows the manifest)."""
        for name, data in bundle.files().items():
            key = f"{settings.documents_prefix}index/{model}/{name}"
            self.s3.put_object(Bucket=settings.documents_bucket, Key=key, Body=data)

    def backends(self) -> Backends:
        """Clients as the service configures them (timeouts, retries), aimed at the fakes."""
        made = Backends(
            s3=aws_client("s3", self.endpoint, config=aws.S3_CONFIG),
            dynamodb=aws_client("dynamodb", self.endpoint, config=aws.DYNAMODB_CONFIG),
            bedrock=aws_client("bedrock-runtime", self.bedrock.url, config=aws.BEDROCK_CONFIG),
            load_embedder=lambda name: self.embedder,
        )
        self._clients += [made.s3, made.dynamodb, made.bedrock]
        return made

    def items(self, table: str) -> list[dict[str, Any]]:
        return self.dynamodb.scan(TableName=table, ConsistentRead=True)["Items"]

    def close(self) -> None:
        for client in self._clients:
            client.close()


@contextmanager
def stack(embedder: Embedder) -> Iterator[Stack]:
    """A ``Stack`` whose servers and clients are all stopped and closed on exit."""
    with moto_server() as endpoint, ConverseServer([HAIKU, NOVA, TENANTA_ARN, TENANTB_ARN]) as bedrock:
        made = Stack(endpoint, bedrock, embedder)
        try:
            yield made
        finally:
            made.close()


@contextmanager
def serving(settings: Settings, backends: Backends, *, ready: bool = True) -> Iterator[TestClient]:
    """A started app (lifespan run) and its client; with ``ready`` once its index is loaded."""
    app = create_app(settings, backends=backends)
    with TestClient(app, base_url="http://tenanta.example.com") as client:
        if ready:
            assert app.state.loader.wait(60), app.state.readiness.pending()
        yield client


# --- the doubles themselves ------------------------------------------------------------------


def test_hash_embedder_rows_are_unit_vectors_and_similar_texts_score_higher() -> None:
    vectors = HashEmbedder().encode(["refund policy for plans", "refund policy", "support hours", ""])
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_converse_server_speaks_what_botocore_sends_and_parses() -> None:
    system = "rules\n\n<context>\n[source: refunds.md#0]\nRefunds take 30 days. Hours are 9 to 5.\n</context>"
    with ConverseServer([TENANTA_ARN]) as fake:
        bedrock = aws_client("bedrock-runtime", fake.url)
        try:
            reply = bedrock.converse(modelId=TENANTA_ARN, system=[{"text": system}],
                                     messages=[{"role": "user", "content": [{"text": "How long do refunds take?"}]}])
            with pytest.raises(bedrock.exceptions.ValidationException):
                bedrock.converse(modelId="unknown.model", messages=[{"role": "user", "content": [{"text": "hi"}]}])
        finally:
            bedrock.close()
    assert reply["output"]["message"]["content"][0]["text"] == "Refunds take 30 days. [source: refunds.md#0]"
    assert [call["model"] for call in fake.calls] == [TENANTA_ARN, "unknown.model"]
