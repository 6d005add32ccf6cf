"""The docs stay true: the site builds strictly, every example runs, the references are complete.

The tutorial's and the README's shell blocks run in tests/test_tutorial.py and
tests/test_readme.py; this file checks every other block and the generated tables.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import json
import os
import re
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

import service_registry
from action_classifier import ActionClassifier
from config.hybrid_config import HybridConfig
from envelope import Envelope
from errors import ErrorCode, Offline, Source
from local_server import create_app
from rate_limits import RateLimits
from route_table import RouteTable, markdown
from schedules import load_schedules
from service_registry import ServiceRegistry, idempotency_key_scope
from tests.doc_blocks import DOCS, ROOT, Block, blocks, config_table, pages

pytestmark = pytest.mark.prd200

EXAMPLES = DOCS / "examples"
README = ROOT / "README.md"
# Pages whose sh and text blocks a test runs word for word (tests/test_tutorial.py).
RUN_WORD_FOR_WORD = {DOCS / "tutorial.md", DOCS / "pacing-and-alerts.md"}


def page(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def between(text: str, begin: str, end: str) -> str:
    return text.split(begin, 1)[1].split(end, 1)[0]


# -- the site ---------------------------------------------------------------------------------


@pytest.mark.process
def test_the_site_builds_strictly_so_a_broken_link_or_anchor_fails(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).with_name("mkdocs")
    if not mkdocs.exists():
        if os.environ.get("CI"):
            pytest.fail("mkdocs is not installed: make venv installs requirements-dev.txt")
        pytest.skip("mkdocs is not installed")
    built = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert (tmp_path / "site" / "tutorial" / "index.html").exists()
    # Snippet includes (pymdownx.snippets), if a page uses one, are expanded, not shown raw.
    tutorial = (tmp_path / "site" / "tutorial" / "index.html").read_text(encoding="utf-8")
    assert "notes.send" in tutorial and "--8&lt;--" not in tutorial


def test_every_page_is_in_the_navigation_or_is_the_entry_page() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for path in pages():
        name = path.relative_to(DOCS).as_posix()
        assert name in nav, f"{name} is neither in mkdocs.yml's nav nor not_in_nav"


def test_the_entry_page_links_to_every_page() -> None:
    entry = page("hybrid-orchestrator.md")
    for path in pages():
        name = path.relative_to(DOCS).as_posix()
        if name != "hybrid-orchestrator.md":
            assert f"]({name}" in entry, f"docs/hybrid-orchestrator.md does not link to {name}"


@pytest.mark.parametrize(
    ("name", "heading"),
    [
        ("index.md", "## Quickstart"),
        ("index.md", "## Architecture"),
        ("index.md", "### Where does X live"),
        ("index.md", "### Which way dependencies point"),
        ("routing.md", "## The routing table"),
        ("faq.md", "# FAQ"),
        ("benchmarks.md", "# Benchmarks"),
        ("tutorial.md", "# A hybrid pair in five minutes"),
    ],
)
def test_the_docs_have_the_sections_a_newcomer_needs(name: str, heading: str) -> None:
    assert heading in page(name).splitlines()


# Anything that points outside the project: requirements it does not ship, a machine's paths.
OUTSIDE = re.compile(r"\bPRD\b|\bthe issue\b|\bthe brief\b|(?<![\w.])/(?:work|home|root)/")
MARKDOWN_NAME = re.compile(r"[\w.-]+\.md\b")
WRITTEN_BY_A_COMMAND = {"latest.md"}  # bench/results/latest.md, written by `python -m bench`


def project_files(suffix: str) -> list[Path]:
    """The project's files ending in ``suffix``, outside hidden folders and the built site."""
    found: list[Path] = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d != "site"]
        found += [Path(folder, name) for name in files if name.endswith(suffix)]
    return found


def project_markdown_names() -> set[str]:
    return WRITTEN_BY_A_COMMAND | {path.name for path in project_files(".md")}


@pytest.mark.parametrize("path", [*pages(), README], ids=lambda p: p.name)
def test_no_doc_line_refers_to_anything_outside_the_project(path: Path) -> None:
    shipped = project_markdown_names()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        assert not OUTSIDE.search(line), f"{path.name}:{number}: {line}"
        for name in MARKDOWN_NAME.findall(line):
            assert name in shipped, (
                f"{path.name}:{number} names {name}, which is not in the project"
            )


