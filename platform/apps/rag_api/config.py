"""Configuration from the environment, validated once at startup.

Every problem names the variable it comes from, and all problems are reported together, so
a broken Deployment is fixed in one edit instead of one crash loop per variable.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from rag_api import __version__
from rag_api.embedding import SUPPORTED_MODELS

# A tenant id is a namespace name, so it must be a DNS-1123 label.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*$"
)
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_MAX_LATENCY_MS = 600_000
_BOOLEANS = {"true": True, "false": False}
# https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# A key prefix ending in '/', so "<prefix>index/..." stays inside the tenant's folder.
_PREFIX = re.compile(r"^[A-Za-z0-9!_.*'()-]+(/[A-Za-z0-9!_.*'()-]+)*/$")
# https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/HowItWorks.NamingRulesDataTypes.html
_TABLE = re.compile(r"^[A-Za-z0-9_.-]{3,255}$")
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-[0-9]+$")
# Bedrock model ids and ARNs (provisioned throughput, inference profiles).
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,2047}$")
_TOP_K = (1, 10)
_RETRY_SECONDS = (Decimal("0.05"), Decimal(3600))
_MAX_THREADS = 256


class ConfigError(Exception):
    """The environment cannot configure the service; ``problems`` name each variable."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration: " + "; ".join(problems))


