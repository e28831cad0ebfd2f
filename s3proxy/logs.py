"""Logging set-up: one JSON (or text) line per record, one access line per request.

Every line goes through `redact` on its way out, whoever logged it (s3proxy, aiohttp,
botocore): a path token shows as `/t/-/`, and `token=` values, `Authorization` values and
anything shaped like a JWT are removed, wherever they appear. Malformed requests are
reported by `connections` (one warning each, within a `LogBudget`), never by aiohttp.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

ACCESS_LOGGER = "s3proxy.access"

_PATH_TOKEN = re.compile(r"/t/[^/\s\"'\\]+")
_QUERY_TOKEN = re.compile(r"(?i)((?:^|[?&;\s\\\"'])[a-z0-9_-]*token[a-z0-9_-]*=)[^&\s\"'\\]*")
_AUTHORIZATION = re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)[^\"'\r\n\\]*")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"'\\]+")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*")


# what any of the patterns above needs somewhere in a line. Most lines (an access line,
# whose path is already `/t/-/...`) have none of it and skip the five substitutions; the
# check is plain substring search (a case-insensitive regex scan cost 14 us a line).
_WORDS = ("token", "authorization", "bearer", "eyj")
_REDACTED_AT = re.compile(r"/t/-(?:[/\s\"'\\]|$)")


def _may_hold_token(text: str) -> bool:
    lowered = text.lower()
    if any(word in lowered for word in _WORDS):
        return True
    at = lowered.find("/t/")
    while at >= 0:
        if _REDACTED_AT.match(text, at) is None:
            return True
        at = lowered.find("/t/", at + 3)
    return False


def redact(text: str) -> str:
    """The line with every token-bearing part blanked (see the module's doc)."""
    if not _may_hold_token(text):
        return text
    text = _PATH_TOKEN.sub("/t/-", text)
    text = _QUERY_TOKEN.sub(r"\1-", text)
    text = _AUTHORIZATION.sub(r"\1-", text)
    text = _BEARER.sub(r"\1-", text)
    return _JWT.sub("-", text)


def log_fields(logger: logging.Logger, level: int, msg: str, fields: dict[str, object]) -> None:
    """`logger.log(level, msg, extra={"fields": fields})` without the caller look-up (a
    walk up the stack per record, which no line of ours prints): the access line is
    written once per request."""
    if logger.isEnabledFor(level):
        logger.handle(
            logger.makeRecord(logger.name, level, "", 0, msg, (), None, None, {"fields": fields})
        )


_ENCODER = json.JSONEncoder(default=str)  # as json.dumps(..., default=str), built once


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1  # the second `_stamp` is of: strftime once a second, not a line
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        entry: dict[str, Any] = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc_type"] = record.exc_info[0].__name__
            entry["traceback"] = self.formatException(record.exc_info)
        return redact(_ENCODER.encode(entry))


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class TextFormatter(logging.Formatter):
    """One line per record; control characters (a client's NUL, CR or LF among them)
    are written as `\\xNN`, so no client can forge or split a line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return redact(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", line))


class LogBudget:
    """At most `per_second` lines a second (a token bucket): `take()` says whether this
    one goes out and how many were left out since the last that did."""

    def __init__(self, per_second: float = 5.0) -> None:
        self._per_second = per_second
        self._allowance = per_second
        self._checked = time.monotonic()
        self._dropped = 0

    def take(self) -> tuple[bool, int]:
        now = time.monotonic()
        self._allowance = min(
            self._per_second, self._allowance + (now - self._checked) * self._per_second
        )
        self._checked = now
        if self._allowance < 1:
            self._dropped += 1
            return False, 0
        self._allowance -= 1
        dropped, self._dropped = self._dropped, 0
        return True, dropped


def configure_logging(level: str, fmt: str) -> None:
    """Route every s3proxy (and aiohttp) record to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # no line prints a thread's or a process's name: not looked up for every record
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
    # botocore at debug level would log signed request headers.
    logging.getLogger("botocore").setLevel(max(logging.INFO, logging.getLogger().level))
    # "Found credentials in ..." at every start says nothing an operator acts on
    for name in ("botocore.credentials", "aiobotocore.credentials"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
