"""The AWS clients of the service, and the one place their timeouts are chosen.

Endpoints and credentials come from boto3's own variables (``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL_DYNAMODB``, ``AWS_ENDPOINT_URL_BEDROCK_RUNTIME``, ``AWS_ACCESS_KEY_ID``, a
pod's IRSA role...), so the same code calls moto and a fake Bedrock on standalone and AWS on EKS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.config import Config

from rag_api import embedding
from rag_api.config import Settings

# A session store outage must answer 503 quickly, not hold a request (and a worker thread) for
# botocore's defaults of 60 s reads and several retries: 2 attempts of 2 s each at most.
DYNAMODB_CONFIG = Config(connect_timeout=2, read_timeout=2, retries={"mode": "standard", "total_max_attempts": 2})
# Generating up to 512 tokens takes seconds; a lost connection is still noticed quickly.
BEDROCK_CONFIG = Config(connect_timeout=2, read_timeout=60, retries={"mode": "standard", "total_max_attempts": 2})
# The index is read in the background and retried by the loader, which logs each attempt.
S3_CONFIG = Config(connect_timeout=3, read_timeout=30, retries={"mode": "standard", "total_max_attempts": 2})


@dataclass
class Backends:
    """What the service talks to. Tests pass their own; ``from_settings`` builds the real ones."""

    s3: Any
    dynamodb: Any
    bedrock: Any
    load_embedder: Callable[[str], embedding.Embedder]
    owned: bool = False
    """True when these clients were created here and must be closed at shutdown."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Backends:
        import boto3

        session = boto3.session.Session(region_name=settings.aws_region)
        return cls(
            s3=session.client("s3", config=S3_CONFIG),
            dynamodb=session.client("dynamodb", config=DYNAMODB_CONFIG),
            bedrock=session.client("bedrock-runtime", config=BEDROCK_CONFIG),
            load_embedder=lambda name: embedding.load(name, settings.threads),
            owned=True,
        )

    def close(self) -> None:
        if self.owned:
            for client in (self.s3, self.dynamodb, self.bedrock):
                client.close()
