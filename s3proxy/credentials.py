"""S3 credentials kept fresh in the background: a read waits on the credential chain
only when the credentials it holds have expired.

botocore refreshes temporary credentials (container role, instance profile, assumed
role) inline: the first request within 15 minutes of expiry fetches new ones while it
waits, and after a failed fetch the next request tries again. With a failing or hanging
endpoint every such request waits seconds though the credentials still work. Here the
inline refresh is left for expired credentials only, and a task refreshes ahead of
expiry, retrying a failing endpoint with back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiobotocore._helpers import resolve_awaitable
from aiobotocore.credentials import AioRefreshableCredentials
from aiobotocore.session import AioSession

log = logging.getLogger("s3proxy.credentials")

AHEAD_S = 15 * 60  # refresh this long before expiry (botocore's advisory window) ...
AHEAD_FRACTION = 0.5  # ... or after half the lifetime, for credentials that live shorter
ATTEMPT_TIMEOUT_S = 10.0  # one fetch from the credential endpoint, at most
RETRY_MIN_S, RETRY_MAX_S = 1.0, 60.0


def refresh_delay(
    now: float, expiry: float, issued: float, failures: int, ahead_s: float = AHEAD_S
) -> float:
    """Seconds until the next refresh attempt: ahead of expiry by the advisory window or
    half the credentials' lifetime, whichever is shorter; after failures, a back-off that
    doubles from RETRY_MIN_S to RETRY_MAX_S (kept short of expiry when it can be)."""
    if failures:
        backoff = min(RETRY_MAX_S, RETRY_MIN_S * 2 ** (failures - 1))
        return float(max(RETRY_MIN_S, min(backoff, (expiry - now) / 2)))
    ahead = min(ahead_s, max(0.0, expiry - issued) * AHEAD_FRACTION)
    return max(0.0, expiry - ahead - now)


class CredentialKeeper:
    """Owns the refresh of one session's temporary credentials (none for static keys)."""

    def __init__(self, credentials: AioRefreshableCredentials) -> None:
        self._credentials = credentials
        # inline refreshes by requests: only once expired (then they must wait)
        credentials._advisory_refresh_timeout = 0
        credentials._mandatory_refresh_timeout = 0
        self._issued = time.time()
        self._task: asyncio.Task[None] | None = None
        self.refreshes = 0
        self.failures = 0

    @classmethod
    async def start(cls, session: AioSession) -> CredentialKeeper | None:
        credentials = await session.get_credentials()
        if not isinstance(credentials, AioRefreshableCredentials):
            return None  # static keys (or none): nothing expires
        keeper = cls(credentials)
        keeper._task = asyncio.ensure_future(keeper._run())
        return keeper

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _expiry(self) -> float | None:
        expiry: Any = self._credentials._expiry_time
        return None if expiry is None else float(expiry.timestamp())

    async def _run(self) -> None:
        failures = 0
        while True:
            expiry = self._expiry()
            if expiry is None:
                await asyncio.sleep(RETRY_MAX_S)  # deferred: the first request fetches
                continue
            await asyncio.sleep(refresh_delay(time.time(), expiry, self._issued, failures))
            try:
                await asyncio.wait_for(self._refresh(), ATTEMPT_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the endpoint failed or hung: the held keys serve on
                failures += 1
                self.failures += 1
                remaining = (self._expiry() or time.time()) - time.time()
                log.warning(
                    "refreshing S3 credentials failed; the current ones are used meanwhile",
                    extra={
                        "fields": {
                            "error": type(exc).__name__,
                            "expires_in_s": round(remaining, 1),
                            "failures": failures,
                        }
                    },
                )
                continue
            failures = 0
            self.refreshes += 1

    async def _refresh(self) -> None:
        credentials = self._credentials
        async with credentials._refresh_lock:
            metadata = await resolve_awaitable(credentials._refresh_using())
            credentials._set_from_data(metadata)
            credentials._publish_refresh()
        self._issued = time.time()
