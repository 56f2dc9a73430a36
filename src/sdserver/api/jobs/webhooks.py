"""Delivering a finished job to its webhook URL, with a bounded number of retries."""

from __future__ import annotations

import logging
import threading
import time

import httpx

log = logging.getLogger(__name__)


def deliver_in_background(url: str, payload: str, *, attempts: int, timeout_s: float = 10.0) -> threading.Thread:
    """POST `payload` (JSON text) to `url` from a daemon thread; retry with backoff on failure."""

    def send() -> None:
        for attempt in range(1, attempts + 1):
            try:
                response = httpx.post(
                    url, content=payload, headers={"content-type": "application/json"}, timeout=timeout_s
                )
                if response.status_code < 300:
                    return
                reason = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            log.warning("webhook %s attempt %d/%d failed: %s", url, attempt, attempts, reason)
            if attempt < attempts:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))

    thread = threading.Thread(target=send, name="sdserver-webhook", daemon=True)
    thread.start()
    return thread
