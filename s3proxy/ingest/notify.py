"""Telling the control plane: signed webhooks (`asset.ready`, `asset.failed`), retried
with back-off, and warm-up calls to the pool's admin endpoints.

The signature is HMAC-SHA256 over the exact body bytes, hex, in
`X-S3Proxy-Signature: sha256=<hex>`. Each event carries an `id` that stays the same on
every attempt (and for the same upload's same outcome), so a receiver that sees it twice
can drop the second.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Sequence
from urllib.parse import quote

import aiohttp

log = logging.getLogger("s3proxy.ingest")

SIGNATURE_HEADER = "X-S3Proxy-Signature"
EVENT_HEADER = "X-S3Proxy-Event"
DELIVERY_HEADER = "X-S3Proxy-Delivery"
_RETRIED = {408, 425, 429}  # and every 5xx


def sign(body: bytes, secret: str) -> str:
    """The signature header's value for a body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, header: str, secret: str) -> bool:
    """What a receiver does (constant-time compare)."""
    return hmac.compare_digest(sign(body, secret), header)


def backoff_s(attempt: int, base_s: float, cap_s: float = 60.0) -> float:
    """Seconds to wait after the `attempt`-th failure (1, 2, ...): doubling, capped."""
    return float(min(cap_s, base_s * 2 ** (attempt - 1)))


class Notifier:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str | None,
        secret: str | None,
        attempts: int,
        backoff_base_s: float,
        timeout_s: float,
    ) -> None:
        self._session = session
        self._url = url
        self._secret = secret
        self._attempts = attempts
        self._base_s = backoff_base_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def send(self, kind: str, event_id: str, body: bytes) -> str:
        """Deliver one event: `delivered`, `failed` (every attempt used, or a 4xx that a
        retry would not change) or `off` (no notify_url)."""
        if self._url is None:
            return "off"
        headers = {
            "Content-Type": "application/json",
            EVENT_HEADER: kind,
            DELIVERY_HEADER: event_id,
        }
        if self._secret:
            headers[SIGNATURE_HEADER] = sign(body, self._secret)
        why = ""
        for attempt in range(1, self._attempts + 1):
            try:
                async with self._session.post(
                    self._url, data=body, headers=headers, timeout=self._timeout
                ) as response:
                    await response.read()
                    if response.status < 300:
                        return "delivered"
                    why = f"HTTP {response.status}"
                    if response.status < 500 and response.status not in _RETRIED:
                        break
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                why = type(exc).__name__
            if attempt < self._attempts:
                await asyncio.sleep(backoff_s(attempt, self._base_s))
        log.error(
            "webhook not delivered",
            extra={"fields": {"event": kind, "id": event_id, "attempts": attempt, "why": why}},
        )
        return "failed"


async def warm(
    session: aiohttp.ClientSession, urls: Sequence[str], asset: str, token: str | None
) -> dict[str, str]:
    """POST /warm/<asset> on each admin endpoint, side by side: url -> outcome."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def one(base: str) -> str:
        try:
            async with session.post(
                f"{base.rstrip('/')}/warm/{quote(asset)}",
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=120),
            ) as response:
                await response.read()
                return "ok" if response.status < 300 else f"HTTP {response.status}"
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return type(exc).__name__

    results = await asyncio.gather(*(one(url) for url in urls))
    return dict(zip(urls, results, strict=True))
