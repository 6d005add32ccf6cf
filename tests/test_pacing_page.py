"""The pacing page's "Try it" steps, exactly as shown, with a real server in a fresh folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.doc_blocks import DOCS, blocks, fresh_clone, run_page, save_the_files_the_page_shows

pytestmark = pytest.mark.e2e

PAGE = DOCS / "pacing-and-alerts.md"


@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("curl") is None and not os.environ.get("CI"), reason="no curl")
def test_the_pacing_walkthrough_defers_two_notes_and_cancels_the_scheduled_one(
    tmp_path: Path,
) -> None:
    folder = fresh_clone(tmp_path / "clone")
    save_the_files_the_page_shows(PAGE, folder)
    assert sorted(p.name for p in folder.iterdir()) == [".venv", "paced_services.py"]

    done = run_page(PAGE, folder, ports={"8080": free_port()}, timeout_s=90)

    log = folder / "paced.log"
    assert done.returncode == 0, (
        done.stdout + done.stderr + (log.read_text() if log.exists() else "")
    )
    shown = [b.text for b in blocks(PAGE) if b.lang == "text"]
    answers, sent = shown[0], shown[1]
    assert answers in done.stdout, "the page's 200/202 lines differ from what the server answered"
    assert (folder / "sent.txt").read_text(encoding="utf-8") == sent  # eve was cancelled
    assert "cancelled: it will not run" in done.stderr
