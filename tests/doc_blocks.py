"""Fenced code blocks of the markdown docs, for the tests that run them."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import clean_env as conftest_clean_env

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"

# A block the docs mark as not run (a Docker command, an output sample, a signature listing)
# has this comment on the line before its fence, with the reason.
NOT_RUN = re.compile(r"^<!-- not-run: (?P<reason>[^>]+) -->$")
SNIPPET = re.compile(r'^--8<-- "(?P<path>[^"]+)"$')
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)(?P<info>.*)$")


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is, its language, its text, how the page marks it."""

    page: Path
    line: int
    lang: str
    text: str
    not_run: str | None
    title: str | None = None

    @property
    def snippets(self) -> list[str]:
        """The files a block made only of snippet includes pulls in, else []."""
        lines = [line.strip() for line in self.text.splitlines() if line.strip()]
        matches = [SNIPPET.match(line) for line in lines]
        if lines and all(matches):
            return [m["path"] for m in matches if m]
        return []


def blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page``, in order."""
    found: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent = opening["indent"]
        body: list[str] = []
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            body.append(lines[end][len(indent) :])
            end += 1
        previous = next((line for line in reversed(lines[:index]) if line.strip()), "")
        marker = NOT_RUN.match(previous.strip())
        title = re.search(r'title="([^"]+)"', opening["info"])
        found.append(
            Block(
                page=page,
                line=index + 1,
                lang=opening["lang"],
                text="\n".join(body) + "\n",
                not_run=marker["reason"] if marker else None,
                title=title[1] if title else None,
            )
        )
        index = end + 1
    return found


def pages() -> list[Path]:
    """Every markdown page of the docs site."""
    return sorted(DOCS.rglob("*.md"))


def shell_script(page: Path) -> str:
    """The page's ``sh`` blocks that are not marked not-run, joined in order."""
    return "".join(b.text for b in blocks(page) if b.lang == "sh" and b.not_run is None)


def clean_env() -> dict[str, str]:
    """This process's environment without any configuration variable of the developer's shell."""
    return conftest_clean_env(also=("PYTHONPATH", "ROUTE_TABLE_PATH", "SCHEDULES_PATH"))


def fresh_clone(folder: Path) -> Path:
    """A folder that looks like the clone's root to the tutorial: its .venv, nothing else."""
    folder.mkdir()
    (folder / ".venv").symlink_to(ROOT / ".venv")
    return folder


def save_the_files_the_page_shows(page: Path, folder: Path) -> None:
    """Do the "save this as NAME" steps: each block titled with a file name becomes that file."""
    for block in blocks(page):
        if block.title and "/" not in block.title:
            text = "".join((ROOT / path).read_text() for path in block.snippets) or block.text
            (folder / block.title).write_text(text, encoding="utf-8")


def run_page(
    page: Path,
    folder: Path,
    *,
    ports: dict[str, int],
    env: dict[str, str] | None = None,
    timeout_s: float = 100.0,
) -> subprocess.CompletedProcess[str]:
    """Run the page's shell steps in ``folder`` with bash; every process it leaves is killed.

    The only change to the text is the port numbers (8080, 9090 on the page), which become
    free ports so a test never collides with a server already running on this machine; ``env``
    adds variables (``PORT`` for the CLI's default server address). Output goes to files, not
    pipes: servers the steps leave running keep their copies of stdout open.
    """
    script = shell_script(page)
    for written, free in ports.items():
        script = script.replace(written, str(free))
    out_path, err_path = folder.parent / f"{page.stem}.out", folder.parent / f"{page.stem}.err"
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(
            ["bash", "-e", "-c", script],
            cwd=folder,
            env={**clean_env(), **(env or {})},
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout_s)  # only stops a hung run, before pytest-timeout does
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, out_path.read_text(), err_path.read_text()
    )


def config_table(env_example: str) -> str:
    """The markdown table of every variable in ``.env.example``: name, default, meaning."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    comment: list[str] = []
    for raw in env_example.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            comment.append(line.lstrip("#").strip())
            continue
        if "=" not in line:
            comment = []
            continue
        name = line.split("=", 1)[0]
        text = " ".join(comment).replace("|", "\\|")
        meaning, _, default = text.partition("Default:")
        default = default.strip().rstrip(".") or "unset"
        rows.append(f"| `{name}` | {default} | {meaning.strip()} |")
        comment = []
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(config_table((ROOT / ".env.example").read_text(encoding="utf-8")), end="")
