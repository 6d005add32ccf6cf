"""Shared helpers of the benchmarks: timing, percentiles, markdown tables, real server processes.

Every bench module has the same face: ``run(quick: bool = False) -> list[dict]`` returns one
row per measured path, ``markdown(rows) -> str`` renders them, and ``main(argv)`` is the
command line (``python -m bench.<name> [--quick] …``). ``python -m bench`` runs them all.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
Row = dict[str, Any]

# The shipped configuration every server bench runs: a token on /dispatch, a cloud key (so the
# log redacts secrets), the dispatch log line on, written as JSON lines as a container's would be.
LOCAL_TOKEN = "bench-local-token-0123456789abcdef"
CLOUD_KEY = "bench-cloud-key-0123456789abcdef"
SHIPPED: dict[str, str] = {
    "LOCAL_API_TOKEN": LOCAL_TOKEN,
    "EVERREACH_CLOUD_KEY": CLOUD_KEY,
    "LOG_FORMAT": "json",
    "LOG_LEVEL": "INFO",
}
AUTH = {"Authorization": f"Bearer {LOCAL_TOKEN}"}
# How a server is started: ``serve`` is ``everreach serve`` (cli.cmd_serve's uvicorn.Config),
# ``docker`` the image's CMD (``uvicorn local_server:app --host … --port …``, uvicorn's defaults).
LAUNCHERS = ("serve", "docker")
WRK_HINT = "wrk is not installed (Debian/Ubuntu: apt-get install wrk; macOS: brew install wrk)"


# -- numbers ------------------------------------------------------------------------------------


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: the sample at ``int(n * fraction)`` of the sorted samples."""
    if not samples:
        raise ValueError("percentile of no samples")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def median(samples: Iterable[float]) -> float:
    return statistics.median(samples)


async def time_calls(
    n: int, call: Callable[[int], Awaitable[Any]], *, warmup: int = 50
) -> list[float]:
    """Await ``call(i)`` n times one after another; the seconds each took (after a warm-up)."""
    for i in range(min(warmup, n)):  # thread start, page cache, first compiles
        await call(-1 - i)
    samples = []
    for i in range(n):
        start = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - start)
    return samples


def time_sync_calls(n: int, call: Callable[[int], Any], *, warmup: int = 50) -> list[float]:
    """``time_calls`` for a plain function."""
    for i in range(min(warmup, n)):
        call(-1 - i)
    samples = []
    for i in range(n):
        start = time.perf_counter()
        call(i)
        samples.append(time.perf_counter() - start)
    return samples


# -- output -------------------------------------------------------------------------------------


def table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table; the first column left-aligned, the others right-aligned (numbers)."""
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(["---", *["---:"] * (len(columns) - 1)]) + "|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def goal_cell(met: bool | None, goal: str) -> str:
    """``goal`` marked as met or missed (``None``: not applicable)."""
    if met is None:
        return "—"
    return f"{goal}: {'met' if met else '**missed**'}"


# -- command line and files ---------------------------------------------------------------------


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser described by the module docstring's first line, with ``--quick``."""
    described = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    described.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    return described


@contextlib.contextmanager
def temp_folder(prefix: str, directory: Path | None = None) -> Iterator[Path]:
    """A throwaway folder under ``directory`` (default ``./data``, the default DATA_DIR)."""
    base = Path(directory) if directory is not None else Path("data")
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=prefix, dir=base) as folder:
        yield Path(folder)


