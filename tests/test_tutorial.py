"""The tutorial's steps, exactly as the page shows them, with real processes in a fresh folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.doc_blocks import DOCS, blocks, fresh_clone, run_page, save_the_files_the_page_shows

pytestmark = pytest.mark.e2e

TUTORIAL = DOCS / "tutorial.md"


@pytest.mark.timeout(300)  # the steps wait out the cloud retries once
@pytest.mark.skipif(shutil.which("curl") is None and not os.environ.get("CI"), reason="no curl")
def test_the_tutorial_runs_word_for_word_and_each_note_is_sent_once(tmp_path: Path) -> None:
    folder = fresh_clone(tmp_path / "clone")
    save_the_files_the_page_shows(TUTORIAL, folder)
    assert sorted(p.name for p in folder.iterdir()) == [".venv", "my_routes.json", "my_services.py"]

    ports = {"8080": free_port(), "9090": free_port()}
    done = run_page(TUTORIAL, folder, ports=ports, timeout_s=240)

    logs = "".join(f"\n--- {log.name}\n{log.read_text()[-3000:]}" for log in folder.glob("*.log"))
    assert done.returncode == 0, done.stdout + done.stderr + logs
    assert "HTTP 202" in done.stdout
    assert '"queued":true' in done.stdout.replace(" ", "")
    assert '"source":"outbox"' in done.stdout.replace(" ", "")
    assert '"source":"local_fallback"' in done.stdout.replace(" ", "")
    sent = (folder / "sent.txt").read_text(encoding="utf-8")
    assert sent == "alice: hello\nbob: see you\n"
    shown = [b.text for b in blocks(TUTORIAL) if b.lang == "text"]
    assert sent in shown, "the page's expected sent.txt differs from what the steps produce"
