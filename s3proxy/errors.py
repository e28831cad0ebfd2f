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
