"""Who is calling: API keys (Bearer) and HTTP Basic credentials, checked in constant time, each key a
named tenant; which routes are open; and which Host names the server answers to.

A key is `name:secret` or a bare `secret` (named `key-` and the first 8 hex digits of its sha256, so
the name is stable and does not reveal the key). Jobs belong to the key that made them. The admin
key (`--admin-key`) sees every job and is the only one that may load, unload or rescan models and
change AUTOMATIC1111's options. With no key configured there is one trusted user, who may do all.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import re
import socket
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends
from starlette.requests import HTTPConnection, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from sdserver.api import errors
from sdserver.core.errors import Forbidden, InvalidRequest, Unauthorized
from sdserver.settings import Settings, split_key

log = logging.getLogger(__name__)
ALWAYS_OPEN = frozenset({"/ping", "/health", "/ready"})
# Pages a browser opens before it can send a key (the studio then asks for one), and the API docs.
PUBLIC_PAGES = frozenset({"/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
PUBLIC_PREFIXES = ("/studio/", "/static-offline-docs/")
# The original API: its clients (the Photoshop plugin) cannot send credentials.
_ORIGINAL_API = re.compile(r"^/(custom_models|txt2img|img2img|masking|custom/.+)$")
_LOOPBACK = ("127.", "::1", "localhost")
_SCOPE_KEY = "sdserver.principal"


@dataclass(frozen=True)
class Principal:
    """The caller. `name`: the key's name, which owns the jobs it makes (None: anonymous)."""

    name: str | None
    admin: bool
    authenticated: bool = False

    def owns(self, owner: str | None) -> bool:
        """May see and cancel what `owner` made: its own things, or everything for the admin."""
        return self.admin or owner == self.name

    def require_admin(self, action: str) -> None:
        if not self.admin:
            raise Forbidden(f"authorization: only the admin key may {action}")


TRUSTED_USER = Principal(None, admin=True)  # no keys configured: whoever can reach the port
ANONYMOUS = Principal(None, admin=False)  # an open route on a server with keys


def key_name(entry: str) -> tuple[str, str]:
    """(name, secret) of a configured key: `name:secret`, or a bare secret named after its hash."""
    name, secret = split_key(entry)
    return (name or "key-" + hashlib.sha256(secret.encode()).hexdigest()[:8]), secret


class KeyRing:
    """Every configured credential, each with the principal it stands for."""

    def __init__(self, settings: Settings) -> None:
        self.bearer: list[tuple[str, Principal]] = []
        for entry in settings.api_keys:
            name, secret = key_name(entry)
            self.bearer.append((secret, Principal(name, admin=False, authenticated=True)))
        for entry in settings.admin_keys:
            admin_name, secret = split_key(entry)
            self.bearer.append((secret, Principal(admin_name or "admin", admin=True, authenticated=True)))
        self.basic = [
            (pair, Principal(pair.split(":", 1)[0], admin=False, authenticated=True)) for pair in settings.api_auth
        ]

    def find(self, header: str) -> Principal | None:
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer":
            return _match(credentials.strip(), self.bearer)
        if scheme.lower() == "basic" and self.basic:
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return None
            return _match(decoded, self.basic)
        return None


def _match(candidate: str, secrets: list[tuple[str, Principal]]) -> Principal | None:
    """Constant-time against every secret (no early exit that leaks which one matched)."""
    found = None
    for secret, principal in secrets:
        if hmac.compare_digest(candidate.encode(), secret.encode()):
            found = principal
    return found if candidate else None


class ApiKeyAuth:
    """Every route but /ping, /health, /ready and the pages (the studio, the API docs) needs
    `Authorization: Bearer KEY` (or Basic user:pass when --api-auth is set) once keys are configured;
    `open_original_api` exempts the original routes. The caller's Principal is left in the scope for
    the routes."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings
        self.keys = KeyRing(settings)

    def is_open(self, path: str) -> bool:
        if path in ALWAYS_OPEN or path in PUBLIC_PAGES or path.startswith(PUBLIC_PREFIXES):
            return True
        return self.settings.open_original_api and bool(_ORIGINAL_API.match(path))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if not self.settings.auth_enabled:
            scope[_SCOPE_KEY] = TRUSTED_USER
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        principal = self.keys.find(header) if header else None
        if principal is not None or scope.get("method") == "OPTIONS" or self.is_open(scope["path"]):
            scope[_SCOPE_KEY] = principal or ANONYMOUS
            await self.app(scope, receive, send)
            return
        reason = "missing" if not header else "wrong"
        response = errors.render(Request(scope), Unauthorized(f"authorization: {reason} API key"))
        challenges = ['Bearer realm="sdserver"'] + (['Basic realm="sdserver"'] if self.settings.api_auth else [])
        response.headers["WWW-Authenticate"] = ", ".join(challenges)
        await response(scope, receive, send)


def _principal(connection: HTTPConnection) -> Principal:
    principal: Principal = connection.scope.get(_SCOPE_KEY, TRUSTED_USER)
    return principal


PrincipalDep = Annotated[Principal, Depends(_principal)]


def principal_of(scope: Scope) -> Principal:
    principal: Principal = scope.get(_SCOPE_KEY, TRUSTED_USER)
    return principal


def is_loopback(host: str) -> bool:
    return host.startswith(_LOOPBACK)


class HostCheck:
    """When listening beyond localhost: answer only to Host names we know (any IP address, localhost,
    this machine's names, --public-url's host, --allowed-host), so a web page that rebinds its own
    DNS name to this server's address (DNS rebinding) is refused. Starlette's TrustedHostMiddleware
    does the same for a fixed list; here any IP literal is also allowed, as a LAN server is mostly
    reached by its address, which no rebinding page can send as its Host."""

    def __init__(self, app: ASGIApp, allowed: set[str]) -> None:
        self.app, self.allowed = app, {name.lower() for name in allowed}

    @classmethod
    def names_for(cls, settings: Settings) -> set[str]:
        names = {"localhost", *settings.allowed_hosts}
        hostname = socket.gethostname().lower()  # (not getfqdn: a reverse DNS lookup may hang offline)
        names |= {hostname, hostname.split(".")[0], f"{hostname.split('.')[0]}.local"}
        if settings.public_url:
            names.add(urlsplit(settings.public_url).hostname or "")
        return names - {""}

    def allows(self, host_header: str) -> bool:
        if not host_header or "*" in self.allowed:
            return True
        host = host_header[1:].partition("]")[0] if host_header.startswith("[") else host_header.rsplit(":", 1)[0]
        host = host.rstrip(".").lower()
        try:
            ipaddress.ip_address(host)
            return True
        except ValueError:
            pass
        return host in self.allowed or any(name.startswith("*.") and host.endswith(name[1:]) for name in self.allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if self.allows(host):
            await self.app(scope, receive, send)
            return
        reason = f"{host!r} is not a name this server answers to; add it with --allowed-host"
        response = errors.render(Request(scope), InvalidRequest(f"host: {reason}", field="host"))
        await response(scope, receive, send)


def warn_if_exposed(settings: Settings) -> None:
    if is_loopback(settings.host):
        return
    if not settings.auth_enabled:
        log.warning(
            "listening on %s with no API key: anyone who can reach this port can use the GPU. "
            "Fine on a trusted LAN (as the original server was used); otherwise set --api-key.",
            settings.host,
        )
    elif settings.open_original_api:
        log.warning("the original API's routes are open to anyone on the network (--open-original-api)")
