"""The FastAPI application and the uvicorn runner behind `zipmoe serve`.

create_app(service) wires routes, the optional API key and OpenAI-style error bodies; the service's
engine thread starts and stops with the app. Every failure a client can cause is a 4xx JSON error
and the server keeps serving.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from zipmoe.generation import ModelHandle
from zipmoe.serve.routes import APIError, router
from zipmoe.serve.service import GenerationService

log = logging.getLogger("zipmoe.serve")

OPEN_PATHS = frozenset({"/health", "/metrics"})  # reachable without the API key (probes, scrapers)


def create_app(service: GenerationService, api_key: str | None = None) -> FastAPI:
    """An app serving service.handle's model; requests to /v1/* need `Authorization: Bearer api_key`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="zipmoe", lifespan=lifespan)
    app.state.service = service
    app.state.created = int(time.time())
    app.include_router(router)

    if api_key:
        app.add_middleware(_RequireKey, api_key=api_key)
    _add_error_handlers(app)
    return app


class _RequireKey:
    """Pure ASGI middleware (BaseHTTPMiddleware would hide client disconnects from the routes)."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            auth = dict(scope.get("headers", ())).get(b"authorization", b"")
            given = auth[7:] if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.key):
                message = ("Incorrect or missing API key: send 'Authorization: Bearer <key>' with the key "
                           "given to 'zipmoe serve --api-key'")
                await APIError(401, message, code="invalid_api_key").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            why = first.get("ctx", {}).get("error", "parse error")
            return APIError(400, f"The request body is not valid JSON: {why}", code="invalid_json").response()
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: "
                            f"{e.get('msg', 'invalid')}" for e in errors[:5])
        return APIError(400, f"Invalid request: {message}", param, "invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"internal error: {exc}", type="server_error").response()


def run_server(handle: ModelHandle, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               max_running: int = 16, log_level: str = "info") -> None:
    """Serve until interrupted (blocks). Binds loopback unless host says otherwise."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model", host)
    service = GenerationService(handle, max_running=max_running)
    uvicorn.run(create_app(service, api_key), host=host, port=port, log_level=log_level)
