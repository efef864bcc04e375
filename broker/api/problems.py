"""The one place broker errors become RFC 9457 problem documents."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker.errors import BrokerError, ClusterUnavailable, RateLimited
from broker.schemas import Problem

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"

_HTTP_TYPES = {
    401: ("unauthenticated", "Missing or invalid credentials"),
    403: ("forbidden", "Not allowed"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    413: ("payload-too-large", "Payload too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
}


def problem(
    status: int,
    type_: str,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = {"type": type_, "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(
        jsonable_encoder(body), status_code=status, media_type=PROBLEM_JSON, headers=headers
    )


def _broker_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BrokerError)
    headers = {}
    if isinstance(exc, ClusterUnavailable | RateLimited):
        headers["Retry-After"] = str(exc.retry_after)
    if exc.status >= 500 and not isinstance(exc, ClusterUnavailable):
        log.error("internal error on %s %s: %s", request.method, request.url.path, exc)
    return problem(exc.status, exc.type, exc.title, exc.detail, headers, **exc.extra)


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "field": ".".join(str(part) for part in err.get("loc", ())),
            "message": str(err.get("msg", "")),
            "type": str(err.get("type", "")),
        }
        for err in exc.errors()
    ]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    return problem(422, "validation-error", "Invalid request", detail, errors=errors)


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    type_, title = _HTTP_TYPES.get(exc.status_code, ("http-error", "HTTP error"))
    return problem(exc.status_code, type_, title, str(exc.detail), dict(exc.headers or {}))


def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem(500, "internal", "Internal error", "the broker failed; see its log")


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problem documents a route may answer with."""
    return {
        status: {
            "model": Problem,
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
            "description": _DESCRIPTIONS.get(status, "Problem"),
        }
        for status in statuses
    }


_DESCRIPTIONS = {
    401: "unauthenticated",
    403: "forbidden",
    404: "not-found",
    409: "quota-exceeded, conflict",
    413: "payload-too-large",
    422: "validation-error, limit-exceeded, idempotency-conflict, submit-rejected",
    429: "rate-limited (Retry-After)",
    503: "cluster-unavailable (Retry-After)",
}
COMMON = (401, 403, 404, 422, 429)


def install(app: FastAPI) -> None:
    app.add_exception_handler(BrokerError, _broker_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)
