"""The command line: check-config's exit codes and one-line messages, token minting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jwt
import pytest
import yaml

from s3proxy.config import ConfigError, admin_secret, load_config, parse_size

from .conftest import SECRET, SECRET_ENV, SUITE_LOGS

ROOT = Path(__file__).resolve().parent.parent


def s3proxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {**os.environ, **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "s3proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=full_env,
    )
    if args[:1] == ("token",) and result.returncode == 0:
        SUITE_LOGS.minted(result.stdout.strip())
    SUITE_LOGS.keep(result.stderr)
    return result


PLACEHOLDER = "placeholder-secret-for-tests-only-0123456789"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s3proxy.yaml"
    path.write_text(text)
    return path


def test_shipped_example_config_is_valid() -> None:
    result = s3proxy(
        "check-config",
        str(ROOT / "config" / "s3proxy.yaml"),
        env={"S3PROXY_JWT_SECRET": PLACEHOLDER},
    )
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["s3"]["bucket"] == "vod-assets"
    assert effective["cache"]["block_size"] == "1MiB"


def test_check_config_prints_the_effective_config_with_env_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "s3: {bucket: media}\ncache: {max_bytes: 64MiB}\n")
    result = s3proxy(
        "check-config",
        str(path),
        env={
            "S3PROXY_JWT_SECRET": PLACEHOLDER,
            "S3PROXY_CACHE_MAX_BYTES": "2GiB",
            "S3PROXY_S3_ENDPOINT_URL": "http://user:pw@minio:9000",
        },
    )
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["cache"]["max_bytes"] == "2GiB"
    assert effective["s3"]["endpoint_url"] == "http://***@minio:9000"
    assert "pw" not in result.stdout


@pytest.mark.parametrize(
    "text, env, expected",
    [
        ("s3: {bucket: m}\nserver: {port: 99999}\n", {}, "server.port: must be a port number"),
        ("s3: {bucket: m}\nserver: {prot: 80}\n", {}, "server.prot: unknown key"),
        ("s3: {bucket: m}\ncache: {max_bytes: lots}\n", {}, "cache.max_bytes: expected a size"),
        ("s3: {bucket: m}\nhttp: {max_ranges: many}\n", {}, "http.max_ranges: must be an integer"),
        ("s3: {bucket: m}\nauth: {mode: maybe}\n", {}, "auth.mode: must be one of jwt | none"),
        (
            "s3: {bucket: m}\nauth: {algorithms: [none]}\n",
            {},
            "auth.algorithms: must be a non-empty",
        ),
        ("server: {port: 80}\n", {}, "s3.bucket: is required"),
        ("s3: {bucket: [m\n", {}, "(file): is not valid YAML"),
        ("- a\n- b\n", {}, "(file): must be a mapping"),
        (
            "s3: {bucket: m}\n",
            {"S3PROXY_JWT_SECRET": ""},
            "auth.keys[0].secret_env: environment variable S3PROXY_JWT_SECRET is not set",
        ),
    ],
)
def test_check_config_rejects_bad_files_with_one_line(
    tmp_path: Path, text: str, env: dict[str, str], expected: str
) -> None:
    path = write(tmp_path, text)
    result = s3proxy("check-config", str(path), env={"S3PROXY_JWT_SECRET": PLACEHOLDER, **env})
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"s3proxy: {path}: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    result = s3proxy("check-config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"s3proxy: {tmp_path / 'nope.yaml'}: (file): can not be read: No such file or directory"
    )


def test_serve_with_a_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "s3: {bucket: m}\ncache: {readahead_blocks: -1}\n")
    result = s3proxy("serve", "--config", str(path), env={"S3PROXY_JWT_SECRET": PLACEHOLDER})
    assert result.returncode == 2
    assert "cache.readahead_blocks: must not be negative" in result.stderr


def test_token_command_mints_a_token_the_proxy_accepts(tmp_path: Path) -> None:
    path = write(
        tmp_path, f"s3: {{bucket: m}}\nauth: {{keys: [{{kid: main, secret_env: {SECRET_ENV}}}]}}\n"
    )
    result = s3proxy(
        "token",
        "--config",
        str(path),
        "--asset",
        "movies/**",
        "--asset",
        "x.mp4",
        "--ttl",
        "15m",
        "--sub",
        "alice",
        env={SECRET_ENV: SECRET},
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["assets"] == ["movies/**", "x.mp4"]
    assert claims["exp"] - claims["iat"] == 900
    assert claims["sub"] == "alice"
    assert jwt.get_unverified_header(token)["kid"] == "main"


def test_token_command_rejects_a_bad_ttl(tmp_path: Path) -> None:
    result = s3proxy("token", "--asset", "x", "--ttl", "soon")
    assert result.returncode == 2
    assert "expected a duration" in result.stderr


def test_sizes() -> None:
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("4 KiB") == 4096
    assert parse_size(123) == 123
    assert parse_size("1gib") == 1 << 30
    for bad in ("1MB", "-1", "1.5MiB", True, "", None):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_env_overrides_reach_nested_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "s3: {bucket: m}\n")
    config = load_config(
        path,
        env={
            "S3PROXY_CACHE_DISK_PATH": "/var/cache/s3proxy",
            "S3PROXY_CACHE_DISK_MAX_BYTES": "10GiB",
            "S3PROXY_AUTH_ALGORITHMS": "[HS256, RS256]",
            "S3PROXY_SERVER_PORT": "9000",
        },
    )
    assert config.cache.disk.path == "/var/cache/s3proxy"
    assert config.cache.disk.max_bytes == 10 << 30
    assert config.auth.algorithms == ["HS256", "RS256"]
    assert config.server.port == 9000


def test_env_override_with_a_wrong_type_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "s3: {bucket: m}\n")
    with pytest.raises(ConfigError) as failure:
        load_config(path, env={"S3PROXY_SERVER_PORT": "eighty"})
    assert failure.value.key == "server.port"


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_environment_values_are_read_as_the_type_of_their_key(tmp_path: Path) -> None:
    path = write(tmp_path, "s3: {bucket: m}\n")
    config = load_config(
        path,
        env={
            "S3PROXY_S3_BUCKET": "0123",
            "S3PROXY_S3_PREFIX": "1:20",
            "S3PROXY_SIDECARS_ACCEPT_PUT": "yes",
            "S3PROXY_S3_ENDPOINT_URL": "",
        },
    )
    assert (config.s3.bucket, config.s3.prefix) == ("0123", "1:20")
    assert config.sidecars.accept_put is True and config.s3.endpoint_url is None


def test_an_error_in_an_environment_value_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "s3: {bucket: m}\n")
    for name, value, problem in (
        ("S3PROXY_CACHE_BLOCK_SIZE", "12XB", "cache.block_size: expected"),
        ("S3PROXY_SERVER_PORT", "99999", "server.port: must be a port"),
        ("S3PROXY_SERVER_WORKERS", "two", "server.workers: must be an"),
    ):
        line = one_line(
            s3proxy("check-config", str(path), env={"S3PROXY_JWT_SECRET": PLACEHOLDER, name: value})
        )
        assert line.startswith(f"s3proxy: {name}: {problem}"), line


def test_a_misspelt_variable_stops_start_up(tmp_path: Path) -> None:
    path = write(tmp_path, "s3: {bucket: m}\n")
    line = one_line(
        s3proxy(
            "check-config",
            str(path),
            env={"S3PROXY_JWT_SECRET": PLACEHOLDER, "S3PROXY_S3_BUCKT": "x"},
        )
    )
    assert line.startswith("s3proxy: S3PROXY_S3_BUCKT: (environment): names no configuration key")
    assert "S3PROXY_S3_BUCKET" in line
    # a secret named by the configuration is not an override
    path = write(tmp_path, "s3: {bucket: m}\nauth: {keys: [{secret_env: S3PROXY_AUTH_SECRET}]}\n")
    assert (
        s3proxy("check-config", str(path), env={"S3PROXY_AUTH_SECRET": PLACEHOLDER}).returncode == 0
    )


def test_the_region_comes_from_aws_region_unless_set(tmp_path: Path) -> None:
    path = write(tmp_path, "s3: {bucket: m}\n")
    assert load_config(path, env={"AWS_REGION": "eu-west-3"}).s3.region == "eu-west-3"
    assert load_config(path, env={"AWS_DEFAULT_REGION": "ap-south-1"}).s3.region == "ap-south-1"
    assert (
        load_config(
            path, env={"AWS_REGION": "eu-west-3", "S3PROXY_S3_REGION": "us-west-2"}
        ).s3.region
        == "us-west-2"
    )
    path = write(tmp_path, "s3: {bucket: m, region: sa-east-1}\n")
    assert load_config(path, env={"AWS_REGION": "eu-west-3"}).s3.region == "sa-east-1"


def test_contradictory_and_weak_settings_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "s3: {bucket: m}\ncache: {disk: {max_bytes: 1GiB}}\n")
    line = one_line(s3proxy("check-config", str(path), env={"S3PROXY_JWT_SECRET": PLACEHOLDER}))
    assert "cache.disk.max_bytes: is set but cache.disk.path is not" in line
    path = write(tmp_path, "s3: {bucket: m}\n")
    line = one_line(s3proxy("check-config", str(path), env={"S3PROXY_JWT_SECRET": "short"}))
    assert "an HMAC secret needs at least 32 bytes, this one has 5" in line


def test_token_and_warm_need_no_bucket(tmp_path: Path) -> None:
    path = write(tmp_path, "admin: {port: 1}\n")
    token = s3proxy(
        "token", "--config", str(path), "--asset", "x", env={"S3PROXY_JWT_SECRET": PLACEHOLDER}
    )
    assert token.returncode == 0 and token.stdout.count(".") == 2, token.stderr
    warm = s3proxy("warm", "x.mp4", "--config", str(path))
    assert warm.returncode == 1 and "no proxy answering" in warm.stderr, warm.stderr


def test_output_into_a_pipe_that_closes_early_is_quiet(tmp_path: Path) -> None:
    path = write(tmp_path, "s3: {bucket: m}\n")
    result = subprocess.run(
        f"{sys.executable} -m s3proxy check-config {path} | true",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "S3PROXY_JWT_SECRET": PLACEHOLDER},
    )  # `true` reads nothing
    assert result.stderr == "", result.stderr


def test_the_example_config_and_the_readme_show_every_key() -> None:
    from s3proxy.config import Config, config_as_dict

    def keys(data: object, prefix: str = "") -> set[str]:
        if not isinstance(data, dict):
            return {prefix.rstrip(".")}
        found: set[str] = set()
        for name, value in data.items():
            if name == "keys":  # a list of key entries, shown by example
                found.add(prefix + name)
                continue
            found |= keys(value, f"{prefix}{name}.")
        return found

    schema = keys(config_as_dict(Config()))
    example = keys(yaml.safe_load((ROOT / "config" / "s3proxy.yaml").read_text()))
    assert schema - example == set(), "keys missing from config/s3proxy.yaml"
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The ingest stage") :]
    missing = [k for k in schema if k.startswith("ingest.") and f"`{k[7:]}`" not in section]
    assert missing == [], "ingest keys the README's ingest section does not explain"


def dockerfile_env(target: str) -> dict[str, str]:
    """The ENV a Dockerfile target sets (its stage and the stages it builds on)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages: dict[str, tuple[str | None, dict[str, str]]] = {}
    current: dict[str, str] = {}
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["FROM"]:
            current = {}
            parent = words[1] if words[1] in stages else None
            stages[words[3]] = (parent, current)
        elif words[:1] == ["ENV"]:
            current.update(word.split("=", 1) for word in words[1:])  # type: ignore[arg-type]
    env: dict[str, str] = {}
    name: str | None = target
    while name is not None:
        parent, values = stages[name]
        env = {**values, **env}
        name = parent
    return env


