"""Configuration: YAML file plus S3PROXY_<SECTION>_<KEY> overrides, validated on load.

Every section is a frozen dataclass; the loader walks the dataclass fields, so the
schema, the defaults, the environment variable names and the validation live in one
place. A problem raises ConfigError naming the source, the key and what is wrong.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

ENV_PREFIX = "S3PROXY_"

log = logging.getLogger("s3proxy.config")

_SIZE_UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([A-Za-z]*)\s*$")


class ConfigError(Exception):
    """A configuration problem, already phrased as the one line an operator sees."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: {key}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


class ByteSize(int):
    """A byte count; in YAML either an integer or a string such as '512MiB'."""


def parse_size(value: object) -> ByteSize:
    """Parse 123, '123', '64KiB', '1MiB', '2GiB' (binary units) into bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 512MiB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size can not be negative, got {value}")
        return ByteSize(value)
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            unit = match.group(2).upper()
            if unit in _SIZE_UNITS:
                return ByteSize(int(match.group(1)) * _SIZE_UNITS[unit])
    raise ValueError(f"expected a size like 512MiB (units B, KiB, MiB, GiB), got {value!r}")


def format_size(value: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value and value % factor == 0:
            return f"{value // factor}{unit}"
    return f"{value}B"


def _check(predicate: typing.Callable[[Any], bool], message: str) -> dict[str, Any]:
    return {"check": (predicate, message)}


_POSITIVE = _check(lambda v: v > 0, "must be greater than 0")
_NON_NEGATIVE = _check(lambda v: v >= 0, "must not be negative")
_PORT = _check(lambda v: 0 <= v <= 65535, "must be a port number (0-65535)")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = field(default=8080, metadata=_PORT)
    workers: int = field(default=1, metadata=_POSITIVE)
    shutdown_timeout_s: float = field(default=8.0, metadata=_NON_NEGATIVE)
    max_connections: int = field(default=4096, metadata=_POSITIVE)  # open, at accept
    header_timeout_s: float = field(default=10.0, metadata=_POSITIVE)
    keepalive_timeout_s: float = field(default=75.0, metadata=_POSITIVE)
    max_head_bytes: ByteSize = field(
        default=ByteSize(32 << 10),
        metadata=_check(lambda v: v >= 1024, "must be at least 1KiB"),
    )
    node_name: str | None = field(
        default=None,
        metadata=_check(
            lambda v: v is None or re.fullmatch(r"[A-Za-z0-9._-]{1,64}", v) is not None,
            "must be 1-64 letters, digits, '.', '_' or '-'",
        ),
    )  # sent as X-S3Proxy-Node (pools)


@dataclass(frozen=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = field(default=9101, metadata=_PORT)
    token_env: str | None = None  # env var holding the bearer secret for POST /warm


@dataclass(frozen=True)
class S3Config:
    bucket: str = ""
    prefix: str = ""
    region: str = "us-east-1"
    endpoint_url: str | None = None
    # worst case to a first byte: 2 x (0.5 + 1.2) s + botocore's back-off (< 1 s) < 4.5 s,
    # under the 5 s after which Mist gives up on a source
    connect_timeout_s: float = field(default=0.5, metadata=_POSITIVE)
    read_timeout_s: float = field(default=1.2, metadata=_POSITIVE)
    max_attempts: int = field(default=2, metadata=_POSITIVE)
    max_connections: int = field(default=64, metadata=_POSITIVE)
    probe_key: str | None = None


@dataclass(frozen=True)
class KeyConfig:
    kid: str | None = None
    secret_env: str | None = None
    secret_file: str | None = None
    public_key_file: str | None = None


_ALGORITHMS = (
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)


@dataclass(frozen=True)
class AuthConfig:
    mode: Literal["jwt", "none"] = "jwt"
    algorithms: list[str] = field(
        default_factory=lambda: ["HS256"],
        metadata=_check(
            lambda v: bool(v) and all(a in _ALGORITHMS for a in v),
            f"must be a non-empty list of {', '.join(_ALGORITHMS)} ('none' is never accepted)",
        ),
    )
    keys: list[KeyConfig] = field(
        default_factory=lambda: [KeyConfig(kid="main", secret_env="S3PROXY_JWT_SECRET")]
    )
    jwks_file: str | None = None
    audience: str | None = None
    issuer: str | None = None
    leeway_s: float = field(default=30.0, metadata=_NON_NEGATIVE)
    query_param: str = field(default="token", metadata=_check(bool, "must not be empty"))
    scope_claim: str = field(default="assets", metadata=_check(bool, "must not be empty"))
    revoked_file: str | None = None


@dataclass(frozen=True)
class HttpConfig:
    max_ranges: int = field(default=16, metadata=_POSITIVE)


@dataclass(frozen=True)
class DiskConfig:
    path: str | None = None
    max_bytes: ByteSize = ByteSize(0)


@dataclass(frozen=True)
class CacheConfig:
    block_size: ByteSize = field(
        default=ByteSize(1 << 20),
        metadata=_check(lambda v: 4096 <= v <= 1 << 30, "must be between 4KiB and 1GiB"),
    )
    max_bytes: ByteSize = ByteSize(512 << 20)
    preallocate: bool = True  # hold the memory tier's bytes from start-up (see store.memory)
    metadata_ttl_s: float = field(default=30.0, metadata=_NON_NEGATIVE)
    readahead_blocks: int = field(default=2, metadata=_NON_NEGATIVE)  # the first window
    readahead_max_blocks: int = field(default=32, metadata=_NON_NEGATIVE)
    readahead_max_bytes: ByteSize | None = None  # all windows together (None: max_bytes/4)
    readahead_max_inflight: int = field(default=8, metadata=_NON_NEGATIVE)
    warm_seconds: float = field(default=70.0, metadata=_NON_NEGATIVE)
    warm_bytes: ByteSize = ByteSize(128 << 20)
    disk: DiskConfig = field(default_factory=DiskConfig)


@dataclass(frozen=True)
class SidecarsConfig:
    accept_put: bool = False
    max_bytes: ByteSize = ByteSize(16 << 20)


@dataclass(frozen=True)
class IngestConfig:
    """`s3proxy ingest`: uploads under `source` prepared and published by the naming rule."""

    source: str = field(
        default="",
        metadata=_check(
            lambda v: (
                v == "" or bool(re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?", v))
            ),
            "must be s3://bucket/prefix/",
        ),
    )
    match: str = "{id}.{ext}"  # the upload's key below the source prefix
    publish_as: str = "{id}/master.mp4"  # the asset name (under s3.bucket + s3.prefix)
    queue_url: str | None = None  # SQS queue with the bucket's ObjectCreated events
    queue_endpoint_url: str | None = None  # SQS-compatible services and tests
    poll_interval_s: float = field(default=30.0, metadata=_POSITIVE)  # without a queue
    lease_s: float = field(
        default=300.0, metadata=_check(lambda v: 3 <= v <= 43200, "must be 3-43200 seconds")
    )
    lease_prefix: str = ".s3proxy-ingest/leases/"  # polling: lease objects, source bucket
    max_concurrent: int = field(default=2, metadata=_POSITIVE)
    work_dir: str | None = None  # null: the system's temporary directory
    min_free_bytes: ByteSize = ByteSize(512 << 20)  # kept free beyond a job's own need
    require_dtsh: bool = False
    on_refused: Literal["move", "tag"] = "move"
    refused_prefix: str = "refused/"  # on_refused move: where, in the source bucket
    notify_url: str | None = None
    notify_secret_env: str | None = "S3PROXY_WEBHOOK_SECRET"
    notify_attempts: int = field(default=8, metadata=_POSITIVE)
    notify_backoff_s: float = field(default=1.0, metadata=_NON_NEGATIVE)  # doubles, <= 60
    notify_timeout_s: float = field(default=10.0, metadata=_POSITIVE)
    warm_urls: list[str] = field(default_factory=list)  # pool nodes' admin base URLs
    warm_token_env: str | None = None  # their admin bearer secret
    shutdown_timeout_s: float = field(default=30.0, metadata=_NON_NEGATIVE)
    admin_host: str = "127.0.0.1"
    admin_port: int = field(default=9102, metadata=_PORT)

    @property
    def location(self) -> tuple[str, str]:
        """The source's bucket and prefix: `s3://uploads/raw/` -> ("uploads", "raw/")."""
        bucket, _, prefix = self.source[len("s3://") :].partition("/")
        return bucket, prefix


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    s3: S3Config = field(default_factory=S3Config)
    auth: AuthConfig = field(default_factory=AuthConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    sidecars: SidecarsConfig = field(default_factory=SidecarsConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = field(default="<defaults>", compare=False)


# The file never holds secrets (they come from env, files or the AWS chain), but an
# endpoint URL may carry user:password@; check-config masks it.
_USERINFO_RE = re.compile(r"(?<=://)[^/@]+@")


def reread(path: str | None, apply: Callable[[Config], None] | None = None) -> Config | None:
    """SIGHUP: the configuration file read again and handed to `apply`, which may refuse it
    with ConfigError. None, with the reason logged, when there is no file or it is
    refused; the caller then keeps what it has."""
    if path is None:
        log.warning("SIGHUP ignored: no configuration file to re-read")
        return None
    try:
        fresh = load_config(path)
        if apply is not None:
            apply(fresh)
    except ConfigError as exc:
        log.error("SIGHUP: configuration not reloaded", extra={"fields": {"error": str(exc)}})
        return None
    return fresh


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    require_bucket: bool = True,
) -> Config:
    """Read the YAML file (if any), apply environment overrides, validate.

    `require_bucket=False`: for commands that never talk to S3 (`token`, `warm`)."""
    env = os.environ if env is None else env
    source = str(path) if path is not None else "<defaults>"
    data: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(source, "(file)", f"can not be read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(source, "(file)", "is not UTF-8 text") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or "invalid syntax"
            raise ConfigError(source, "(file)", f"is not valid YAML{where}: {problem}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(source, "(file)", "must be a mapping of sections at the top level")
    origins: dict[str, str] = {}  # key -> the environment variable that set it
    data = _apply_env(Config, dict(data), env, "", origins)
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    section = data.get("s3")
    if (
        region
        and (section is None or isinstance(section, dict))
        and "region" not in (section or {})
    ):
        data["s3"] = {**(section or {}), "region": region}
        origins["s3.region"] = "AWS_REGION" if env.get("AWS_REGION") else "AWS_DEFAULT_REGION"
    config: Config = dataclasses.replace(_build(Config, data, source, "", origins), source=source)
    _refuse_unknown_env(config, env)
    if require_bucket and not config.s3.bucket:
        raise ConfigError(source, "s3.bucket", "is required")
    _check_consistency(config, origins)
    return config


def _check_consistency(config: Config, origins: Mapping[str, str]) -> None:
    """Keys that contradict each other."""
    _check_ingest(config, origins)
    disk = config.cache.disk
    if disk.max_bytes and not disk.path:
        source = origins.get("cache.disk.max_bytes", config.source)
        raise ConfigError(
            source,
            "cache.disk.max_bytes",
            "is set but cache.disk.path is not: where should the blocks go?",
        )


def _check_ingest(config: Config, origins: Mapping[str, str]) -> None:
    from .ingest.rules import NameRule, RuleError

    ingest = config.ingest
    try:
        NameRule.compile(ingest.match, ingest.publish_as)
    except RuleError as exc:
        key, _, problem = str(exc).partition(": ")
        raise ConfigError(
            origins.get(f"ingest.{key}", config.source), f"ingest.{key}", problem
        ) from None
    prefix = ingest.location[1]
    for key in ("lease_prefix", "refused_prefix"):
        value = getattr(ingest, key)
        if ingest.source and (not value or value.startswith(prefix)):
            raise ConfigError(
                origins.get(f"ingest.{key}", config.source),
                f"ingest.{key}",
                f"{value!r} must be outside the source prefix {prefix!r} (and not empty)",
            )


def _is_origin(cls: type, name: str) -> bool:
    """Config.source names the file a config came from: no key (ingest.source is one)."""
    return cls is Config and name == "source"


_SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if not _is_origin(Config, f.name))


def _known_env(cls: type, prefix: str) -> set[str]:
    names: set[str] = set()
    for f, hint in _fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            names |= _known_env(hint, f"{name}_")  # type: ignore[arg-type]
        else:
            names.add(ENV_PREFIX + name.upper())
    return names


def _refuse_unknown_env(config: Config, env: Mapping[str, str]) -> None:
    """An `S3PROXY_<SECTION>_...` variable that names no key stops start-up, as an unknown
    YAML key does (a misspelt override is never ignored silently). Variables that hold
    secrets by name (`secret_env`, `token_env`) and `S3PROXY_CONFIG` are not overrides."""
    referenced = {k.secret_env for k in config.auth.keys if k.secret_env}
    for name in (
        config.admin.token_env,
        config.ingest.notify_secret_env,
        config.ingest.warm_token_env,
    ):
        if name:
            referenced.add(name)
    known = _known_env(Config, "")
    for name in env:
        if not name.startswith(ENV_PREFIX) or name in known or name in referenced:
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        if any(rest.startswith(section + "_") for section in _SECTIONS):
            close = sorted(k for k in known if k.startswith(name.rsplit("_", 1)[0]))[:5]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(name, "(environment)", f"names no configuration key{hint}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin_secret(config: Config, env: Mapping[str, str] | None = None) -> str | None:
    """The bearer secret POST /warm requires (None: none required, admin on loopback).
    An admin listener beyond loopback without one is refused: anyone who reaches it
    could make S3 traffic."""
    admin = config.admin
    if admin.token_env:
        return _secret_from_env(config, "admin.token_env", admin.token_env, env)
    if not is_loopback(admin.host):
        raise ConfigError(
            config.source,
            "admin.token_env",
            f"is required when admin.host ({admin.host}) is not loopback",
        )
    return None


def notify_secret(config: Config, env: Mapping[str, str] | None = None) -> str | None:
    """The key ingest signs its webhooks with (None: no ingest.notify_url, no webhooks)."""
    ingest = config.ingest
    if not ingest.notify_url:
        return None
    return _secret_from_env(config, "ingest.notify_secret_env", ingest.notify_secret_env or "", env)


def _secret_from_env(config: Config, key: str, name: str, env: Mapping[str, str] | None) -> str:
    """The secret the environment variable `name` (set by `key`) holds; refused when it is
    missing or shorter than MIN_SECRET_CHARS."""
    secret = (os.environ if env is None else env).get(name, "")
    if len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(
            config.source,
            key,
            f"environment variable {name} must hold a secret "
            f"of at least {MIN_SECRET_CHARS} characters",
        )
    return secret


MIN_SECRET_CHARS = 16


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Build a validated Config from a plain mapping (tests, demo); no environment."""
    config: Config = dataclasses.replace(_build(Config, dict(data), source, ""), source=source)
    return config


def _fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if not _is_origin(cls, f.name)]


def _apply_env(
    cls: type, data: dict[str, Any], env: Mapping[str, str], prefix: str, origins: dict[str, str]
) -> dict[str, Any]:
    """Overlay S3PROXY_<SECTION>_<KEY> variables onto the parsed YAML mapping, each value
    read as the type of the key it sets (a string key keeps the string as given)."""
    for f, hint in _fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            section = data.get(f.name)
            if section is None or isinstance(section, dict):
                nested = _apply_env(
                    hint,  # type: ignore[arg-type]
                    dict(section or {}),
                    env,
                    f"{name}_",
                    origins,
                )
                if nested or section is not None:
                    data[f.name] = nested
            continue
        var = ENV_PREFIX + name.upper()
        if var in env:
            data[f.name] = _env_value(hint, env[var], var, _dotted(name))
            origins[_dotted(name)] = var
    return data


def _dotted(env_name: str) -> str:
    """`cache_disk_max_bytes` -> `cache.disk.max_bytes`, by the schema's own sections."""
    section, _, rest = env_name.partition("_")
    if section == "cache" and rest.startswith("disk_"):
        return f"cache.disk.{rest[len('disk_') :]}"
    return f"{section}.{rest}"


def _env_value(hint: Any, raw: str, var: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    optional = origin in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        if raw.strip() == "":
            return None
        (hint,) = [a for a in args if a is not type(None)]
        origin = typing.get_origin(hint)
    if hint is str or hint is ByteSize or origin is Literal:
        return raw  # as given: "0123" stays "0123"; sizes and choices are checked later
    if hint is bool:
        lowered = raw.strip().lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
        raise ConfigError(var, key, f"must be true or false, got {raw!r}")
    if hint is int:
        try:
            return int(raw.strip())
        except ValueError:
            raise ConfigError(var, key, f"must be an integer, got {raw!r}") from None
    if hint is float:
        try:
            return float(raw.strip())
        except ValueError:
            raise ConfigError(var, key, f"must be a number, got {raw!r}") from None
    try:  # lists: YAML flow syntax, e.g. [HS256, RS256]
        return yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(var, key, f"is not valid YAML: {raw!r}") from None


def _build(
    cls: type, data: Any, source: str, prefix: str, origins: Mapping[str, str] | None = None
) -> Any:
    origins = origins or {}
    if not isinstance(data, dict):
        raise ConfigError(source, prefix.rstrip(".") or "(file)", "must be a mapping")
    known = {f.name for f, _ in _fields(cls)}
    for key in data:
        if key not in known:
            hint = f"; known keys: {', '.join(sorted(known))}"
            raise ConfigError(source, f"{prefix}{key}", f"unknown key{hint}")
    values: dict[str, Any] = {}
    for f, hint in _fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}{f.name}"
        where = origins.get(key, source)  # an error names the variable that set the value
        if dataclasses.is_dataclass(hint):
            value = _build(
                hint,  # type: ignore[arg-type]
                data[f.name] if data[f.name] is not None else {},
                source,
                f"{key}.",
                origins,
            )
        else:
            value = _convert(hint, data[f.name], where, key)
        check = f.metadata.get("check")
        if check is not None and value is not None:
            predicate, message = check
            if not predicate(value):
                raise ConfigError(where, key, f"{message}, got {data[f.name]!r}")
        values[f.name] = value
    return cls(**values)


def _convert(hint: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, source, key)
    if dataclasses.is_dataclass(hint):
        if value is None:
            return hint()  # type: ignore[operator]
        return _build(hint, value, source, f"{key}.")  # type: ignore[arg-type]
    if origin is Literal:
        if value not in args:
            choices = " | ".join(str(a) for a in args)
            raise ConfigError(source, key, f"must be one of {choices}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(source, key, f"must be a list, got {value!r}")
        (item,) = args
        return [_convert(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is ByteSize:
        try:
            return parse_size(value)
        except ValueError as exc:
            raise ConfigError(source, key, str(exc)) from None
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(source, key, f"must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(source, key, f"must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(source, key, f"must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(source, key, f"must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a schema bug, not input


def config_as_dict(config: Config, *, mask_secrets: bool = True) -> dict[str, Any]:
    """The effective configuration as plain data, sizes in units, secrets masked."""

    def render(obj: Any, name: str = "") -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {
                f.name: render(getattr(obj, f.name), f.name)
                for f in dataclasses.fields(obj)
                if not _is_origin(type(obj), f.name)
            }
        if isinstance(obj, list):
            return [render(v, name) for v in obj]
        if isinstance(obj, ByteSize):
            return format_size(obj)
        if mask_secrets and isinstance(obj, str) and "://" in obj:
            return _USERINFO_RE.sub("***@", obj)
        return obj

    result: dict[str, Any] = render(config)
    return result
