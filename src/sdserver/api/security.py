"""API keys (Bearer) and HTTP Basic credentials, checked in constant time, and which routes are open."""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import re

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from sdserver.api import errors
from sdserver.core.errors import Unauthorized
from sdserver.settings import Settings

log = logging.getLogger(__name__)
ALWAYS_OPEN = frozenset({"/ping", "/health", "/ready"})
# Pages a browser opens before it can send a key (the studio then asks for one), and the API docs.
PUBLIC_PAGES = frozenset({"/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
PUBLIC_PREFIXES = ("/studio/", "/static-offline-docs/")
# The original API: its clients (the Photoshop plugin) cannot send credentials.
_ORIGINAL_API = re.compile(r"^/(custom_models|txt2img|img2img|masking|custom/.+)$")
_LOOPBACK = ("127.", "::1", "localhost")


def _matches(candidate: str, secrets: list[str]) -> bool:
    """Constant-time against every secret (no early exit that leaks which one matched)."""
    found = False
    for secret in secrets:
        found |= hmac.compare_digest(candidate.encode(), secret.encode())
    return found


class ApiKeyAuth:
    """Every route but /ping, /health, /ready and the pages (the studio, the API docs) needs
    `Authorization: Bearer KEY` (or Basic user:pass when --api-auth is set) once keys are configured;
    `open_original_api` exempts the original routes."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings

    def is_open(self, path: str) -> bool:
        if not self.settings.auth_enabled or path in ALWAYS_OPEN or path in PUBLIC_PAGES:
            return True
        if path.startswith(PUBLIC_PREFIXES):
            return True
        return self.settings.open_original_api and bool(_ORIGINAL_API.match(path))

    def authorised(self, header: str) -> bool:
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and self.settings.api_keys:
            return _matches(credentials.strip(), self.settings.api_keys)
        if scheme.lower() == "basic" and self.settings.api_auth:
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return False
            return _matches(decoded, self.settings.api_auth)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or self.is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if self.authorised(header):
            await self.app(scope, receive, send)
            return
        reason = "missing" if not header else "wrong"
        response = errors.render(Request(scope), Unauthorized(f"authorization: {reason} API key"))
        challenges = ['Bearer realm="sdserver"'] + (['Basic realm="sdserver"'] if self.settings.api_auth else [])
        response.headers["WWW-Authenticate"] = ", ".join(challenges)
        await response(scope, receive, send)


def warn_if_exposed(settings: Settings) -> None:
    if settings.host.startswith(_LOOPBACK):
        return
    if not settings.auth_enabled:
        log.warning(
            "listening on %s with no API key: anyone who can reach this port can use the GPU. "
            "Fine on a trusted LAN (as the original server was used); otherwise set --api-key.",
            settings.host,
        )
    elif settings.open_original_api:
        log.warning("the original API's routes are open to anyone on the network (--open-original-api)")