# -- real server processes ----------------------------------------------------------------------


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """One running ``uvicorn`` process started by ``uvicorn_server``."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def serve_command(app: str, port: int, launcher: str = "serve") -> list[str]:
    """The command line that serves ``app`` the way the project ships (see ``LAUNCHERS``).

    ``serve`` runs ``local_server:app`` as ``python -m cli serve`` and any other app (the bare
    baseline) through ``bench.serve``, which hands it to the same ``cmd_serve``: both get the
    very same ``uvicorn.Config``. ``docker`` runs the image's command line on loopback.
    """
    if launcher == "docker":
        return [
            sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
            "--no-access-log", "--ws", "none",
        ]  # fmt: skip
    if launcher != "serve":
        raise ValueError(f"unknown launcher {launcher!r}; choose from {', '.join(LAUNCHERS)}")
    if app == "local_server:app":
        return [sys.executable, "-m", "cli", "serve", "--port", str(port)]
    return [sys.executable, "-m", "bench.serve", app, "--port", str(port)]


@dataclass(frozen=True)
class ServerSpec:
    """What ``uvicorn_servers`` starts: an app, a name, its variables, launcher and port."""

    app: str
    name: str
    variables: Mapping[str, str] = field(default_factory=dict)
    launcher: str = "serve"
    port: int | None = None  # None: a free one


@contextlib.contextmanager
def uvicorn_servers(
    specs: Sequence[ServerSpec],
    *,
    folder: Path,
    health_path: str = "/health",
    wait_s: float = 60.0,
) -> Iterator[list[Server]]:
    """Serve every spec (``serve_command``) on loopback at once until the block exits.

    Each process gets its own working directory ``folder/name`` (so no stray ``.env`` is read),
    ``DATA_DIR`` and ``SCHEDULES_PATH`` inside it, and an environment built from scratch: only
    ``PYTHONPATH`` (the repository) plus its variables, so nothing of the caller's shell (an
    ``EVERREACH_ENV``, a ``REDIS_URL``) leaks into a measurement. Output goes to
    ``folder/name.log`` (the JSON log lines included, as a container's go to a file). They are
    started together (start-up is the slow part of a short bench) and ready once each answers
    200 on ``health_path``.
    """
    servers: list[Server] = []
    try:
        for spec in specs:
            servers.append(_spawn(spec, folder))
        for server in servers:
            wait_until_healthy(server, health_path, wait_s)
        yield servers
    finally:
        for server in servers:
            server.proc.terminate()
        for server in servers:
            try:
                server.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait(timeout=15)


@contextlib.contextmanager
def uvicorn_server(
    app: str,
    *,
    name: str,
    folder: Path,
    variables: Mapping[str, str] | None = None,
    health_path: str = "/health",
    wait_s: float = 60.0,
    launcher: str = "serve",
) -> Iterator[Server]:
    """Serve one ``app`` until the block exits (see ``uvicorn_servers``)."""
    spec = ServerSpec(app, name, variables or {}, launcher)
    with uvicorn_servers([spec], folder=folder, health_path=health_path, wait_s=wait_s) as found:
        yield found[0]


def _spawn(spec: ServerSpec, folder: Path) -> Server:
    workdir = folder / spec.name
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.defpath,
        "PYTHONPATH": str(ROOT),
        "DATA_DIR": str(workdir / "data"),
        "SCHEDULES_PATH": str(workdir / "schedules.json"),
        **spec.variables,
    }
    port = spec.port or free_port()
    log_path = folder / f"{spec.name}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            serve_command(spec.app, port, spec.launcher),
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Server(spec.name, f"http://127.0.0.1:{port}", proc, log_path)


def wait_until_healthy(server: Server, health_path: str = "/health", wait_s: float = 60.0) -> None:
    """Poll ``health_path`` until it answers 200; raise with the log's tail if it never does."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited at start-up:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}{health_path}", timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.01)
    raise RuntimeError(
        f"{server.name} did not answer {health_path} in {wait_s:g} s:\n{server.log_tail()}"
    )


# -- what a process costs -----------------------------------------------------------------------


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far, from ``/proc/<pid>/stat``."""
    # Fields after the parenthesised command name: state is the 1st, utime the 12th, stime 13th.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB, from ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def summary(key: str, values: Iterable[float]) -> Row:
    """``{key: median, key_min: min, key_max: max}`` of per-round values."""
    values = list(values)
    return {key: median(values), f"{key}_min": min(values), f"{key}_max": max(values)}


def spread(row: Row, key: str, fmt: str = "{:,.0f}") -> str:
    """``median (min..max)`` of ``key`` in a row filled by ``summary``, each as ``fmt``."""
    low, high = fmt.format(row[f"{key}_min"]), fmt.format(row[f"{key}_max"])
    return f"{fmt.format(row[key])} ({low}..{high})"


# Far above anything a bench spends: at the soft cap the terminal would stop calling the cloud.
UNCAPPED = {"MONTHLY_COST_CAP": "1000000", "COST_SOFT_CAP": "999999"}


@contextlib.contextmanager
def cloud_and_terminal(
    folder: Path, *, terminal: Mapping[str, str] | None = None
) -> Iterator[tuple[Server, Server]]:
    """A cloud instance and a hybrid terminal pointed at it, both in the shipped configuration.

    Both load ``tests.e2e_services`` (``research.platform`` is a no-op handler;
    ``content.analyze_video`` sleeps ``params["sleep_s"]``) and share ``CLOUD_KEY``. They start
    together: a terminal counts the cloud online until probes prove otherwise.
    """
    base = {**SHIPPED, "EVERREACH_SERVICES": "tests.e2e_services"}
    cloud_port = free_port()
    specs = [
        ServerSpec(
            "local_server:app", "cloud", {**base, "EVERREACH_ENV": "cloud"}, port=cloud_port
        ),
        ServerSpec(
            "local_server:app",
            "terminal",
            {
                **base,
                "EVERREACH_ENV": "hybrid",
                "CLOUD_ENDPOINT": f"http://127.0.0.1:{cloud_port}",
                **(terminal or {}),
            },
        ),
    ]
    with uvicorn_servers(specs, folder=folder) as (cloud, terminal_server):
        yield cloud, terminal_server
