"""Shared helpers of the benchmarks: timing, percentiles, markdown tables, real server processes.

Every bench module has the same face: ``run(quick: bool = False) -> list[dict]`` returns one
row per measured path, ``markdown(rows) -> str`` renders them, and ``main(argv)`` is the
command line (``python -m bench.<name> [--quick] …``). ``python -m bench`` runs them all.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
Row = dict[str, Any]

# The same event loop and HTTP parser for every server a bench starts (uvicorn's "auto" picks
# these too when they are installed; naming them makes two servers' settings provably equal).
UVICORN_LOOP = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
UVICORN_HTTP = "httptools" if importlib.util.find_spec("httptools") else "h11"


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


def uvicorn_command(app: str, port: int) -> list[str]:
    """The one uvicorn command line every bench server runs (same settings for all)."""
    return [
        sys.executable, "-m", "uvicorn", app,
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--loop", UVICORN_LOOP, "--http", UVICORN_HTTP,
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip


@contextlib.contextmanager
def uvicorn_server(
    app: str,
    *,
    name: str,
    folder: Path,
    variables: Mapping[str, str] | None = None,
    health_path: str = "/health",
    wait_s: float = 60.0,
) -> Iterator[Server]:
    """Run ``uvicorn app`` on a free loopback port until the block exits.

    The process gets its own working directory ``folder/name`` (so no stray ``.env`` is read),
    ``DATA_DIR`` and ``SCHEDULES_PATH`` inside it, and an environment built from scratch: only
    ``PYTHONPATH`` (the repository) plus ``variables``, so nothing of the caller's shell (an
    ``EVERREACH_ENV``, a ``REDIS_URL``) leaks into a measurement. Output goes to
    ``folder/name.log``. It is ready once ``health_path`` answers 200.
    """
    workdir = folder / name
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.defpath,
        "PYTHONPATH": str(ROOT),
        "DATA_DIR": str(workdir / "data"),
        "SCHEDULES_PATH": str(workdir / "schedules.json"),
        **(variables or {}),
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = folder / f"{name}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            uvicorn_command(app, port), cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    server = Server(name, url, proc, log_path)
    try:
        _wait_until_healthy(server, health_path, wait_s)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def _wait_until_healthy(server: Server, health_path: str, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited at start-up:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}{health_path}", timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(
        f"{server.name} did not answer {health_path} in {wait_s:g} s:\n{server.log_tail()}"
    )
