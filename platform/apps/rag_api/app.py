"""The FastAPI application.

Run it with ``uvicorn rag_api.app:app --app-dir platform/apps`` (the ``app`` attribute is built
from the environment on first access) or ``python -m rag_api``; tests call ``create_app``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from rag_api import identity, logs, rag, xfcc
from rag_api.aws import Backends
from rag_api.config import ConfigError, Settings
from rag_api.faults import FaultInjection
from rag_api.loader import Loader
from rag_api.readiness import Readiness
from rag_api.service import RagService
from rag_api.sessions import SessionStore

CONFIG_ERROR_EXIT = 2


class StartupCrash(RuntimeError):
    """Raised at startup when ``FAULT_CRASH_ON_START`` asks the service to crash."""


class Peer(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)

    spiffe_id: str | None
    """Identity of our sidecar's mTLS peer: the URI of the last XFCC element."""
    by: str | None
    """Our own identity as our sidecar presented it: the By of the last XFCC element."""
    xfcc: str | None
    """The raw x-forwarded-client-cert header."""


class Whoami(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)

    tenant: str
    """TENANT_ID: the tenant this instance serves."""
    version: str
    """APP_VERSION."""
    host: str | None
    """The Host header of the request."""
    peer: Peer
    claims: dict[str, Any] | None
    """The verified JWT payload from x-jwt-payload, written by the sidecar's jwt_authn."""
    tenant_header: str | None
    """x-auth-request-tenantid."""
    client_address: str | None
    """The rightmost x-forwarded-for entry: the address the edge gateway appended."""
    forwarded_for: list[str]
    """Every x-forwarded-for entry, left to right."""
    external_address: str | None
    """x-envoy-external-address."""
    request_id: str | None
    """x-request-id."""


def create_app(settings: Settings | None = None, *, backends: Backends | None = None) -> FastAPI:
    """Build the app; without ``settings`` they are read from ``os.environ``, without
    ``backends`` the AWS clients and the embedding model are the real ones.

    Raises ``ConfigError`` when the environment is invalid.
    """
    settings = settings if settings is not None else Settings.from_env(os.environ)
    backends = backends if backends is not None else Backends.from_settings(settings)
    logger = logs.configure()
    readiness = Readiness()
    readiness.hold("startup", "application startup has not finished")
    loader = Loader(settings, backends, readiness, logger)
    service = RagService(
        settings, loader.state, SessionStore(backends.dynamodb, settings.sessions_table), backends.bedrock, logger
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.fault_crash_on_start:
            message = "FAULT_CRASH_ON_START=true: crashing at startup on purpose"
            logs.event(logger, logging.CRITICAL, message, event="crash_on_start", tenant=settings.tenant_id)
            raise StartupCrash(message)
        logs.event(logger, logging.INFO, "started", event="startup", **settings.describe())
        readiness.release("startup")
        loader.start()
        yield
        readiness.hold("shutdown", "shutting down")
        loader.stop()
        backends.close()
        logs.event(logger, logging.INFO, "stopping", event="shutdown", tenant=settings.tenant_id)

    app = FastAPI(title="rag-api", version=settings.app_version, lifespan=lifespan)
    app.state.settings = settings
    app.state.readiness = readiness
    app.state.loader = loader
    app.state.service = service
    # Added last, so outermost: the access log sees injected faults and latency too.
    app.add_middleware(
        FaultInjection,
        error_rate=settings.fault_error_rate,
        latency_ms=settings.fault_latency_ms,
    )
    app.add_middleware(logs.AccessLog, tenant=settings.tenant_id)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "not ready; `waiting_for` says why"}})
    async def readyz() -> JSONResponse:
        pending = readiness.pending()
        if pending:
            return JSONResponse({"status": "not ready", "waiting_for": pending}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/whoami", responses={400: {"description": "a proxy-set header is malformed"}})
    async def whoami(request: Request) -> Whoami:
        # Trusted because only our sidecar can reach us; see rag_api.identity.
        headers = request.headers
        raw_xfcc = ",".join(headers.getlist("x-forwarded-client-cert")) or None
        elements: list[xfcc.XfccElement] = []
        if raw_xfcc is not None:
            try:
                elements = xfcc.parse(raw_xfcc)
            except xfcc.XfccError as error:
                raise HTTPException(400, f"x-forwarded-client-cert is malformed: {error}") from None

        payloads = headers.getlist("x-jwt-payload")
        claims = None
        if len(payloads) > 1:
            raise HTTPException(400, f"x-jwt-payload appears {len(payloads)} times; expected once")
        if payloads:
            try:
                claims = identity.decode_jwt_payload(payloads[0])
            except identity.HeaderError as error:
                raise HTTPException(400, str(error)) from None

        entries = identity.forwarded_for(headers.getlist("x-forwarded-for"))
        return Whoami(
            tenant=settings.tenant_id,
            version=settings.app_version,
            host=headers.get("host"),
            peer=Peer(
                spiffe_id=xfcc.caller_spiffe_id(elements),
                by=elements[-1].by if elements else None,
                xfcc=raw_xfcc,
            ),
            claims=claims,
            tenant_header=headers.get("x-auth-request-tenantid"),
            client_address=identity.client_address(entries),
            forwarded_for=entries,
            external_address=headers.get("x-envoy-external-address"),
            request_id=headers.get("x-request-id"),
        )

    app.include_router(rag.build_router(settings, service, readiness))
    return app


def settings_or_exit() -> Settings:
    """Settings from the environment, or a clear message on stderr and exit status 2."""
    try:
        return Settings.from_env(os.environ)
    except ConfigError as error:
        lines = "\n".join(f"  - {problem}" for problem in error.problems)
        print(f"rag_api: refusing to start, invalid configuration:\n{lines}", file=sys.stderr, flush=True)
        raise SystemExit(CONFIG_ERROR_EXIT) from None


def __getattr__(name: str) -> FastAPI:
    # `uvicorn rag_api.app:app` looks the attribute up; building it lazily lets tests import
    # this module without a tenant in the environment.
    if name == "app":
        app = create_app(settings_or_exit())
        globals()["app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
