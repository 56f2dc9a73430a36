"""Delivering a finished job to its webhook URL: signed, only to public addresses, with bounded retries.

Each delivery carries `Sdserver-Signature: t=<unix seconds>,v1=<hex>`, the HMAC-SHA256 (key: the
`webhook_secret` setting) of `<t>.<body>`, as Stripe signs its webhooks; `verify` is how a receiver
checks it. A URL whose host resolves to a loopback, private, link-local (cloud metadata endpoints
included) or other non-public address is refused, unless `webhook_allowed_hosts` names that host;
the address is checked again at each delivery, on the very address the connection is made to, so a
DNS answer that changes after the check (DNS rebinding) gets nowhere.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpcore

from sdserver.core.errors import InvalidRequest
from sdserver.settings import Settings

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "Sdserver-Signature"
_FAILURES = (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol)


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The signature header's value for `body` sent at `timestamp`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, header: str, body: bytes, *, tolerance_s: float = 300, now: float | None = None) -> bool:
    """For receivers: is `header` a valid signature of `body`, made less than `tolerance_s` ago?"""
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False  # an old delivery replayed
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


class Refused(Exception):
    """The target is not a public address (and not allowed by webhook_allowed_hosts)."""


def _kind(address: str) -> str | None:
    """Why `address` is not a public one (None: it is)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-public"


def resolve_public(host: str, port: int, allowed: Iterable[str]) -> str:
    """The address to connect to for `host`: every address it resolves to must be public, unless the
    host is allowed as written. Raises Refused, or OSError if it does not resolve."""
    if host.lower().strip("[]") in allowed:
        return host.strip("[]")
    infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        if (kind := _kind(address)) is not None:
            raise Refused(f"host {host!r} resolves to {address}, a {kind} address")
    return addresses[0]


class _PublicOnly(httpcore.NetworkBackend):
    """Connects only to the address it has just checked (TLS still verifies the host name)."""

    def __init__(self, allowed: frozenset[str]) -> None:
        self.allowed, self.inner = allowed, httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            address = resolve_public(host, port, self.allowed)
        except (Refused, OSError) as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        return self.inner.connect_tcp(address, port, timeout, local_address, socket_options)

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
        raise httpcore.ConnectError("webhooks go over TCP only")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass(frozen=True)
class WebhookSender:
    secret: str
    allowed_hosts: frozenset[str]
    attempts: int
    timeout_s: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookSender:
        assert settings.webhook_secret is not None  # Settings refuses allow_webhooks without it
        allowed = frozenset(host.lower() for host in settings.webhook_allowed_hosts)
        return cls(settings.webhook_secret, allowed, settings.webhook_attempts)

    def check_target(self, url: str) -> None:
        """At submission: refuse a URL that leads to a non-public address (400 naming webhook_url)."""
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            resolve_public(parts.hostname or "", port, self.allowed_hosts)
        except Refused as exc:
            raise InvalidRequest(
                f"webhook_url: {exc}; webhooks only go to public addresses (or hosts in webhook_allowed_hosts)",
                field="webhook_url",
            ) from None
        except OSError as exc:
            reason = f"cannot resolve {parts.hostname!r} ({exc})"
            raise InvalidRequest(f"webhook_url: {reason}", field="webhook_url") from None

    def deliver(self, url: str, payload: str) -> bool:
        """POST `payload` (JSON text), signed afresh for each attempt; retry with backoff on failure."""
        body = payload.encode()
        timeouts = {"connect": self.timeout_s, "read": self.timeout_s, "write": self.timeout_s, "pool": self.timeout_s}
        with httpcore.ConnectionPool(network_backend=_PublicOnly(self.allowed_hosts)) as pool:
            for attempt in range(1, self.attempts + 1):
                signature = sign(self.secret, body, int(time.time()))
                headers: dict[bytes | str, bytes | str] = {
                    "content-type": "application/json",
                    SIGNATURE_HEADER: signature,
                }
                try:
                    reply = pool.request("POST", url, headers=headers, content=body, extensions={"timeout": timeouts})
                    status = reply.status
                    if status < 300:
                        return True
                    reason = f"HTTP {status}"
                except _FAILURES as exc:  # timeouts, refused or reset connections, a refused address
                    reason = f"{type(exc).__name__}: {exc}"
                log.warning("webhook %s attempt %d/%d failed: %s", url, attempt, self.attempts, reason)
                if attempt < self.attempts:
                    time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
        return False

    def deliver_in_background(self, url: str, payload: str) -> threading.Thread:
        thread = threading.Thread(target=self.deliver, args=(url, payload), name="sdserver-webhook", daemon=True)
        thread.start()
        return thread
