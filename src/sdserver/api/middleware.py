"""ASGI middleware: request ids and one structured log line per request, the body size limit, and the
content security policy of the HTML pages."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import uuid
from contextvars import ContextVar
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sdserver.api import errors
from sdserver.core.errors import PayloadTooLarge
from sdserver.service.metrics import Metrics

log = logging.getLogger("sdserver.access")
_INCOMING_ID = re.compile(r"^[\w.-]{1,64}$")
_request_fields: ContextVar[dict[str, Any] | None] = ContextVar("sdserver_request_fields", default=None)


def note(**fields: Any) -> None:
    """Add fields (model, size, steps, queue wait, run time...) to the current request's log line."""
    current = _request_fields.get()
    if current is not None:
        current.update(fields)


class RequestLog:
    """Tags each request with an id (X-Request-ID, echoed back), counts it, and logs one JSON line."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _INCOMING_ID.match(incoming) else uuid.uuid4().hex
        fields: dict[str, Any] = {"id": request_id, "method": scope["method"], "path": scope["path"]}
        token = _request_fields.set(fields)
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                fields["status"] = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _request_fields.reset(token)
            route = getattr(scope.get("route"), "path", "unmatched")
            status = fields.setdefault("status", 500)
            fields["duration_s"] = round(time.perf_counter() - started, 4)
            self.metrics.requests.labels(route=route, method=scope["method"], status=str(status)).inc()
            log.info(json.dumps(fields, default=str))


class BodySizeLimit:
    """Refuse bodies over `max_bytes` with 413: at once when Content-Length says so, and while
    streaming otherwise (chunked), so an oversized body is never read into memory whole.

    While streaming, the limit is hit inside whatever is reading the body (FastAPI's JSON or form
    parser, python-multipart, our own readers), and each reports it its own way (a 400, a 422, a
    parse error). So the error is also remembered here: once the limit was hit, the response is our
    413 whatever the route answered or raised. A route that refuses a request without reading its
    body (a wrong content type, say) has the rest of the body counted before its error goes out, so
    an oversized body is a 413 there too.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _error(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"body: the request is over the limit of {self.max_bytes / 1e6:g} MB", field="body")

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = errors.render(Request(scope), self._error())
        response.headers["connection"] = "close"
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received, over, done, started = 0, False, False, False

        async def limited_receive() -> Message:
            nonlocal received, over, done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if received > self.max_bytes:
                    over = True
                    raise self._error()
            return message

        async def checked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and message["status"] >= 400 and not (over or done):
                with contextlib.suppress(PayloadTooLarge):  # an error before the body was read: count the rest
                    while not done and (await limited_receive())["type"] == "http.request":
                        pass
            if over:  # whatever the route made of it, the answer is the 413
                if not started:
                    started = True
                    await self._refuse(scope, receive, send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, checked_send)
        except Exception:
            if not over or started:
                raise
            started = True
            await self._refuse(scope, receive, send)


class PagePolicy:
    """Sends a Content-Security-Policy with each page named, so the browser itself refuses to load
    anything from another host (ReDoc's bundle, for one, asks for a logo from its CDN)."""

    def __init__(self, app: ASGIApp, policies: dict[str, str]) -> None:
        self.app = app
        self.policies = {path: policy.encode() for path, policy in policies.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        policy = self.policies.get(scope["path"]) if scope["type"] == "http" else None
        if policy is None:
            await self.app(scope, receive, send)
            return

        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                headers += [(b"content-security-policy", policy), (b"x-content-type-options", b"nosniff")]
            await send(message)

        await self.app(scope, receive, send_with_policy)