def test_the_docker_images_environment_makes_a_working_config() -> None:
    from s3proxy.ingest.service import IngestService

    text = (ROOT / "Dockerfile").read_text()
    assert text.rstrip().endswith('CMD ["serve"]'), "the default (last) target serves"
    serve = dockerfile_env("serve")
    config = load_config(
        serve["S3PROXY_CONFIG"].replace("/etc/s3proxy", str(ROOT / "config")),
        env={**serve, "S3PROXY_ADMIN_TOKEN": PLACEHOLDER},
    )
    assert config.admin.host == "0.0.0.0"
    assert admin_secret(config, {"S3PROXY_ADMIN_TOKEN": PLACEHOLDER}) == PLACEHOLDER
    ingest = dockerfile_env("ingest")
    config = load_config(
        ROOT / "config" / "s3proxy.yaml",
        env={**ingest, "S3PROXY_INGEST_SOURCE": "s3://my-uploads/raw/"},
    )
    assert config.ingest.work_dir == "/work" and config.ingest.admin_host == "0.0.0.0"
    IngestService(config, env={"S3PROXY_WEBHOOK_SECRET": PLACEHOLDER})


def test_a_regular_install_holds_every_module(tmp_path: Path) -> None:
    """`pip install .` (the Docker image, a service install) must carry every subpackage,
    not only what an editable install finds in the checkout."""
    import shutil

    source = tmp_path / "source"  # a clean copy: no build/ left from an earlier build
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "s3proxy", source / "s3proxy", ignore=shutil.ignore_patterns("__pycache__")
    )
    target = tmp_path / "site"
    build = subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "-q", "--no-deps",
            "--target", str(target), str(source),
        ],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for path in (ROOT / "s3proxy").rglob("*.py")
    )
    installed = sorted(
        ".".join(path.relative_to(target).with_suffix("").parts)
        for path in (target / "s3proxy").rglob("*.py")
    )
    assert installed == modules
    check = subprocess.run(
        [sys.executable, "-c", "import s3proxy.ingest.service, s3proxy.cli"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