# Keyword-only, so the RAG fields can be required although earlier ones have defaults.
@dataclass(frozen=True, kw_only=True)
class Settings:
    tenant_id: str
    documents_bucket: str
    documents_prefix: str
    sessions_table: str
    aws_region: str
    llm_models: tuple[str, ...]
    """Bedrock model ids this tenant may use; the first is the default."""
    embedding_models: tuple[str, ...]
    """Embedding models with an index under ``<prefix>index/<model>/``; the first is the default."""
    retrieval_top_k: int = 3
    index_retry_seconds: float = 5.0
    threads: int | None = None
    """OMP_NUM_THREADS: threads of NumPy's BLAS and faiss (many processes share few cores)."""
    tenant_host: str | None = None
    app_version: str = __version__
    # A Fraction, so that the counter in faults.py realises exactly the configured rate
    # (0.29 as a float times 100 is 28.999..., which would lose a failure).
    fault_error_rate: Fraction = Fraction(0)
    fault_latency_ms: int = 0
    fault_crash_on_start: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read and validate every variable; raise ``ConfigError`` listing all problems."""
        problems: list[str] = []

        def optional(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        tenant_id = optional("TENANT_ID")
        if tenant_id is None:
            problems.append("TENANT_ID is required: the tenant this instance serves (e.g. 'tenanta')")
        elif not _DNS_LABEL.match(tenant_id):
            problems.append(
                f"TENANT_ID={tenant_id!r} is not a valid tenant id "
                "(a DNS label: lowercase letters, digits and '-', at most 63 characters)"
            )

        tenant_host = optional("TENANT_HOST")
        if tenant_host is not None and not _HOSTNAME.match(tenant_host):
            problems.append(f"TENANT_HOST={tenant_host!r} is not a hostname")

        app_version = optional("APP_VERSION") or __version__
        if not _VERSION.match(app_version):
            problems.append(
                f"APP_VERSION={app_version!r} is not a version "
                "(letters, digits and '._+-', at most 128 characters)"
            )

        error_rate = Fraction(0)
        raw = optional("FAULT_ERROR_RATE")
        if raw is not None:
            try:
                parsed = Decimal(raw)
            except InvalidOperation:
                parsed = None
            if parsed is None or not parsed.is_finite() or not 0 <= parsed <= 1:
                problems.append(f"FAULT_ERROR_RATE={raw!r} must be a number from 0 to 1")
            else:
                error_rate = Fraction(parsed)

        latency_ms = 0
        raw = optional("FAULT_LATENCY_MS")
        if raw is not None:
            try:
                latency_ms = int(raw)
            except ValueError:
                latency_ms = -1
            if not 0 <= latency_ms <= _MAX_LATENCY_MS:
                problems.append(
                    f"FAULT_LATENCY_MS={raw!r} must be a whole number of milliseconds "
                    f"from 0 to {_MAX_LATENCY_MS}"
                )
                latency_ms = 0

        crash = False
        raw = optional("FAULT_CRASH_ON_START")
        if raw is not None:
            if raw.lower() not in _BOOLEANS:
                problems.append(f"FAULT_CRASH_ON_START={raw!r} must be 'true' or 'false'")
            else:
                crash = _BOOLEANS[raw.lower()]

        def required(name: str, pattern: re.Pattern[str], what: str) -> str:
            value = optional(name)
            if value is None:
                problems.append(f"{name} is required: {what}")
                return ""
            if not pattern.match(value):
                problems.append(f"{name}={value!r} is not {what}")
            return value

        bucket = required("DOCUMENTS_BUCKET", _BUCKET, "an S3 bucket name (the tenant's documents and index)")
        prefix = required(
            "DOCUMENTS_PREFIX", _PREFIX, "an S3 key prefix ending in '/' (the tenant's folder, e.g. 'tenanta/')"
        )
        table = required("SESSIONS_TABLE", _TABLE, "a DynamoDB table name (the tenant's session memory)")
        region = required("AWS_REGION", _REGION, "an AWS region (e.g. 'us-east-1')")

        def model_list(name: str, valid: Callable[[str], str | None]) -> tuple[str, ...]:
            raw = optional(name)
            if raw is None:
                problems.append(f"{name} is required: a comma-separated list of models, the first is the default")
                return ()
            models = [item.strip() for item in raw.split(",")]
            if any(not item for item in models):
                problems.append(f"{name}={raw!r} has an empty entry")
            for item in filter(None, models):
                reason = valid(item)
                if reason:
                    problems.append(f"{name}: {item!r} {reason}")
            duplicates = sorted({item for item in models if item and models.count(item) > 1})
            if duplicates:
                problems.append(f"{name} lists {', '.join(duplicates)} more than once")
            return tuple(models)

        llm_models = model_list(
            "LLM_MODELS", lambda item: None if _MODEL_ID.match(item) else "is not a Bedrock model id or ARN"
        )
        embedding_models = model_list(
            "EMBEDDING_MODELS",
            lambda item: None
            if item in SUPPORTED_MODELS
            else f"is not a supported embedding model (supported: {', '.join(SUPPORTED_MODELS)})",
        )

        top_k = 3
        raw = optional("RETRIEVAL_TOP_K")
        if raw is not None:
            top_k = _whole_number(raw)
            if top_k is None or not _TOP_K[0] <= top_k <= _TOP_K[1]:
                problems.append(f"RETRIEVAL_TOP_K={raw!r} must be a whole number from {_TOP_K[0]} to {_TOP_K[1]}")
                top_k = 3

        retry = 5.0
        raw = optional("INDEX_RETRY_SECONDS")
        if raw is not None:
            try:
                seconds = Decimal(raw)
            except InvalidOperation:
                seconds = None
            low, high = _RETRY_SECONDS
            if seconds is None or not seconds.is_finite() or not low <= seconds <= high:
                problems.append(f"INDEX_RETRY_SECONDS={raw!r} must be a number of seconds from {low} to {high}")
            else:
                retry = float(seconds)

        threads = None
        raw = optional("OMP_NUM_THREADS")
        if raw is not None:
            threads = _whole_number(raw)
            if threads is None or not 1 <= threads <= _MAX_THREADS:
                problems.append(f"OMP_NUM_THREADS={raw!r} must be a whole number from 1 to {_MAX_THREADS}")
                threads = None

        if problems:
            raise ConfigError(problems)
        assert tenant_id is not None
        return cls(
            tenant_id=tenant_id,
            documents_bucket=bucket,
            documents_prefix=prefix,
            sessions_table=table,
            aws_region=region,
            llm_models=llm_models,
            embedding_models=embedding_models,
            retrieval_top_k=top_k,
            index_retry_seconds=retry,
            threads=threads,
            tenant_host=tenant_host,
            app_version=app_version,
            fault_error_rate=error_rate,
            fault_latency_ms=latency_ms,
            fault_crash_on_start=crash,
        )

    def describe(self) -> dict[str, object]:
        """The settings as a log-friendly dict."""
        return {
            "tenant": self.tenant_id,
            "tenant_host": self.tenant_host,
            "version": self.app_version,
            "fault_error_rate": float(self.fault_error_rate),
            "fault_latency_ms": self.fault_latency_ms,
            "fault_crash_on_start": self.fault_crash_on_start,
            "documents": f"s3://{self.documents_bucket}/{self.documents_prefix}",
            "sessions_table": self.sessions_table,
            "aws_region": self.aws_region,
            "llm_models": list(self.llm_models),
            "embedding_models": list(self.embedding_models),
            "retrieval_top_k": self.retrieval_top_k,
            "index_retry_seconds": self.index_retry_seconds,
            "threads": self.threads,
        }


def _whole_number(raw: str) -> int | None:
    try:
        return int(raw)
    except ValueError:
        return None
