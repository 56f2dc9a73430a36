"""`response_format=url`: images served from memory under unguessable, expiring URLs.

Each image gets a random 256-bit token; it is deleted at its expiry (a timer on the event loop), and
the oldest go first if the store would grow past its byte budget. Nothing touches the disk.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from sdserver.core.errors import NotFound


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    media_type: str
    expires_at: float  # time.monotonic()


class ImageUrlStore:
    def __init__(self, *, ttl_s: float, max_bytes: int) -> None:
        self.ttl_s, self.max_bytes = ttl_s, max_bytes
        self._images: OrderedDict[str, StoredImage] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, media_type: str) -> str:
        """Keep `data` for ttl_s seconds; return its token. Call from the event loop."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._images[token] = StoredImage(data, media_type, time.monotonic() + self.ttl_s)
            self._bytes += len(data)
            while self._bytes > self.max_bytes and len(self._images) > 1:
                self._drop(next(iter(self._images)))
        asyncio.get_running_loop().call_later(self.ttl_s, self.discard, token)
        return token

    def get(self, token: str) -> StoredImage:
        with self._lock:
            stored = self._images.get(token)
            if stored is not None and stored.expires_at <= time.monotonic():
                self._drop(token)
                stored = None
        if stored is None:
            raise NotFound("this image URL is unknown or has expired")
        return stored

    def discard(self, token: str) -> None:
        with self._lock:
            self._drop(token)

    def _drop(self, token: str) -> None:
        stored = self._images.pop(token, None)
        if stored is not None:
            self._bytes -= len(stored.data)

    def __len__(self) -> int:
        return len(self._images)
