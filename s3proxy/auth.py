"""Tokens: JWT verification, key selection by kid, asset-glob scopes, revocation.

The token string is a secret: it is never logged, put in an exception message or a
metric. The verified-token memo is keyed by a SHA-256 digest of it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jwt
from cachetools import TLRUCache
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from .assets import SIDECAR_SUFFIX
from .config import AuthConfig, ConfigError
from .globs import Glob, GlobError, compile_glob

log = logging.getLogger("s3proxy.auth")

FailureReason = Literal["missing", "invalid", "expired", "forbidden"]

_FAMILIES = {
    "HS": "secret",
    "RS": "rsa",
    "PS": "rsa",
    "ES": "ec",
    "Ed": "okp",
}


def algorithm_family(algorithm: str) -> str:
    return _FAMILIES.get(algorithm[:2], "unknown")


class AuthFailure(Exception):
    """A rejected request: 401 for everything but `forbidden` (403)."""

    def __init__(self, reason: FailureReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail

    @property
    def status(self) -> int:
        return 403 if self.reason == "forbidden" else 401


# A JWS in compact form: three base64url parts (RFC 7515); nothing else reaches pyjwt.
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
MAX_TOKEN_CHARS = 8192
MAX_SCOPE_PATTERNS = 64
MAX_CLAIM_TIME = 253402300799  # 9999-12-31T23:59:59Z: numeric claims beyond are refused


# --- scopes -----------------------------------------------------------------------


def presented_token(
    asset: str, path_token: str | None, authorization: str | None, query_token: str | None
) -> tuple[str, str | None]:
    """The asset asked for and the token presented, in this order of precedence: the
    path (`/t/<token>/`), an `Authorization: Bearer` header, the query parameter.

    Mist appends `.dtsh` to its whole source URL, query included: a query token of the
    form `<jwt>.dtsh` means the sidecar of the asset, authorised by `<jwt>`.
    """
    if path_token is not None:
        return asset, path_token
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return asset, credentials.strip()
    token = query_token
    if token and token.endswith(SIDECAR_SUFFIX) and not asset.endswith(SIDECAR_SUFFIX):
        return asset + SIDECAR_SUFFIX, token[: -len(SIDECAR_SUFFIX)]
    return asset, token


@dataclass(frozen=True)
class AssetScope:
    """The asset globs a token grants; an asset's `.dtsh` sidecar comes with the asset."""

    patterns: tuple[str, ...]
    _compiled: tuple[Glob, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Raises GlobError for a pattern too long or with too many `**`."""
        object.__setattr__(self, "_compiled", tuple(compile_glob(p) for p in self.patterns))

    def allows(self, asset: str) -> bool:
        if any(glob.matches(asset) for glob in self._compiled):
            return True
        if asset.endswith(SIDECAR_SUFFIX) and len(asset) > len(SIDECAR_SUFFIX):
            media = asset[: -len(SIDECAR_SUFFIX)]
            return any(glob.matches(media) for glob in self._compiled)
        return False


ALLOW_ALL = AssetScope(("**",))


@dataclass(frozen=True)
class Grant:
    """What a verified token allows, and until when."""

    scope: AssetScope
    expires_at: float
    subject: str | None = None
    token_id: str | None = None


# --- keys -------------------------------------------------------------------------


@dataclass(frozen=True)
class VerificationKey:
    kid: str | None
    family: str  # secret | rsa | ec | okp
    material: Any = field(repr=False)


def _family_of_public_key(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ec"
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return "okp"
    return "unknown"


def load_verification_keys(
    config: AuthConfig, source: str, env: dict[str, str] | None = None
) -> list[VerificationKey]:
    """Read every configured key; a missing secret or unreadable file is a ConfigError."""
    env = dict(os.environ) if env is None else env
    keys: list[VerificationKey] = []
    for index, spec in enumerate(config.keys):
        where = f"auth.keys[{index}]"
        given = [n for n in ("secret_env", "secret_file", "public_key_file") if getattr(spec, n)]
        if len(given) != 1:
            raise ConfigError(
                source, where, "needs exactly one of secret_env, secret_file, public_key_file"
            )
        if spec.secret_env:
            secret = env.get(spec.secret_env, "")
            if not secret:
                raise ConfigError(
                    source,
                    f"{where}.secret_env",
                    f"environment variable {spec.secret_env} is not set",
                )
            _long_enough(source, f"{where}.secret_env", secret.encode("utf-8"))
            keys.append(VerificationKey(spec.kid, "secret", secret.encode("utf-8")))
        elif spec.secret_file:
            data = _read_key_file(source, f"{where}.secret_file", spec.secret_file).strip()
            if not data:
                raise ConfigError(source, f"{where}.secret_file", "file is empty")
            _long_enough(source, f"{where}.secret_file", data)
            keys.append(VerificationKey(spec.kid, "secret", data))
        else:
            assert spec.public_key_file
            data = _read_key_file(source, f"{where}.public_key_file", spec.public_key_file)
            try:
                public = serialization.load_pem_public_key(data)
            except (ValueError, TypeError):
                raise ConfigError(
                    source, f"{where}.public_key_file", "is not a PEM public key"
                ) from None
            keys.append(VerificationKey(spec.kid, _family_of_public_key(public), public))
    if config.jwks_file:
        text = _read_key_file(source, "auth.jwks_file", config.jwks_file)
        try:
            jwks = jwt.PyJWKSet.from_json(text.decode("utf-8"))
        except (jwt.PyJWTError, ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(
                source, "auth.jwks_file", f"is not a usable JWKS: {type(exc).__name__}"
            ) from None
        for jwk in jwks.keys:
            family = "secret" if jwk.key_type == "oct" else _family_of_public_key(jwk.key)
            keys.append(VerificationKey(jwk.key_id, family, jwk.key))
    if config.mode == "jwt" and not keys:
        raise ConfigError(source, "auth.keys", "no verification key configured")
    return keys


MIN_HMAC_SECRET_BYTES = 32  # RFC 7518 3.2: an HMAC key at least as long as its hash


def _long_enough(source: str, key: str, secret: bytes) -> None:
    if len(secret) < MIN_HMAC_SECRET_BYTES:
        raise ConfigError(
            source,
            key,
            f"an HMAC secret needs at least "
            f"{MIN_HMAC_SECRET_BYTES} bytes, this one has {len(secret)}",
        )


def _read_key_file(source: str, key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(source, key, f"can not read {path}: {exc.strerror}") from None


# --- revocation -------------------------------------------------------------------


@dataclass(frozen=True)
class Revocations:
    """Token ids (`jti:<id>` or a bare id) and subjects (`sub:<id>`) that are refused."""

    token_ids: frozenset[str] = frozenset()
    subjects: frozenset[str] = frozenset()

    @classmethod
    def load(cls, path: str | None, source: str) -> Revocations:
        if not path:
            return cls()
        text = _read_key_file(source, "auth.revoked_file", path).decode("utf-8", "replace")
        ids: set[str] = set()
        subjects: set[str] = set()
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("sub:"):
                subjects.add(line[4:].strip())
            else:
                ids.add(line[4:].strip() if line.startswith("jti:") else line)
        return cls(frozenset(ids), frozenset(subjects))

    def refuses(self, grant: Grant) -> bool:
        return (grant.token_id is not None and grant.token_id in self.token_ids) or (
            grant.subject is not None and grant.subject in self.subjects
        )


# --- verification -----------------------------------------------------------------


class TokenVerifier:
    """Verifies tokens against the configured keys; remembers good ones until their exp."""

    MEMO_SIZE = 65536
    RECENT_SIZE = 256  # tokens kept by their text: at most 2 MiB of the longest
    ALLOWED_SIZE = 4096  # (scope, asset) answers kept: at most ~4 MiB of asset names

    def __init__(
        self,
        config: AuthConfig,
        keys: list[VerificationKey],
        revocations: Revocations,
        clock: Any = time.time,
    ) -> None:
        self._config = config
        self._keys = keys
        self._revocations = revocations
        self._clock = clock
        self._memo: TLRUCache[bytes, Grant] = TLRUCache(
            maxsize=self.MEMO_SIZE, ttu=self._memo_until, timer=clock
        )
        # the tokens of the last few requests, by their text, each with the memo's
        # deadline: a media server presents one token at every request of a stream, and
        # the shape check, digest and timed look-up cost more than the answer's head
        self._recent: dict[str, tuple[Grant, float]] = {}
        # whether a scope's globs match an asset: a pure answer, asked at every request
        # (a media server reads one asset many times with one token); emptied when full
        self._allowed: dict[tuple[tuple[str, ...], str], bool] = {}

    @classmethod
    def from_config(cls, config: AuthConfig, source: str) -> TokenVerifier:
        keys = load_verification_keys(config, source) if config.mode == "jwt" else []
        return cls(config, keys, Revocations.load(config.revoked_file, source))

    def _memo_until(self, _key: bytes, grant: Grant, now: float) -> float:
        return min(grant.expires_at + self._config.leeway_s, now + 3600)

    def reload(self, config: AuthConfig, source: str) -> None:
        """SIGHUP: new keys and revocations; remembered tokens are checked again."""
        keys = load_verification_keys(config, source)
        revocations = Revocations.load(config.revoked_file, source)
        self._config, self._keys, self._revocations = config, keys, revocations
        self._memo.clear()
        self._recent.clear()

    def authorize(self, token: str | None, asset: str) -> Grant:
        """The grant for `asset`, or AuthFailure. Never does I/O."""
        if self._config.mode == "none":
            return Grant(ALLOW_ALL, float("inf"))
        if not token:
            raise AuthFailure("missing", "no token")
        grant = self.verify(token)
        if not self._allows(grant.scope, asset):
            raise AuthFailure("forbidden", "token does not cover this asset")
        return grant

    def _allows(self, scope: AssetScope, asset: str) -> bool:
        key = (scope.patterns, asset)
        allowed = self._allowed.get(key)
        if allowed is None:
            if len(self._allowed) >= self.ALLOWED_SIZE:
                self._allowed.clear()
            allowed = self._allowed[key] = scope.allows(asset)
        return allowed

    def verify(self, token: str) -> Grant:
        now = self._clock()
        recent = self._recent.get(token)
        if recent is not None and now < recent[1]:
            grant = recent[0]
        else:
            grant = self._remembered(token, now)
        if self._revocations.refuses(grant):
            raise AuthFailure("invalid", "token revoked")
        return grant

    def _remembered(self, token: str, now: float) -> Grant:
        """The grant from the memo, else from the signature; kept among the recent."""
        if len(token) > MAX_TOKEN_CHARS or not _TOKEN_RE.fullmatch(token):
            raise AuthFailure("invalid", "malformed token")  # before any crypto
        digest = hashlib.sha256(token.encode("ascii")).digest()
        grant = self._memo.get(digest)
        if grant is None:
            grant = self._verify_signature(token)
            self._memo[digest] = grant
        elif now > grant.expires_at + self._config.leeway_s:
            raise AuthFailure("expired", "token expired")
        if len(self._recent) >= self.RECENT_SIZE:
            self._recent.clear()
        self._recent[token] = (grant, self._memo_until(digest, grant, now))
        return grant

    def _verify_signature(self, token: str) -> Grant:
        config = self._config
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthFailure("invalid", "malformed token") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in config.algorithms:
            raise AuthFailure("invalid", "token algorithm not allowed")
        kid = header.get("kid")
        family = algorithm_family(algorithm)
        candidates = [k for k in self._keys if k.family == family and (kid is None or k.kid == kid)]
        if not candidates:
            raise AuthFailure("invalid", "no key for this token")
        options: dict[str, Any] = {
            "require": ["exp"],
            "verify_aud": config.audience is not None,
            "verify_iss": config.issuer is not None,
        }
        last: AuthFailure | None = None
        for key in candidates:
            try:
                claims = jwt.decode(
                    token,
                    key.material,
                    algorithms=[algorithm],
                    options=options,  # type: ignore[arg-type]
                    audience=config.audience,
                    issuer=config.issuer,
                    leeway=config.leeway_s,
                )
            except jwt.ExpiredSignatureError:
                raise AuthFailure("expired", "token expired") from None
            except jwt.ImmatureSignatureError:
                raise AuthFailure("invalid", "token not yet valid") from None
            except jwt.InvalidSignatureError:
                last = AuthFailure("invalid", "bad token signature")
                continue
            except jwt.MissingRequiredClaimError as exc:
                raise AuthFailure("invalid", f"token lacks the {exc.claim} claim") from None
            except jwt.InvalidAudienceError:
                raise AuthFailure("invalid", "token audience not accepted") from None
            except jwt.InvalidIssuerError:
                raise AuthFailure("invalid", "token issuer not accepted") from None
            except jwt.InvalidKeyError:
                last = AuthFailure("invalid", "token key type mismatch")
                continue
            except jwt.PyJWTError:
                raise AuthFailure("invalid", "invalid token") from None
            return self._grant_from_claims(claims)
        assert last is not None
        raise last

    def _grant_from_claims(self, claims: dict[str, Any]) -> Grant:
        raw = claims.get(self._config.scope_claim, [])
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
            raise AuthFailure("invalid", f"token claim {self._config.scope_claim} is not a list")
        exp = claims["exp"]
        if (
            not isinstance(exp, (int, float))
            or isinstance(exp, bool)
            or not (0 <= exp <= MAX_CLAIM_TIME)
        ):
            raise AuthFailure("invalid", "token exp is not a time")
        subject = claims.get("sub")
        token_id = claims.get("jti")
        if len(raw) > MAX_SCOPE_PATTERNS:
            raise AuthFailure("invalid", f"token claim {self._config.scope_claim} is too long")
        try:
            scope = AssetScope(tuple(raw))
        except GlobError as exc:
            raise AuthFailure("invalid", f"token scope refused: {exc}") from None
        return Grant(
            scope,
            float(exp),
            subject if isinstance(subject, str) else None,
            token_id if isinstance(token_id, str) else None,
        )


# --- minting ----------------------------------------------------------------------


def mint_token(
    config: AuthConfig,
    source: str,
    assets: list[str],
    ttl_s: float,
    kid: str | None = None,
    private_key_pem: bytes | None = None,
    algorithm: str | None = None,
    extra_claims: dict[str, Any] | None = None,
    now: float | None = None,
) -> str:
    """A signed token for `assets`: HMAC with a configured secret, or a given private key."""
    algorithm = algorithm or config.algorithms[0]
    family = algorithm_family(algorithm)
    if algorithm not in config.algorithms:
        raise ConfigError(source, "auth.algorithms", f"{algorithm} is not in the allowlist")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iat": issued,
        "exp": issued + int(ttl_s),
        config.scope_claim: list(assets),
    }
    if config.audience:
        claims["aud"] = config.audience
    if config.issuer:
        claims["iss"] = config.issuer
    claims.update(extra_claims or {})
    headers: dict[str, Any] = {}
    if family == "secret":
        secrets = [
            k
            for k in load_verification_keys(config, source)
            if k.family == "secret" and (kid is None or k.kid == kid)
        ]
        if not secrets:
            raise ConfigError(
                source,
                "auth.keys",
                f"no HMAC secret{' with kid ' + kid if kid else ''} to sign with",
            )
        signing: Any = secrets[0].material
        kid = secrets[0].kid
    else:
        if private_key_pem is None:
            raise ConfigError(
                source, "auth.algorithms", f"{algorithm} needs --private-key to sign with"
            )
        signing = serialization.load_pem_private_key(private_key_pem, password=None)
    if kid:
        headers["kid"] = kid
    return jwt.encode(claims, signing, algorithm=algorithm, headers=headers)
