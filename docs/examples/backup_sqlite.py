"""Back up every SQLite file of a data directory, consistently, while the server runs.

Usage: python3 docs/examples/backup_sqlite.py DATA_DIR BACKUP_DIR
"""

from __future__ import annotations

import contextlib
import pathlib
import sqlite3
import sys


def backup(src: pathlib.Path, dst: pathlib.Path) -> list[pathlib.Path]:
    """Copy each database of ``src`` into ``dst`` with SQLite's online backup API."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for db in sorted(p for p in src.iterdir() if p.suffix in (".sqlite3", ".sqlite", ".db")):
        with (
            contextlib.closing(sqlite3.connect(db)) as live,
            contextlib.closing(sqlite3.connect(dst / db.name)) as copy,
        ):
            live.backup(copy)  # a consistent snapshot, WAL included, while the server writes
        print(f"{db} -> {dst / db.name}")
        copied.append(dst / db.name)
    return copied


if __name__ == "__main__":
    backup(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))
