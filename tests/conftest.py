"""Shared fixtures: real Redis and PostgreSQL (skip on a laptop, fail under CI=true), free
loopback ports, and real uvicorn server processes of this project."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REDIS_TEST_URL = os.environ.get("REDIS_TEST_URL", "redis://127.0.0.1:6379/15")
POSTGRES_TEST_DSN = os.environ.get("POSTGRES_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")


# Fixtures that start a child process (a server, a worker, a browser, a throwaway Redis, mount).
PROCESS_FIXTURES = frozenset(
    {
        "server_factory",
        "module_server_factory",
        "tmpfs",
        "browser",
        "start_worker",
        "sleeper",
        "throwaway_redis",
    }
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--forbid-processes",
        action="store_true",
        help="fail any test that starts a child process (make test-fast: with -m 'not process')",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--forbid-processes"):
        sys.addaudithook(_refuse_child_processes)
    _temp_files_in_memory()


# A RAM file system for tmp_path when the machine has one and TMPDIR does not say otherwise.
MEMORY_TEMP_ROOT = Path("/dev/shm")


def _temp_files_in_memory() -> None:
    """Put ``tmp_path`` (and the servers' DATA_DIRs under it) on tmpfs when there is one.

    The tests' SQLite files are real files all the same; only their fsyncs (``synchronous=FULL``
    on every commit) stop waiting for the disk, which other work on the machine shares. What a
    killed process leaves behind is the same on tmpfs; a power cut is not something a test can
    show either way. ``TMPDIR`` (or ``--basetemp``) chooses another place.
    """
    if "TMPDIR" in os.environ or not MEMORY_TEMP_ROOT.is_dir():
        return
    if os.access(MEMORY_TEMP_ROOT, os.W_OK | os.X_OK):
        tempfile.tempdir = str(MEMORY_TEMP_ROOT)


def _refuse_child_processes(event: str, args: tuple[Any, ...]) -> None:
    if event in ("subprocess.Popen", "os.posix_spawn", "os.fork", "os.system"):
        raise RuntimeError(f"a child process ({event} {args[:2]!r}) in a test marked no-process")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``process`` every test that starts a child process: e2e, or a process fixture."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("e2e") is not None or fixtures & PROCESS_FIXTURES:
            item.add_marker(pytest.mark.process)


@pytest.fixture(autouse=True)
def _declarations_of_this_test_only() -> Iterator[None]:
    """Forget the handlers a test's services modules declared with ``@register``, and the modules.

    ``@register`` fills one table per process, read when an app is built. A test that builds an
    app with ``EVERREACH_SERVICES=tests.e2e_services`` would otherwise leave its handlers there
    for the next test, whose own example module declaring the same action (the docs' ``dm.send``)
    would then be refused as a second handler. The next test that needs the module imports it
    afresh, as a new server process would.
    """
    import service_registry

    declared = service_registry._DECLARED
    before = dict(declared)
    yield
    added = [handler for action, handler in declared.items() if before.get(action) is not handler]
    declared.clear()
    declared.update(before)
    for module in {getattr(handler, "__module__", None) for handler in added}:
        if module:
            sys.modules.pop(module, None)


def service_missing(what: str) -> None:
    """Skip on a developer machine without the service; fail the run under CI=true."""
    if IN_CI:
        pytest.fail(f"{what} is not reachable, and CI=true requires it", pytrace=False)
    pytest.skip(f"{what} is not reachable")


@pytest.fixture
def redis_url() -> Iterator[str]:
    """URL of a flushed Redis test database (db 15)."""
    import redis

    client = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError:
        service_missing(f"Redis at {REDIS_TEST_URL}")
    client.flushdb()
    yield REDIS_TEST_URL
    with contextlib.suppress(redis.RedisError):
        client.flushdb()
    client.close()


@pytest.fixture
def postgres_dsn() -> Iterator[str]:
    """DSN whose search_path is a fresh schema, dropped afterwards."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        conn = psycopg.connect(POSTGRES_TEST_DSN, autocommit=True, connect_timeout=2)
    except psycopg.Error:
        service_missing(f"PostgreSQL at {POSTGRES_TEST_DSN}")
    with conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in POSTGRES_TEST_DSN else "?"
    yield f"{POSTGRES_TEST_DSN}{sep}options=-csearch_path%3D{schema}"
    with psycopg.connect(POSTGRES_TEST_DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def until(predicate: Callable[[], bool], *, what: str, timeout_s: float = 15.0) -> None:
    """Wait until ``predicate()`` holds; the limit only stops a hung test (not a timed assert)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for: {what}")
        await asyncio.sleep(0.01)


def wait_until(predicate: Callable[[], bool], *, what: str, timeout_s: float = 15.0) -> None:
    """``until`` for tests outside an event loop (those that talk to real servers)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for: {what}")
        time.sleep(0.01)


LIST_MODULES = "print(' '.join(sorted({m.split('.')[0] for m, v in sys.modules.items() if v})))"


def ready_together(servers: list[Any]) -> list[Any]:
    """Wait for servers launched with ``server_factory(..., ready=False)``, which started side
    by side (replicas of one store start at once in production too)."""
    return [server.wait_ready() for server in servers]


def wait_until_it_sees_its_cloud(terminal: Any) -> None:
    """Poll until a terminal counts its cloud online and the cloud's circuit is closed: the
    state a terminal started after its cloud is in, for one started beside it (a probe that
    found the cloud still importing is forgotten by the next one that reaches it)."""

    def sees_it() -> bool:
        status = httpx.get(f"{terminal.url}/status", timeout=10).json()
        return bool(status["online"] and status["circuits"]["cloud"] == "closed")

    wait_until(sees_it, what="the terminal to see its cloud")


def modules_loaded_by(code: str, *args: str) -> set[str]:
    """The top-level modules a fresh interpreter has loaded after running ``code`` (with
    ``sys`` imported) and then ``LIST_MODULES``, from the repository root."""
    done = subprocess.run(
        [sys.executable, "-c", f"import sys\n{code}\n{LIST_MODULES}", *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return set(done.stdout.split())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Configuration variables of the developer's shell must not leak into test servers.
_CONFIG_PREFIXES = ("EVERREACH_", "CLOUD_", "LOCAL_", "COST_", "CACHE_", "SUPABASE_")
_CONFIG_NAMES = (
    "DATABASE_URL",
    "REDIS_URL",
    "OFFLINE_MODE",
    "DATA_DIR",
    "HOST",
    "PORT",
    "ALLOWED_HOSTS",
)


def clean_env(*, also: tuple[str, ...] = ()) -> dict[str, str]:
    """This process's environment without the shell's configuration variables (nor ``also``)."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_CONFIG_PREFIXES) and key not in _CONFIG_NAMES and key not in also
    }


def wait_until_serving(proc: subprocess.Popen[Any], port: int, *, wait_s: float = 60.0) -> None:
    """Poll ``/health`` on ``port`` until it answers; fail if ``proc`` exits first."""
    deadline = time.monotonic() + wait_s  # only stops a hung test
    while True:
        assert proc.poll() is None, "the server exited before it answered"
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.05)


@dataclass
class ServerProcess:
    """A real ``uvicorn local_server:app`` process on a loopback port."""

    env: dict[str, str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait_s: float = 30.0) -> ServerProcess:
        return self.launch().wait_ready(wait_s=wait_s)

    def launch(self) -> ServerProcess:
        """Start the process and return at once: servers launched together import in parallel."""
        (self.log_path.parent / self.log_path.stem).mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "local_server:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                *self.extra_args,
            ],
            cwd=self.log_path.parent / self.log_path.stem,  # its own folder: no stray .env
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self

    def wait_ready(self, *, wait_s: float = 30.0) -> ServerProcess:
        """Poll ``/health`` until it answers 200; the log's tail if the process exits first."""
        assert self.proc is not None, "launch() the server first"
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server did not come up:\n{self.log_path.read_text()[-4000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=15)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def restart(self) -> ServerProcess:
        self.stop()
        return self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class ServerPool:
    """Start real server processes under one folder, and stop them all at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[ServerProcess] = []

    def start(
        self,
        *,
        name: str | None = None,
        port: int | None = None,
        args: Sequence[str] = (),
        ready: bool = True,
        **variables: str,
    ) -> ServerProcess:
        """Start a server and wait for it; ``ready=False`` returns once it is launched (call
        ``wait_ready()`` before using it), so a test's servers start side by side."""
        name = name or f"srv{len(self.started)}"
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(_CONFIG_PREFIXES) and key not in _CONFIG_NAMES
        }
        env.update(
            {
                "PYTHONPATH": str(ROOT),
                "EVERREACH_SERVICES": "tests.e2e_services",
                "DATA_DIR": str(self.root / name / "data"),
                "SCHEDULES_PATH": str(self.root / name / "schedules.json"),
            }
        )
        env.update({key: str(value) for key, value in variables.items()})
        server = ServerProcess(
            env=env,
            port=port or free_port(),
            log_path=self.root / f"{name}.log",
            extra_args=list(args),  # e.g. ["--host", "0.0.0.0"]: uvicorn takes the last one
        )
        self.started.append(server)
        return server.start() if ready else server.launch()

    def stop_all(self) -> None:
        """SIGTERM every server first, then wait for each: they shut down side by side."""
        running = [s.proc for s in self.started if s.proc and s.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        for proc in running:
            proc.wait(timeout=15)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start real server processes: ``server_factory(EVERREACH_ENV='local', ...)``.

    Each gets its own DATA_DIR under tmp_path unless one is given, the e2e services module,
    and a free loopback port. All are stopped at the end of the test.
    """
    pool = ServerPool(tmp_path)
    yield pool.start
    pool.stop_all()


@pytest.fixture(scope="module")
def module_server_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., ServerProcess]]:
    """``server_factory`` for servers a whole module shares (tests that need no fresh state)."""
    pool = ServerPool(tmp_path_factory.mktemp("servers"))
    yield pool.start
    pool.stop_all()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount small tmpfs file systems (``tmpfs(size="1m", read_only=False)``); skip if we may not.

    A real read-only or full file system: root ignores chmod, but not a read-only mount or a
    file system out of space. Every mount is undone at the end.
    """
    mounted: list[Path] = []

    def mount(*, size: str = "1m", read_only: bool = False) -> Path:
        target = tmp_path / f"tmpfs{len(mounted)}"
        target.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace')}")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


@contextlib.contextmanager
def _app_clients(root: Path) -> Iterator[Callable[..., Any]]:
    from fastapi.testclient import TestClient

    from config.hybrid_config import HybridConfig
    from local_server import create_app

    with contextlib.ExitStack() as stack:
        started = iter(range(1_000))

        def start(**variables: str) -> TestClient:
            config = HybridConfig.from_mapping(
                {
                    "DATA_DIR": str(root / f"app{next(started)}" / "data"),
                    "ALLOWED_HOSTS": "testserver",
                    **variables,
                }
            )
            client = TestClient(create_app(config), raise_server_exceptions=False)
            return stack.enter_context(client)

        yield start


@pytest.fixture
def app_client(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start in-process apps: ``app_client(EVERREACH_CLOUD_KEY='k', ...)`` -> a ``TestClient``.

    Each gets DATA_DIR under tmp_path and allows the "testserver" Host the test client sends
    (pass ALLOWED_HOSTS to test the default). Faults come back as answers, not exceptions.
    """
    with _app_clients(tmp_path) as start:
        yield start


@pytest.fixture(scope="module")
def module_app_client(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Any]]:
    """``app_client`` for apps a whole module shares (requests that leave no state behind)."""
    with _app_clients(tmp_path_factory.mktemp("apps")) as start:
        yield start
