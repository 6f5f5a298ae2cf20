"""HTTP routes of the RAG service: ``POST /rag`` and ``GET /sessions/{session_id}``.

Bad input is always a 4xx that says what is wrong: the body's size is checked before it is
parsed (Content-Length and the bytes actually received), its type before its syntax, its
syntax before its fields. Identity comes from the headers the sidecar writes (see
``rag_api.identity``) and must name this service's tenant twice: in the verified token and in
``x-auth-request-tenantid``.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, NoReturn

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rag_api import identity
from rag_api.config import Settings
from rag_api.llm import ModelError
from rag_api.readiness import Readiness
from rag_api.service import NotAllowed, NotReady, RagService
from rag_api.sessions import SessionStoreUnavailable, TurnTaken

MAX_BODY_BYTES = 16 * 1024
SESSION_ID = r"^[A-Za-z0-9_-]{8,128}$"
RETRY_AFTER_SECONDS = 2
TENANT_HEADER = "x-auth-request-tenantid"
_DIGITS = re.compile(r"^[0-9]+$")


class RagRequest(BaseModel):
    # strict: "3" is not a top_k and 1 is not a question; unknown fields are refused, not ignored.
    model_config = ConfigDict(extra="forbid", strict=True)

    question: str = Field(min_length=1, max_length=2000)
    session_id: str = Field(pattern=SESSION_ID)
    llm_model: str | None = Field(default=None, min_length=1, max_length=2048)
    embedding_model: str | None = Field(default=None, min_length=1, max_length=128)
    top_k: int | None = Field(default=None, ge=1, le=10)

    @field_validator("question")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # JSON can carry a lone surrogate ("\ud800"); nothing downstream can encode it.
            raise ValueError("must be valid Unicode (it contains a lone surrogate)") from None
        return value


class Source(BaseModel):
    document: str
    chunk: int
    score: float
    text: str


class RagAnswer(BaseModel):
    tenant: str
    session_id: str
    turn: int
    answer: str
    sources: list[Source]
    llm_model: str
    embedding_model: str
    history_turns: int


class SessionTurn(BaseModel):
    turn: int
    question: str
    answer: str
    sources: list[str]
    llm_model: str
    created: str


class SessionTurns(BaseModel):
    tenant: str
    session_id: str
    turns: list[SessionTurn]


def _unauthorized(detail: str) -> NoReturn:
    raise HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


def caller(request: Request, tenant: str) -> str:
    """The verified ``sub`` of the caller, after checking both tenant statements (401/403)."""
    payloads = request.headers.getlist("x-jwt-payload")
    if not payloads:
        _unauthorized("no verified identity: x-jwt-payload (written by the sidecar's jwt_authn) is missing")
    if len(payloads) > 1:
        _unauthorized(f"x-jwt-payload appears {len(payloads)} times; expected once")
    try:
        claims = identity.decode_jwt_payload(payloads[0])
    except identity.HeaderError as error:
        _unauthorized(str(error))
    claimed = claims.get("custom:tenantid")
    if claimed is None:
        _unauthorized("the token has no custom:tenantid claim")
    if claimed != tenant:
        raise HTTPException(403, f"the token's custom:tenantid {claimed!r} is not this service's tenant {tenant!r}")
    headers = request.headers.getlist(TENANT_HEADER)
    if not headers:
        _unauthorized(f"{TENANT_HEADER} is missing")
    for value in headers:
        if value.strip() != tenant:
            raise HTTPException(403, f"{TENANT_HEADER} {value!r} is not this service's tenant {tenant!r}")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub.strip() or len(sub) > 256:
        _unauthorized("the token has no usable sub claim (the session owner)")
    return sub


async def read_json(request: Request) -> Any:
    """The JSON body, refusing a wrong type (415), an oversize body (413) or bad JSON (400)."""
    content_type = request.headers.get("content-type", "")
    media, _, params = content_type.partition(";")
    charset = params.strip().lower().removeprefix("charset=").strip('"') if params.strip() else "utf-8"
    if media.strip().lower() != "application/json" or charset != "utf-8":
        raise HTTPException(415, f"Content-Type must be application/json (UTF-8), not {content_type or 'missing'!r}")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not _DIGITS.match(declared.strip()):
            raise HTTPException(400, f"Content-Length {declared!r} is not a number")
        # Compared as text first: int() refuses strings of thousands of digits.
        size = declared.strip().lstrip("0")
        if len(size) > 9 or int(size or "0") > MAX_BODY_BYTES:
            raise HTTPException(413, f"the body is {size} bytes; at most {MAX_BODY_BYTES} are accepted")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"the body is over {MAX_BODY_BYTES} bytes; at most {MAX_BODY_BYTES} are accepted")
    try:
        data = json.loads(bytes(body).decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as error:
        raise HTTPException(400, f"the body is not UTF-8: {error}") from None
    except ValueError as error:
        raise HTTPException(400, f"the body is not valid JSON: {error}") from None
    except RecursionError:
        raise HTTPException(400, "the body is not valid JSON: nested too deeply") from None
    try:
        # "\ud800" is valid JSON but no Unicode text: nothing, not even an error message
        # that quotes it, could be encoded as UTF-8 later.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise HTTPException(400, "the body contains a lone surrogate escape (\\uD800-\\uDFFF), not text") from None
    return data


def _refuse_constant(name: str) -> NoReturn:
    # Python's json accepts NaN and Infinity; JSON does not, and neither can a reply quote them.
    raise ValueError(f"{name} is not JSON")


def _validation_errors(error: ValidationError) -> list[dict[str, Any]]:
    errors = []
    for item in error.errors(include_url=False):
        if "ctx" in item:  # may hold the exception object, which JSON cannot carry
            item["ctx"] = {key: str(value) for key, value in item["ctx"].items()}
        item["loc"] = ("body", *item["loc"])
        errors.append(item)
    return errors


def _unavailable(detail: str) -> HTTPException:
    return HTTPException(503, detail, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def build_router(settings: Settings, service: RagService, readiness: Readiness) -> APIRouter:
    router = APIRouter()
    tenant = settings.tenant_id
    body_schema = {"content": {"application/json": {"schema": RagRequest.model_json_schema()}}, "required": True}

    @router.post(
        "/rag",
        openapi_extra={"requestBody": body_schema},
        responses={
            400: {"description": "malformed JSON, or a model the tenant may not use"},
            401: {"description": "no verified identity"},
            403: {"description": "the identity names another tenant"},
            413: {"description": f"body over {MAX_BODY_BYTES} bytes"},
            415: {"description": "not application/json"},
            502: {"description": "the model call failed"},
            503: {"description": "not ready, or the session store is unavailable (see Retry-After)"},
        },
    )
    async def rag(request: Request) -> RagAnswer:
        owner = caller(request, tenant)
        data = await read_json(request)
        try:
            asked = RagRequest.model_validate(data)
        except ValidationError as error:
            raise RequestValidationError(_validation_errors(error)) from None
        try:
            llm_model, embedding_model = service.resolve(asked.llm_model, asked.embedding_model)
        except NotAllowed as error:
            raise HTTPException(400, str(error)) from None
        if not service.state.loaded.is_set():
            pending = "; ".join(f"{name}: {reason}" for name, reason in readiness.pending().items())
            raise _unavailable(f"not ready: {pending or 'the index is not loaded'}")
        try:
            answer = await run_in_threadpool(
                service.ask, owner, asked.session_id, asked.question,
                llm_model=llm_model, embedding_model=embedding_model, top_k=asked.top_k,
            )
        except NotReady as error:
            raise _unavailable(f"not ready: {error}") from None
        except SessionStoreUnavailable as error:
            raise _unavailable(f"session store unavailable: {error}") from None
        except ModelError as error:
            raise HTTPException(502, str(error)) from None
        except TurnTaken as error:
            raise HTTPException(409, f"{error}: other requests of this session keep storing turns; retry") from None
        return RagAnswer.model_validate(answer)

    @router.get(
        "/sessions/{session_id}",
        responses={
            401: {"description": "no verified identity"},
            403: {"description": "the identity names another tenant"},
            503: {"description": "the session store is unavailable (see Retry-After)"},
        },
    )
    async def session(request: Request, session_id: Annotated[str, Path(pattern=SESSION_ID)]) -> SessionTurns:
        owner = caller(request, tenant)
        try:
            found = await run_in_threadpool(service.session, owner, session_id)
        except SessionStoreUnavailable as error:
            raise _unavailable(f"session store unavailable: {error}") from None
        return SessionTurns.model_validate(found)

    return router
