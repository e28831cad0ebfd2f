"""Asset names: validation, the S3 key they map to, and the content type they imply."""

from __future__ import annotations

import mimetypes
import re

MAX_ASSET_BYTES = 1024

_MEDIA_TYPES = {
    ".mp4": "video/mp4",
    ".m4v": "video/mp4",
    ".m4a": "audio/mp4",
    ".mov": "video/quicktime",
    ".ts": "video/mp2t",
    ".mkv": "video/x-matroska",
    ".webm": "video/webm",
    ".mp3": "audio/mpeg",
    ".flv": "video/x-flv",
    ".m3u8": "application/vnd.apple.mpegurl",
    ".dtsh": "application/octet-stream",
}

# What S3 reports when the uploader set no type: treat it as "unknown".
_UNSET_TYPES = {"", "binary/octet-stream"}


class InvalidAssetName(ValueError):
    """The asset name is not acceptable; the message says why (without echoing it)."""


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def validate_asset_name(name: str) -> str:
    """Return the name if it is a safe relative object name, else raise InvalidAssetName.

    The name arrives percent-decoded once (by the router). Rejected: empty, longer than
    1024 bytes, a '.' or '..' segment, an empty segment, a backslash, a control character.
    """
    if not name:
        raise InvalidAssetName("empty asset name")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_ASSET_BYTES:
        raise InvalidAssetName("asset name longer than 1024 bytes")
    if "\\" in name:
        raise InvalidAssetName("backslash in asset name")
    if _CONTROL.search(name):
        raise InvalidAssetName("control character in asset name")
    for segment in name.split("/"):
        if segment == "":
            raise InvalidAssetName("empty segment in asset name")
        if segment in (".", ".."):
            raise InvalidAssetName("dot segment in asset name")
    return name


DTSH_MAGIC = b"DTSC"  # Mist's DTSC header magic, followed by a big-endian payload length


SIDECAR_SUFFIX = ".dtsh"  # Mist's header file: <source URL>.dtsh


def looks_like_dtsh(data: bytes) -> bool:
    """A Mist stream header: the DTSC magic, then a length that fits the data."""
    if len(data) < 8 or data[:4] != DTSH_MAGIC:
        return False
    return 8 + int.from_bytes(data[4:8], "big") <= len(data)


def dtsh_length(data: bytes | bytearray) -> int | None:
    """The whole header's length (8 + its own length field) once `data` holds all of it;
    None while it does not (or it is not a DTSH header at all)."""
    if len(data) < 8 or data[:4] != DTSH_MAGIC:
        return None
    total = 8 + int.from_bytes(data[4:8], "big")
    return total if len(data) >= total else None


def object_key(prefix: str, asset: str) -> str:
    return f"{prefix}{asset}"


def content_type_for(asset: str, upstream_type: str | None) -> str:
    """S3's content type when the uploader set one, else a guess from the extension."""
    if upstream_type and upstream_type.lower() not in _UNSET_TYPES:
        return upstream_type
    dot = asset.rfind(".")
    if dot != -1:
        ext = asset[dot:].lower()
        if ext in _MEDIA_TYPES:
            return _MEDIA_TYPES[ext]
        guessed, _ = mimetypes.guess_type("x" + ext, strict=False)
        if guessed:
            return guessed
    return "application/octet-stream"
