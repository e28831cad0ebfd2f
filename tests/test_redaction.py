"""One redaction path for every log line: no token in any line, whoever logged it, for
any request, routable or not, well-formed or not."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from s3proxy.app import _bounded
from s3proxy.logs import LogBudget, TextFormatter, redact

from .conftest import SUITE_LOGS, Emulator, SuiteLogs, make_token
from .test_serve import serve_process

b64url = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
    min_size=8,
    max_size=40,
)
# the fixed words of the lines below: a "token" that is part of one proves nothing
WORDS = "GET /t/ movies a.mp4 HTTP/1.1 /vod/ token= x=1 access_token Authorization Bearer"
tokens = st.one_of(
    st.tuples(b64url, b64url, b64url).map(lambda p: "eyJ" + ".".join(p)), b64url
).filter(lambda t: t.lower() not in WORDS.lower())


@settings(max_examples=300, deadline=None)
@given(tokens)
def test_no_token_survives_redaction_wherever_it_appears(token: str) -> None:
    lines = [
        f"GET /t/{token}/movies/a.mp4 HTTP/1.1",
        f"GET /t/{token} HTTP/1.1",
        f"/t/{token}/",
        f"/vod/a.mp4?token={token}&x=1",
        f"/vod/a?access_token={token}",
        f"Authorization: Bearer {token}",
        f"authorization: {token}",
        json.dumps({"path": f"/t/{token}/x", "headers": {"Authorization": f"Bearer {token}"}}),
        repr(f"GET /vod/a?token={token} HTTP/1.1\r\nAuthorization: Bearer {token}\r\n".encode()),
    ]
    for line in lines:
        assert token not in redact(line), line


def test_redaction_keeps_what_operators_need() -> None:
    assert redact("GET /t/abc.def.ghi/movies/a.mp4 206") == "GET /t/-/movies/a.mp4 206"
    assert redact("/vod/movies/a.mp4?token=abc&start=1") == "/vod/movies/a.mp4?token=-&start=1"
    assert redact("tokens were refused: 3") == "tokens were refused: 3"


def test_the_log_budget_lets_a_few_lines_a_second_out_and_counts_the_rest() -> None:
    budget = LogBudget(per_second=2)
    assert budget.take() == (True, 0)
    burst = [budget.take() for _ in range(5)]
    assert burst.count((True, 0)) <= 1 and burst[-1] == (False, 0)
    time.sleep(0.6)
    allowed, dropped = budget.take()
    assert allowed and dropped >= 4


def send(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        sock.settimeout(2)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except OSError:
            pass
        return received


def test_no_log_line_of_a_running_proxy_holds_a_token(
    emulator: Emulator, bucket: str, tmp_path: Path
) -> None:
    token = make_token("**")
    with serve_process(emulator, bucket, tmp_path, 1, {}) as served:
        attacks = [
            f"GET /t/{token} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            f"GET /t/{token}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            f"GET /t/{token}/a.mp4 HTTP/1.1\nHost: x\n\n",  # bare LF
            f"GET /vod/a.mp4 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n"
            f"Authorization: Bearer {token}\r\n\r\n",  # obs-fold
            f"GET /t/{token}/a.mp4 HTTP/1.1\r\nHost: x\r\nX-A: \x00\r\n\r\n",  # NUL
            f"BREW /t/{token}/a.mp4 HTTP/1.1\r\nHost: x\r\n\r\n",  # unknown method
            f"GET /vod/a.mp4?token={token}&{'x' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n",
        ]
        for attack in attacks:
            send(served.port, attack.encode("latin-1"))
        send(served.port, f"GET /t/{token}/\xff HTTP/1.1\r\nHost: x\r\n\r\n".encode("latin-1"))
        served.process.terminate()
        _, rest = served.process.communicate(timeout=30)
    lines = [json.dumps(r) for r in served.lines] + rest.splitlines()
    SUITE_LOGS.keep(rest)
    signature = token.split(".")[2]
    assert not [line for line in lines if signature in line or token in line]
    assert not [line for line in lines if "Traceback" in line]
    assert any('"malformed request"' in line for line in lines)


@settings(max_examples=2000, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "/t/",
                "/t/-",
                "/t/-/",
                "-",
                "/",
                " ",
                '"',
                "\\",
                "token",
                "ToKeN=",
                "Bearer ",
                "authorization: ",
                "eyJ",
                "abc.def.",
                "x",
                "/T/",
                "?",
                "&",
                "=",
            ]
        ),
        max_size=12,
    ).map("".join)
    | st.text(max_size=60)
)
def test_the_quick_check_never_skips_a_line_the_patterns_would_change(text: str) -> None:
    from s3proxy import logs

    full = text
    for pattern, replacement in (
        (logs._PATH_TOKEN, "/t/-"),
        (logs._QUERY_TOKEN, r"\1-"),
        (logs._AUTHORIZATION, r"\1-"),
        (logs._BEARER, r"\1-"),
        (logs._JWT, "-"),
    ):
        full = pattern.sub(replacement, full)
    assert redact(text) == full


def test_the_suite_wide_check_finds_a_token_whole_cut_short_or_glued() -> None:
    """The check that ends the session (conftest.SuiteLogs) is sharp enough to matter."""
    logs = SuiteLogs()
    token = logs.minted(make_token("movies/**"))
    _, payload, signature = token.split(".")
    logs.keep(['{"msg": "access", "path": "/t/-/a.mp4", "request_id": "9f2c41aa-000001"}'])
    assert logs.leaks() == [], "an ordinary redacted line is not a leak"
    for line in (
        f"GET /t/{token}/a.mp4",
        f"token={token[:90]}",  # cut short: the payload's start is there
        f"x{signature}y",  # glued to other characters
        f"...{payload[5:35]}...",  # a stretch from the middle
    ):
        logs.lines = [line]
        assert logs.leaks() == [line], line


def test_a_text_line_escapes_control_characters_and_bounds_client_headers() -> None:
    """A client's NUL, CR or LF can not split or forge a text log line, and a huge Range
    is logged cut short."""
    record = logging.LogRecord("s3proxy.access", logging.INFO, __file__, 1, "access", None, None)
    record.fields = {
        "path": "/vod/a\r\n2026 ERROR forged\x00",
        "range": _bounded("bytes=" + "9" * 5000),
    }
    line = TextFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\x00" not in line
    assert "a\\x0d\\x0a2026 ERROR forged\\x00" in line
    assert len(line) < 400 and "(5006 chars)" in line
