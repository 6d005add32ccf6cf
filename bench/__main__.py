"""Run every benchmark and write the tables to bench/results/latest.md.

    python -m bench [--quick] [--only NAME ...] [--output PATH]       (make bench)

Each bench module runs in turn (``run(quick)``), its table is printed as soon as it is done,
under the exact command that reproduces it alone, and all of them are written to ``--output``
(default ``bench/results/latest.md``, which git ignores). A bench that fails is reported in
its section and the others still run; the exit status is then 1.

Server benches run the shipped configuration (``bench.common.SHIPPED``, started as
``everreach serve`` and the image start the server); every figure is a ratio to a baseline
taken in the same run, as the median (min..max) over alternating rounds. The header names the
commit measured, so a results file says what it is the "before" or "after" of.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from bench.common import WRK_HINT

BENCHES = (
    "bench_routing",
    "bench_http",
    "bench_cloud_path",
    "bench_cloud_cpu",
    "bench_batch",
    "bench_startup",
    "bench_cost_guard",
    "bench_pacing",
    "bench_offline",
    "bench_sync_bus",
    "bench_cli",
)
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "latest.md"


def _name(value: str) -> str:
    name = value if value.startswith("bench_") else f"bench_{value}"
    if name not in BENCHES:
        raise argparse.ArgumentTypeError(f"no bench {value!r}; choose from {', '.join(BENCHES)}")
    return name


def run_one(name: str, quick: bool) -> tuple[str, bool]:
    """Run one bench module; its markdown section and whether it succeeded."""
    command = f"python -m bench.{name}{' --quick' if quick else ''}"
    started = time.perf_counter()
    try:
        module = importlib.import_module(f"bench.{name}")
        body = module.markdown(module.run(quick))
        ok = True
    except Exception:
        body = "failed:\n\n```\n" + traceback.format_exc(limit=8) + "```"
        ok = False
    took_s = time.perf_counter() - started
    return f"## {name}\n\n`{command}` ({took_s:.0f} s)\n\n{body}\n", ok


def commit() -> str:
    """The commit measured (``git describe``-like: hash, ``-dirty`` with local changes)."""
    try:
        found = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"
    return found.stdout.strip()


def header(argv: list[str]) -> str:
    """Title of the results file: the command, when, at which commit, and on what."""
    command = " ".join(["python -m bench", *argv])
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    wrk = "wrk " + ("found" if shutil.which("wrk") else "missing: " + WRK_HINT)
    return (
        f"# Benchmarks\n\n`{command}` — {when}; commit {commit()}; Python "
        f"{platform.python_version()}, {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {wrk}\n"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    parser.add_argument(
        "--only", type=_name, action="append", metavar="NAME",
        help=f"run only this bench (repeatable): {', '.join(BENCHES)}",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown file")
    args = parser.parse_args(argv)

    sections = [header(argv)]
    print(sections[0], flush=True)
    failed = []
    for name in args.only or BENCHES:
        section, ok = run_one(name, args.quick)
        print(section, flush=True)
        sections.append(section)
        if not ok:
            failed.append(name)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(sections), encoding="utf-8")
    print(f"written to {args.output}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
