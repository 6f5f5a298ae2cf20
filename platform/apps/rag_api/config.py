"""Configuration from the environment, validated once at startup.

Every problem names the variable it comes from, and all problems are reported together, so
a broken Deployment is fixed in one edit instead of one crash loop per variable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from rag_api import __version__

# A tenant id is a namespace name, so it must be a DNS-1123 label.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*$"
)
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_MAX_LATENCY_MS = 600_000
_BOOLEANS = {"true": True, "false": False}


class ConfigError(Exception):
    """The environment cannot configure the service; ``problems`` name each variable."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration: " + "; ".join(problems))


@dataclass(frozen=True)
class Settings:
    tenant_id: str
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

        if problems:
            raise ConfigError(problems)
        assert tenant_id is not None
        return cls(
            tenant_id=tenant_id,
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
        }
