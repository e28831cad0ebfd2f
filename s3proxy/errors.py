"""Error types shared by the store, the upstream and the app; app maps them to HTTP once."""

from __future__ import annotations


class S3ProxyError(Exception):
    """Base class; the message is safe to show (no token, credential or secret)."""


class AssetNotFound(S3ProxyError):
    """The object does not exist upstream."""


class ObjectChanged(S3ProxyError):
    """The object's ETag no longer matches what this response started with."""


class UpstreamDenied(S3ProxyError):
    """The upstream refused us (credentials, bucket policy, misconfiguration)."""


class UpstreamUnavailable(S3ProxyError):
    """The upstream could not be reached or answered with a server error."""


class UpstreamTimeout(S3ProxyError):
    """The upstream did not answer within the configured timeouts."""


class UpstreamInvalid(ObjectChanged):
    """An upstream answer that is not what was asked (another ETag or range, a 200 to a
    ranged GET, a wrong length): none of its bytes is used; handled like a change.
    `version_gone`: the answer named another version, so the one asked for is gone."""

    def __init__(self, message: str, version_gone: bool = False) -> None:
        super().__init__(message)
        self.version_gone = version_gone


class RangeBeyondEnd(S3ProxyError):
    """A ranged GET started past the end of the object (it is smaller than thought)."""


class StartupError(Exception):
    """The service can not start (a port in use, say): one line for the operator."""
