"""The README's shell blocks, word for word, against real servers in a fresh folder."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_until_serving
from tests.doc_blocks import EXAMPLES, ROOT, blocks, clean_env, fresh_clone, run_page

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("curl") is None and not os.environ.get("CI"), reason="no curl"),
]

README = ROOT / "README.md"


def readme_script(index: int, folder: Path) -> Path:
    """Write the README's ``index``-th runnable sh block as a page of its own in ``folder``."""
    runnable = [b for b in blocks(README) if b.lang == "sh" and b.not_run is None]
    assert len(runnable) == 2, "README: the quick commands, then the hybrid pair"
    page = folder / f"readme-{index}.md"
    page.write_text(f"```sh\n{runnable[index].text}```\n", encoding="utf-8")
    return page


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """What `make run` starts: `everreach serve` on the embedded defaults, in a fresh folder."""
    folder = fresh_clone(tmp_path / "clone")
    port = free_port()
    proc = subprocess.Popen(
        [str(folder / ".venv" / "bin" / "everreach"), "serve", "--port", str(port)],
        cwd=folder,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_serving(proc, port)
        yield folder, port
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def test_the_readmes_first_commands_answer(served: tuple[Path, int]) -> None:
    folder, port = served
    done = run_page(
        readme_script(0, folder.parent), folder, ports={"8080": port}, env={"PORT": str(port)}
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"env":"local"' in done.stdout.replace(" ", "")
    assert '"result":{"hi":1}' in done.stdout.replace(" ", "")
    assert "system.heartbeat" in done.stdout


def test_the_readmes_hybrid_pair_runs_the_users_action_on_the_cloud(tmp_path: Path) -> None:
    folder = fresh_clone(tmp_path / "clone")
    shutil.copyfile(EXAMPLES / "video_services.py", folder / "video_services.py")
    ports = {"8080": free_port(), "9090": free_port()}
    done = run_page(readme_script(1, tmp_path), folder, ports=ports)
    logs = "".join(f"\n--- {log.name}\n{log.read_text()[-3000:]}" for log in folder.glob("*.log"))
    assert done.returncode == 0, done.stdout + done.stderr + logs
    answer = done.stdout.replace(" ", "")
    assert '"result":{"scenes":12}' in answer and '"source":"cloud"' in answer, answer + logs
    assert (folder / "data-cloud").is_dir() and (folder / "data-terminal").is_dir()