def test_no_code_comment_names_a_document_outside_the_project() -> None:
    shipped = project_markdown_names()
    for path in project_files(".py"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for name in MARKDOWN_NAME.findall(line):
                assert name in shipped, f"{path.relative_to(ROOT)}:{number} names {name}"


# -- every code block is run, or says why not --------------------------------------------------


def all_blocks() -> list[Block]:
    return [block for path in pages() for block in blocks(path)]


def output_of(block: Block) -> str | None:
    """The example a text block is the output of (``<!-- output-of: FILE -->``), else None."""
    lines = block.page.read_text(encoding="utf-8").splitlines()[: block.line - 1]
    previous = next((line for line in reversed(lines) if line.strip()), "")
    found = re.fullmatch(r"<!-- output-of: (\S+) -->", previous.strip())
    return found[1] if found else None


def example_files() -> list[Path]:
    """The files of docs/examples/ (not the __pycache__ that importing one leaves there)."""
    return sorted(path for path in EXAMPLES.iterdir() if path.is_file())


def test_every_code_block_is_run_by_a_test_or_marked_not_run() -> None:
    # tests/test_readme.py runs the README's sh blocks; a page may show the same commands.
    readme_runs = {b.text for b in blocks(README) if b.lang == "sh" and b.not_run is None}
    examples = {path.read_text(encoding="utf-8") for path in example_files()}
    unaccounted = [
        f"{block.page.relative_to(ROOT)}:{block.line}"
        for block in all_blocks()
        if not block.snippets
        and block.not_run is None
        and output_of(block) is None
        and not (block.page in RUN_WORD_FOR_WORD and block.lang in ("sh", "text"))
        and block.text not in readme_runs
        and block.text not in examples
    ]
    assert not unaccounted, (
        "run these blocks in a test, make them copies of files in docs/examples/, or mark them "
        "<!-- not-run: why -->: " + ", ".join(unaccounted)
    )


def test_every_example_file_is_shown_in_a_page_and_every_included_file_exists() -> None:
    included = {path for block in all_blocks() for path in block.snippets}
    for path in included:
        assert (ROOT / path).is_file(), f"a page includes {path}, which does not exist"
    shown_inline = {block.text for block in all_blocks()}
    for example in example_files():
        name = example.relative_to(ROOT).as_posix()
        assert name in included or example.read_text(encoding="utf-8") in shown_inline, (
            f"no page shows {name}"
        )


def test_the_tutorials_files_are_the_tested_examples() -> None:
    titled = {b.title: b.text for b in blocks(DOCS / "tutorial.md") if b.title}
    for name in ("my_services.py", "my_routes.json"):
        assert titled[name] == (EXAMPLES / name).read_text(encoding="utf-8")


@pytest.mark.process
def test_the_output_blocks_are_what_their_examples_print(tmp_path: Path) -> None:
    checked = 0
    for block in all_blocks():
        example = output_of(block)
        if example is None:
            continue
        ran = subprocess.run(
            [sys.executable, str(ROOT / example)],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout == block.text, f"{block.page.name}:{block.line} shows other output"
        checked += 1
    assert checked >= 1


# -- the examples, one by one ------------------------------------------------------------------


@pytest.fixture
def declared(monkeypatch: pytest.MonkeyPatch) -> None:
    """A private @register table, so an example's handlers vanish after the test."""
    monkeypatch.setattr(service_registry, "_DECLARED", dict(service_registry._DECLARED))


def registry_of(name: str, monkeypatch: pytest.MonkeyPatch) -> ServiceRegistry:
    monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        return ServiceRegistry.from_modules([name], app_dir=EXAMPLES)
    finally:
        sys.modules.pop(name, None)


@pytest.mark.usefixtures("declared")
async def test_the_tutorials_services_send_once_per_call_and_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    registry = registry_of("my_services", monkeypatch)
    assert await registry.dispatch("notes.count", {}) == {"count": 0}
    sent = await registry.dispatch("notes.send", {"to": "alice", "text": "hello"})
    assert sent == {"sent": "alice: hello"}
    assert await registry.dispatch("notes.count", {}) == {"count": 1}
    assert (tmp_path / "sent.txt").read_text(encoding="utf-8") == "alice: hello\n"


@pytest.mark.usefixtures("declared")
async def test_the_readmes_services_module_is_the_example_and_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    example = (EXAMPLES / "video_services.py").read_text(encoding="utf-8")
    shown = [b.text for b in blocks(README) if b.lang == "python"]
    assert shown == [example], "README's python block must be docs/examples/video_services.py"
    monkeypatch.setattr(sys, "path", list(sys.path))
    registry = registry_of("video_services", monkeypatch)
    assert await registry.dispatch("content.analyze_video", {}) == {"scenes": 12}


@pytest.mark.usefixtures("declared")
async def test_the_idempotent_handler_example_sends_once_per_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    registry = registry_of("idempotent_dm", monkeypatch)
    with idempotency_key_scope("dm-alice-0001"):
        first = await registry.dispatch("dm.send", {"to": "alice"})
        replay = await registry.dispatch("dm.send", {"to": "someone else"})
    with idempotency_key_scope("dm-bob-00002"):
        other = await registry.dispatch("dm.send", {"to": "bob"})
    assert first == replay == {"sent_to": "alice"}, "a replay must answer as the first call"
    assert other == {"sent_to": "bob"}, "another key is another send"


@pytest.mark.parametrize("name", ["route_table.json", "my_routes.json"])
def test_the_route_table_examples_load(name: str) -> None:
    table = RouteTable.load(EXAMPLES / name)
    assert table.get("notes.send" if name == "my_routes.json" else "dm.send").side_effect


def test_the_tutorials_route_table_queues_notes_and_never_runs_them_on_the_terminal() -> None:
    table = RouteTable.load(EXAMPLES / "my_routes.json")
    send, count = table.get("notes.send"), table.get("notes.count")
    assert (send.preferred_env.value, send.fallback_env.value) == ("cloud", "none")
    assert (count.side_effect, count.fallback_env.value) == (False, "local")


def test_the_rate_limits_example_loads_with_exact_entries_before_families() -> None:
    limits = RateLimits.load(EXAMPLES / "rate_limits.json")
    assert len(limits) == 3
    message, scan, send = (
        limits.limit_for(a) for a in ("linkedin.message", "upwork.scan", "dm.send")
    )
    assert message is not None and str(message.quiet_hours) == "23:00-07:00"
    assert scan is not None and scan.key == "upwork.*" and (scan.max, scan.per_sec) == (10, 60)
    assert send is not None and (send.max, send.per_sec) == (3, 5)


def test_the_schedules_example_loads() -> None:
    schedules = load_schedules(EXAMPLES / "schedules.json")
    assert [s.id for s in schedules] == ["morning-research", "dm-poll"]


@pytest.mark.process
def test_the_backup_example_copies_a_live_wal_database(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    live = sqlite3.connect(data / "hybrid.sqlite3")
    live.execute("PRAGMA journal_mode=WAL")
    live.execute("CREATE TABLE t (n INTEGER)")
    live.executemany("INSERT INTO t VALUES (?)", [(n,) for n in range(100)])
    live.commit()  # still in the -wal file: the server has not checkpointed
    try:
        ran = subprocess.run(
            [sys.executable, str(EXAMPLES / "backup_sqlite.py"), str(data), str(tmp_path / "bk")],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        live.close()
    assert ran.returncode == 0, ran.stderr
    copy = sqlite3.connect(tmp_path / "bk" / "hybrid.sqlite3")
    try:
        assert copy.execute("SELECT count(*) FROM t").fetchone() == (100,)
    finally:
        copy.close()


@pytest.fixture
def client(tmp_path: Path) -> Any:
    config = HybridConfig.from_mapping(
        {
            "DATA_DIR": str(tmp_path / "data"),
            "EVERREACH_CLOUD_KEY": "s3cret-key",
            "ALLOWED_HOSTS": "testserver",  # the Host the in-process test client sends
        }
    )
    with TestClient(create_app(config)) as test_client:
        yield test_client


def example(name: str) -> Any:
    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))


def test_the_dispatch_and_batch_examples_are_accepted(client: TestClient) -> None:
    answer = client.post("/dispatch", json=example("dispatch_request.json"))
    assert answer.status_code == 200 and answer.json()["result"] == {"hi": 1}
    batch = client.post("/batch", json=example("batch_request.json")).json()
    assert [r["ok"] for r in batch["results"]] == [True, True, False]
    assert batch["results"][2]["error"] == "unknown_action"


def test_the_sync_state_examples_are_what_the_endpoints_take_and_give(client: TestClient) -> None:
    key = {"Authorization": "Bearer s3cret-key"}
    pushed = client.post("/api/sync/state", json=example("sync_state_changes.json"), headers=key)
    assert pushed.json() == {"applied": 1, "rejected": 0}
    state = client.get("/api/sync/state", headers=key).json()
    shown = example("sync_state.json")
    assert state.keys() == shown.keys()
    (entry,) = state["state"].values()
    (shown_entry,) = shown["state"].values()
    assert entry.keys() == shown_entry.keys()


@pytest.mark.parametrize(
    ("name", "made"),
    [
        (
            "envelope_ok.json",
            Envelope.success("research.keyword", {}, source=Source.CLOUD, request_id="r"),
        ),
        (
            "envelope_queued.json",
            Envelope(ok=True, action="dm.send", source=Source.OUTBOX, queued=True, outbox_id="x"),
        ),
        (
            "envelope_deferred.json",
            Envelope.deferred(
                "dm.send",
                outbox_id="x",
                request_id="r",
                deferred_until=datetime.now(UTC),
                detail="kept",
            ),
        ),
        (
            "envelope_error.json",
            dataclasses.replace(
                Envelope.failure("a.b", Offline("x"), source=None, request_id="r"),
                cached={},
                cached_at="2025-03-01T12:00:00+00:00",
            ),
        ),
    ],
)
def test_the_envelope_examples_have_the_fields_the_code_writes(name: str, made: Envelope) -> None:
    assert example(name).keys() == made.to_dict().keys()


# -- generated and complete references ---------------------------------------------------------


def test_the_routing_table_is_generated_from_route_table_json() -> None:
    shown = between(page("routing.md"), "<!-- routes:begin -->\n", "<!-- routes:end -->")
    expected = markdown(RouteTable.load(), lambda a: ActionClassifier().classify(a).value)
    assert shown == expected, "regenerate the table with: python -m route_table"


def defaults(table: str) -> dict[str, str]:
    """``{variable: default}`` from the rows of a configuration table."""
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| `")]
    return {row[0].strip("| `"): row[1] for row in rows}


def test_the_configuration_table_has_every_variable_of_env_example_with_its_default() -> None:
    # Names and defaults, not the wording: a reworded comment in .env.example is not an error.
    shown = between(
        page("reference/configuration.md"), "<!-- config:begin -->\n", "<!-- config:end -->"
    )
    expected = config_table((ROOT / ".env.example").read_text(encoding="utf-8"))
    assert defaults(shown) == defaults(expected), (
        "regenerate the table with: python -m tests.doc_blocks"
    )


def test_the_configuration_reference_lists_every_variable() -> None:
    text = page("reference/configuration.md")
    for field in HybridConfig.model_fields:
        assert f"| `{field.upper()}` |" in text, f"{field.upper()} is not documented"


def test_the_envelope_reference_lists_every_error_code_and_source() -> None:
    text = page("reference/envelope.md")
    for value in [*ErrorCode, *Source]:
        assert f"| `{value.value}` |" in text, f"{value.value} is not in reference/envelope.md"
    for field in Envelope.success("a.b", None, source=Source.LOCAL, request_id="r").to_dict():
        assert f"`{field}`" in text, f"envelope field {field} is not documented"


def test_the_http_reference_lists_every_endpoint(tmp_path: Path) -> None:
    text = page("reference/http-api.md")
    app = create_app(HybridConfig.from_mapping({"DATA_DIR": str(tmp_path)}))
    for route in app.routes:
        if isinstance(route, APIRoute):
            for method in sorted(route.methods or ()):
                assert f"`{method} {route.path}`" in text, f"{method} {route.path} is missing"


def top_level_modules() -> set[str]:
    """Every module of the project: the ``.py`` files at the root and in ``config/``."""
    found = {path.name for path in ROOT.glob("*.py")}
    return found | {f"config/{path.name}" for path in (ROOT / "config").glob("*.py")} - {
        "config/__init__.py"
    }


def where_things_live() -> list[str]:
    """The first cells of index.md's "Where does X live" table, one per row."""
    section = between(page("index.md"), "### Where does X live\n", "\n### ")
    return [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| `")]


def test_where_does_x_live_names_every_module_of_the_project() -> None:
    named = {name for cell in where_things_live() for name in re.findall(r"`([^`]+)`", cell)}
    missing = sorted(top_level_modules() - named)
    assert not missing, f"index.md's Where does X live table does not name {missing}"


def test_where_does_x_live_names_no_file_that_does_not_exist() -> None:
    named = [name for cell in where_things_live() for name in re.findall(r"`([^`]+)`", cell)]
    assert named, "index.md's Where does X live table has no rows"
    gone = sorted(name for name in named if not (ROOT / name).is_file())
    assert not gone, f"index.md's Where does X live table names files that do not exist: {gone}"


NOT_WIRED: set[str] = set()


def dependency_rows() -> list[set[str]]:
    """index.md's dependency picture, top row first: the modules of each row."""
    section = between(page("index.md"), "### Which way dependencies point\n", "\n## ")
    picture = between(section, "```text\n", "```")
    rows: list[set[str]] = [set()]
    for line in picture.splitlines():
        if line.strip() == "▼":
            rows.append(set())
        rows[-1] |= set(re.findall(r"[\w/]+\.py\b", line))
    return [row for row in rows if row]


def project_imports(path: Path, modules: set[str]) -> set[str]:
    """The project's modules ``path`` imports, anywhere in it, as file names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = (
            [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else [node.module]
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
            else []
        )
        for name in names:
            file = name.replace(".", "/") + ".py"
            if file in modules:
                found.add(file)
    return found


def test_the_dependency_picture_has_every_wired_module_and_no_import_points_up() -> None:
    rows = dependency_rows()
    pictured = set().union(*rows)
    modules = top_level_modules()
    assert pictured == modules - NOT_WIRED, (
        f"missing: {sorted(modules - NOT_WIRED - pictured)}; not modules or not wired: "
        f"{sorted(pictured - (modules - NOT_WIRED))}"
    )
    for height, row in enumerate(rows):
        above = set().union(set(), *rows[:height])
        for module in sorted(row):
            upward = project_imports(ROOT / module, modules) & above
            assert not upward, f"{module} imports {sorted(upward)}, drawn above it in index.md"


# The committed runs, under bench/results/.
COMMITTED_RUNS = (
    "baseline.md",
    "before-a353ab0.md",
    "after.md",
    "third-pass.md",
    "fourth-pass.md",
    "fifth-pass.md",
    "sixth-pass.md",
)


def test_every_benchmark_figure_is_from_a_committed_run_under_its_command() -> None:
    """The benchmark pages show only rows of the committed runs (bench/results/), under
    commands."""
    runs = {
        name: (ROOT / "bench" / "results" / name).read_text(encoding="utf-8")
        for name in COMMITTED_RUNS
    }
    # the latest pass, the earlier ones
    pages = (
        page("benchmarks.md") + page("benchmark-history.md") + page("benchmark-history-cloud.md")
    )
    rows = [line for line in pages.splitlines() if line.startswith("| ")]
    figures = [row for row in rows if any(ch.isdigit() for ch in row.split(" | ", 1)[-1])]
    assert figures, "benchmarks.md shows no figure"
    for row in figures:
        if row.startswith("| `bench_"):  # the table of what each bench measures
            continue
        assert any(row in run for run in runs.values()), (
            f"benchmarks.md shows a row of no committed run ({', '.join(COMMITTED_RUNS)}): {row}"
        )
    for name in ("baseline.md", "after.md"):
        for command in re.findall(r"`(python -m bench\.bench_\w+)`", runs[name]):
            assert f"`{command}`" in pages, f"the benchmark pages lack {command}"
        assert f"bench/results/{name}" in pages


def test_the_quickstart_is_the_readmes_which_a_test_runs() -> None:
    """index.md's commands are README's, run against a real server by tests/test_readme.py."""
    quick = [b.text for b in blocks(DOCS / "index.md") if b.lang == "sh" and b.not_run is None]
    readme = [b.text for b in blocks(README) if b.lang == "sh" and b.not_run is None]
    assert quick == readme[:1]


def test_a_docs_example_is_importable_as_a_module() -> None:
    # The examples import project modules only, so they run wherever the project does.
    for path in EXAMPLES.glob("*.py"):
        source = path.read_text(encoding="utf-8")
        for module in re.findall(r"^(?:from|import) ([\w.]+)", source, re.MULTILINE):
            root = module.split(".")[0]
            assert root == "__future__" or importlib.util.find_spec(root), (path.name, module)


def test_every_python_file_the_docs_name_exists() -> None:
    """A renamed or removed module fails here until the docs follow."""
    shipped = {path.name for path in project_files(".py")}
    for path in [*pages(), README]:
        for name in re.findall(r"[\w./-]+\.py\b", path.read_text(encoding="utf-8")):
            found = (ROOT / name).exists() if "/" in name else name in shipped
            assert found, f"{path.name} names {name}, which is not in the project"
