"""The auth matrix, over HTTP: every rejection is 401/403 and costs no S3 request."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from s3proxy.auth import AssetScope

from .conftest import SECRET, Emulator, RunningProxy, StartProxy, make_token, put_object
from .test_http import fetch

WWW = 'Bearer realm="s3proxy", error="invalid_token"'


def pem_public(private: Any) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def private_keys() -> dict[str, Any]:
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "ed": ed25519.Ed25519PrivateKey.generate(),
    }


@pytest.fixture
async def guarded(
    emulator: Emulator,
    bucket: str,
    start_proxy: StartProxy,
    private_keys: dict[str, Any],
    tmp_path: Path,
) -> RunningProxy:
    keys: list[dict[str, Any]] = [{"kid": "k1", "secret_env": "S3PROXY_TEST_JWT_SECRET"}]
    for name, private in private_keys.items():
        path = tmp_path / f"{name}.pem"
        path.write_bytes(pem_public(private))
        keys.append({"kid": name, "public_key_file": str(path)})
    put_object(emulator, bucket, "movies/abc/master.mp4", b"MEDIA")
    put_object(emulator, bucket, "movies/abcd/master.mp4", b"OTHER")
    put_object(emulator, bucket, "secret.mp4", b"SECRET")
    return await start_proxy(
        auth={
            "algorithms": ["HS256", "HS384", "HS512", "RS256", "ES256", "EdDSA"],
            "keys": keys,
            "audience": "vod",
            "issuer": "control-plane",
        }
    )


def good_claims(**extra: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"aud": "vod", "iss": "control-plane"}
    claims.update(extra)
    return claims


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge_hs256(payload: dict[str, Any], secret: bytes, kid: str) -> str:
    """HS256 by hand, for keys pyjwt rightly refuses to use as HMAC secrets."""
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64(json.dumps(payload).encode())
    signature = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(signature)}"


def unsigned(payload: dict[str, Any]) -> str:
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(payload).encode())}."


ASSET = "movies/abc/master.mp4"


async def assert_rejected(
    emulator: Emulator,
    running: RunningProxy,
    token: str | None,
    status: int = 401,
    asset: str = ASSET,
    reason: str | None = None,
) -> None:
    before_metric = running.metric("s3proxy_auth_failures_total", reason=reason or "")
    before_reads = len(emulator.object_requests(running.bucket))
    url = running.url(f"/vod/{asset}") + (f"?token={token}" if token is not None else "")
    got, headers, body = await fetch(url)
    assert (got, body) == (status, b"")
    if status == 401:
        assert headers["WWW-Authenticate"] == WWW
    else:
        assert "WWW-Authenticate" not in headers
    assert headers["X-S3Proxy-Error"]
    if token:
        assert token not in headers["X-S3Proxy-Error"]
    if reason:
        after = running.metric("s3proxy_auth_failures_total", reason=reason)
        assert after == before_metric + 1
    assert len(emulator.object_requests(running.bucket)) == before_reads, (
        "no S3 request before auth passes"
    )


async def test_missing_token(emulator: Emulator, guarded: RunningProxy) -> None:
    await assert_rejected(emulator, guarded, None, reason="missing")
    await assert_rejected(emulator, guarded, "", reason="missing")


@pytest.mark.parametrize("token", ["abc", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.e30", "x" * 2000])
async def test_malformed_token(emulator: Emulator, guarded: RunningProxy, token: str) -> None:
    await assert_rejected(emulator, guarded, token, reason="invalid")


async def test_wrong_key(emulator: Emulator, guarded: RunningProxy) -> None:
    token = make_token(ASSET, key="another-secret-another-secret-xx", **good_claims())
    await assert_rejected(emulator, guarded, token, reason="invalid")


async def test_alg_none_is_never_accepted(emulator: Emulator, guarded: RunningProxy) -> None:
    payload = good_claims(exp=int(time.time()) + 600, assets=["**"])
    await assert_rejected(emulator, guarded, unsigned(payload), reason="invalid")


async def test_public_key_used_as_hmac_secret_is_rejected(
    emulator: Emulator, guarded: RunningProxy, private_keys: dict[str, Any]
) -> None:
    payload = good_claims(exp=int(time.time()) + 600, assets=["**"])
    for kid in ("rsa", "ec", "ed"):
        forged = forge_hs256(payload, pem_public(private_keys[kid]), kid)
        await assert_rejected(emulator, guarded, forged, reason="invalid")


async def test_expired_token(emulator: Emulator, guarded: RunningProxy) -> None:
    await assert_rejected(
        emulator, guarded, make_token(ASSET, ttl=-120, **good_claims()), reason="expired"
    )


async def test_expiry_within_leeway_is_accepted(emulator: Emulator, guarded: RunningProxy) -> None:
    token = make_token(ASSET, ttl=-5, **good_claims())
    status, _, body = await fetch(guarded.url(f"/vod/{ASSET}?token={token}"))
    assert (status, body) == (200, b"MEDIA")


async def test_token_without_exp_is_rejected(emulator: Emulator, guarded: RunningProxy) -> None:
    token = jwt.encode(good_claims(assets=["**"]), SECRET, algorithm="HS256", headers={"kid": "k1"})
    await assert_rejected(emulator, guarded, token, reason="invalid")


async def test_future_nbf(emulator: Emulator, guarded: RunningProxy) -> None:
    token = make_token(ASSET, nbf=int(time.time()) + 300, **good_claims())
    await assert_rejected(emulator, guarded, token, reason="invalid")


async def test_wrong_audience_and_issuer(emulator: Emulator, guarded: RunningProxy) -> None:
    await assert_rejected(
        emulator, guarded, make_token(ASSET, **good_claims(aud="somebody-else")), reason="invalid"
    )
    await assert_rejected(
        emulator, guarded, make_token(ASSET, **good_claims(iss="mallory")), reason="invalid"
    )
    await assert_rejected(
        emulator, guarded, make_token(ASSET, iss="control-plane"), reason="invalid"
    )  # no aud at all


async def test_unknown_kid(emulator: Emulator, guarded: RunningProxy) -> None:
    await assert_rejected(
        emulator, guarded, make_token(ASSET, kid="k9", **good_claims()), reason="invalid"
    )


async def test_algorithm_outside_the_allowlist(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    put_object(emulator, bucket, "a.mp4", b"A")
    running = await start_proxy()  # allows HS256 only
    assert (await fetch(running.url(f"/t/{make_token('a.mp4')}/a.mp4")))[0] == 200
    token = make_token("a.mp4", algorithm="HS512")  # the right secret, the wrong algorithm
    await assert_rejected(emulator, running, token, asset="a.mp4", reason="invalid")


@pytest.mark.parametrize(
    "asset",
    [
        "movies/abcd/master.mp4",  # one character more in a segment
        "movies/abc/x/master.mp4",  # * does not cross segments
        "movies/ab/master.mp4",
        "secret.mp4",
    ],
)
async def test_scope_miss_is_403(emulator: Emulator, guarded: RunningProxy, asset: str) -> None:
    token = make_token("movies/abc/*", **good_claims())
    await assert_rejected(emulator, guarded, token, status=403, asset=asset, reason="forbidden")


async def test_traversal_out_of_scope_is_400_not_served(
    emulator: Emulator, guarded: RunningProxy
) -> None:
    token = make_token("movies/abc/*", **good_claims())
    for path in (
        f"/vod/movies/abc/../../secret.mp4?token={token}",
        f"/vod/movies/abc/%2e%2e/%2e%2e/secret.mp4?token={token}",
        f"/vod/movies/abc/..%2f..%2fsecret.mp4?token={token}",
        f"/t/{token}/movies/abc/%2E%2E/%2E%2E/secret.mp4",
    ):
        status, _, body = await fetch(guarded.url(path))
        assert (status, body) == (400, b""), path
    assert emulator.object_requests(guarded.bucket) == []


@pytest.mark.parametrize(
    "kid, algorithm",
    [
        ("k1", "HS256"),
        ("k1", "HS384"),
        ("k1", "HS512"),
        ("rsa", "RS256"),
        ("ec", "ES256"),
        ("ed", "EdDSA"),
    ],
)
async def test_each_algorithm_opens_its_scope(
    emulator: Emulator,
    guarded: RunningProxy,
    private_keys: dict[str, Any],
    kid: str,
    algorithm: str,
) -> None:
    key = SECRET if kid == "k1" else private_keys[kid]
    token = make_token("movies/**", key=key, algorithm=algorithm, kid=kid, **good_claims())
    status, _, body = await fetch(guarded.url(f"/vod/{ASSET}?token={token}"))
    assert (status, body) == (200, b"MEDIA")


async def test_token_forms_path_bearer_query(emulator: Emulator, guarded: RunningProxy) -> None:
    token = make_token("movies/abc/*", **good_claims())
    assert (await fetch(guarded.url(f"/t/{token}/{ASSET}")))[2] == b"MEDIA"
    assert (await fetch(guarded.url(f"/vod/{ASSET}"), Authorization=f"Bearer {token}"))[
        2
    ] == b"MEDIA"
    assert (await fetch(guarded.url(f"/vod/{ASSET}?token={token}")))[2] == b"MEDIA"


async def test_custom_query_param_and_scope_claim(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    put_object(emulator, bucket, "a.mp4", b"A")
    running = await start_proxy(auth={"query_param": "jwt", "scope_claim": "grants"})
    token = jwt.encode(
        {"exp": int(time.time()) + 60, "grants": ["a.mp4"]},
        SECRET,
        algorithm="HS256",
        headers={"kid": "k1"},
    )
    assert (await fetch(running.url(f"/vod/a.mp4?jwt={token}")))[:3:2] == (200, b"A")
    assert (await fetch(running.url(f"/vod/a.mp4?token={token}")))[0] == 401


async def test_globs() -> None:
    scope = AssetScope(("movies/*/master.mp4", "shows/**", "clips/a?.ts", "x/**/y.mp4"))
    assert scope.allows("movies/abc/master.mp4")
    assert not scope.allows("movies/abc/def/master.mp4")
    assert scope.allows("shows/s1/e1/x.mp4")
    assert scope.allows("clips/a1.ts") and not scope.allows("clips/a12.ts")
    assert not scope.allows("clips/a/.ts")
    assert scope.allows("x/y.mp4") and scope.allows("x/1/2/y.mp4")
    assert scope.allows("movies/abc/master.mp4.dtsh"), "a sidecar comes with its asset"
    assert not scope.allows("other.mp4") and not scope.allows(".dtsh")
    assert AssetScope(("a.mp4",)).allows("a.mp4") and not AssetScope(("a.mp4",)).allows("aXmp4")


async def test_jwks_file(
    emulator: Emulator, bucket: str, start_proxy: StartProxy, tmp_path: Path
) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    jwk.update({"kid": "jw1", "alg": "ES256", "use": "sig"})
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    put_object(emulator, bucket, "a.mp4", b"A")
    running = await start_proxy(auth={"algorithms": ["ES256"], "keys": [], "jwks_file": str(jwks)})
    token = make_token("a.mp4", key=private, algorithm="ES256", kid="jw1")
    assert (await fetch(running.url(f"/t/{token}/a.mp4")))[0] == 200
    other = make_token(
        "a.mp4", key=ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", kid="jw1"
    )
    assert (await fetch(running.url(f"/t/{other}/a.mp4")))[0] == 401


async def test_revoked_token_ids_and_subjects(
    emulator: Emulator, bucket: str, start_proxy: StartProxy, tmp_path: Path
) -> None:
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("# revoked\njti:bad-id\nsub:mallory\n")
    put_object(emulator, bucket, "a.mp4", b"A")
    running = await start_proxy(auth={"revoked_file": str(revoked)})
    fine = make_token("a.mp4", jti="ok-id", sub="alice")
    assert (await fetch(running.url(f"/t/{fine}/a.mp4")))[0] == 200
    assert (await fetch(running.url(f"/t/{make_token('a.mp4', jti='bad-id')}/a.mp4")))[0] == 401
    assert (await fetch(running.url(f"/t/{make_token('a.mp4', sub='mallory')}/a.mp4")))[0] == 401
    # SIGHUP re-reads the file: a token accepted (and remembered) before is now refused.
    revoked.write_text("jti:ok-id\n")
    config = running.proxy.config
    running.proxy.verifier.reload(config.auth, config.source)
    assert (await fetch(running.url(f"/t/{fine}/a.mp4")))[0] == 401


async def test_verified_tokens_are_remembered(
    emulator: Emulator, bucket: str, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_object(emulator, bucket, "a.mp4", b"A")
    running = await start_proxy()
    calls = []
    real_decode = jwt.decode

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr("s3proxy.auth.jwt.decode", counting_decode)
    token = make_token("a.mp4")
    for _ in range(5):  # Mist: a new connection and the same token at every seek
        assert (await fetch(running.url(f"/t/{token}/a.mp4"), Range="bytes=0-"))[0] == 206
    assert len(calls) == 1


async def test_mode_none_serves_without_a_token(
    emulator: Emulator, bucket: str, start_proxy: StartProxy
) -> None:
    put_object(emulator, bucket, "a.mp4", b"A")
    running = await start_proxy(auth={"mode": "none", "keys": []})
    assert (await fetch(running.url("/vod/a.mp4")))[:3:2] == (200, b"A")


async def test_token_never_appears_in_logs_or_metrics(
    emulator: Emulator, guarded: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    good = make_token("movies/abc/*", **good_claims())
    expired = make_token("movies/abc/*", ttl=-300, **good_claims())
    forbidden = make_token("nothing/*", **good_claims())
    for token in (good, expired, forbidden):
        await fetch(guarded.url(f"/vod/{ASSET}?token={token}"))
        await fetch(guarded.url(f"/t/{token}/{ASSET}"), Range="bytes=0-")
        await fetch(guarded.url(f"/vod/{ASSET}"), Authorization=f"Bearer {token}")
    access = [r for r in caplog.records if r.name == "s3proxy.access"]
    assert len(access) >= 9
    text = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    exposition = guarded.proxy.metrics.exposition().decode()
    for token in (good, expired, forbidden):
        signature = token.rsplit(".", 1)[1]
        assert signature not in text
        assert signature not in exposition


def test_a_token_presented_at_every_request_still_expires_and_is_still_revoked(
    tmp_path: Path,
) -> None:
    """The verifier keeps the last tokens by their text (no digest, no timed look-up at
    each request); that shortcut must not outlive a token's exp or a revocation."""
    from s3proxy.auth import AuthFailure, TokenVerifier

    from .conftest import make_config

    revoked = tmp_path / "revoked.txt"
    revoked.write_text("")
    config = make_config(
        "http://127.0.0.1:9", "b", auth={"leeway_s": 0, "revoked_file": str(revoked)}
    )
    verifier = TokenVerifier.from_config(config.auth, config.source)
    short = make_token("a.mp4", ttl=1)
    long = make_token("a.mp4", jti="later-revoked")
    for _ in range(3):
        assert verifier.authorize(short, "a.mp4").expires_at > time.time() - 1
        verifier.authorize(long, "a.mp4")
    exp = jwt.decode(short, options={"verify_signature": False})["exp"]
    while time.time() <= exp + 0.05:  # bounded: at most ~1 s
        time.sleep(0.05)
    with pytest.raises(AuthFailure) as failure:
        verifier.authorize(short, "a.mp4")
    assert failure.value.reason == "expired"
    revoked.write_text("jti:later-revoked\n")
    verifier.reload(config.auth, config.source)
    with pytest.raises(AuthFailure) as failure:
        verifier.authorize(long, "a.mp4")
    assert failure.value.reason == "invalid"
