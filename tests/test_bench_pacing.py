"""Smoke test of bench/bench_pacing.py: a quick run measures both stores and renders its table."""

from __future__ import annotations

import math
from pathlib import Path

from bench import bench_pacing


def test_pacing_bench_times_the_pacer_against_the_bare_write(
    tmp_path: Path, redis_url: str
) -> None:
    rows = bench_pacing.run(quick=True, folder=tmp_path, redis_url=redis_url)
    assert [(r["store"], r["bare"]) for r in rows] == [("sqlite", "INSERT"), ("redis", "INCR")]
    for row in rows:
        assert row["calls"] == 300
        for key in ("acquire_p50_us", "acquire_p99_us", "bare_p50_us", "bare_p99_us", "ratio"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["name"], key)
    table = bench_pacing.markdown(rows).splitlines()
    assert len(table) == 2 + len(rows)
