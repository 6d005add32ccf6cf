"""cli_serve: what ``everreach serve`` checks and reports before and while uvicorn starts.

Everything here runs in this process: the checks before binding, and a start-up that fails in
the lifespan (uvicorn runs and exits in-process). Serving until interrupted is tested on a real
``everreach serve`` process in tests/test_cli.py.
"""

from __future__ import annotations

import gc
import io
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from cli import build_parser
from cli_client import CliFailure, Io
from cli_serve import _collector_paused, _DropErrorsAfterFailure, cmd_serve, port_problem
from config.hybrid_config import HybridConfig
from errors import ConfigError
from tests.conftest import free_port


@pytest.fixture
def taken() -> Iterator[int]:
    """A loopback port another socket listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture(autouse=True, scope="module")
def _config_port_is_taken() -> Iterator[None]:
    """The configs' own PORT is one nobody can serve on, so a test can never start serving
    there: a check that let it through fails on that port instead of hanging in uvicorn."""
    global CONFIG_PORT
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        CONFIG_PORT = int(sock.getsockname()[1])
        yield


CONFIG_PORT = 0


def serve(config: HybridConfig, *argv: str) -> tuple[int, str]:
    err = io.StringIO()
    args = build_parser().parse_args(["serve", *argv])
    code = cmd_serve(args, config, Io(Console(file=io.StringIO()), Console(file=err)))
    return code, err.getvalue()


def config_of(tmp_path: Path, **variables: str) -> HybridConfig:
    return HybridConfig.from_mapping(
        {
            "DATA_DIR": str(tmp_path / "data"),
            "SCHEDULES_PATH": str(tmp_path / "s.json"),
            "PORT": str(CONFIG_PORT),
            **variables,
        }
    )


# -- port_problem ----------------------------------------------------------------------------


def test_a_free_port_has_no_problem() -> None:
    assert port_problem("127.0.0.1", free_port()) is None


def test_a_port_in_use_says_how_to_find_the_other_process(taken: int) -> None:
    assert port_problem("127.0.0.1", taken) == (
        f"port {taken} is in use (another process listens on 127.0.0.1:{taken}): serve on "
        f"another one with PORT={taken + 1} or --port, or stop the other process (find it "
        f"with: lsof -i :{taken})"
    )


def test_the_port_suggested_after_65535_is_8080() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", 65535))
        except OSError:
            pytest.skip("port 65535 is taken on this machine")
        sock.listen()
        problem = port_problem("127.0.0.1", 65535)
    assert problem is not None and "with PORT=8080 or --port" in problem


@pytest.mark.skipif(
    os.geteuid() == 0 or not Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").exists(),
    reason="root may bind any port",
)
def test_a_privileged_port_says_to_use_one_above_1023() -> None:
    assert port_problem("127.0.0.1", 80) == (
        "port 80 needs privileges on this machine: use a port above 1023"
    )


def test_an_address_this_machine_does_not_have_names_host_and_port() -> None:
    problem = port_problem("192.0.2.1", 8080)  # TEST-NET-1: never a local address
    assert problem is not None
    assert problem.startswith("cannot listen on 192.0.2.1:8080: ")
    assert problem.endswith("(check HOST and PORT)")
    assert "Errno" not in problem


def test_an_ipv6_host_is_checked_as_ipv6() -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    assert port_problem("::1", free_port()) is None
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind(("::1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        problem = port_problem("::1", port)
    assert problem is not None and problem.startswith(f"port {port} is in use")


# -- cmd_serve before uvicorn ----------------------------------------------------------------


def test_a_public_host_without_a_token_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        serve(config_of(tmp_path), "--host", "0.0.0.0", "--port", str(free_port()))
    message = str(caught.value)
    assert "HOST=0.0.0.0 would expose /dispatch beyond this machine" in message
    assert "LOCAL_API_TOKEN is not set; set LOCAL_API_TOKEN" in message
    assert "or serve on --host 127.0.0.1" in message


def test_a_public_host_from_the_config_is_refused_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"HOST=0\.0\.0\.0 would expose"):
        serve(config_of(tmp_path, HOST="0.0.0.0", PORT=str(free_port())))


def test_a_port_in_use_is_one_line_before_uvicorn_starts(tmp_path: Path, taken: int) -> None:
    with pytest.raises(CliFailure) as caught:
        serve(config_of(tmp_path), "--port", str(taken))
    assert str(caught.value).startswith(f"port {taken} is in use")


def test_arguments_win_over_the_config(tmp_path: Path, taken: int) -> None:
    # The config says a public host without a token and a free port; the arguments say
    # loopback and the taken port: the refusal is about the taken port, so both were applied.
    config = config_of(tmp_path, HOST="0.0.0.0", PORT=str(free_port()))
    with pytest.raises(CliFailure, match=rf"^port {taken} is in use \(another process listens"):
        serve(config, "--host", "127.0.0.1", "--port", str(taken))


def test_a_token_lets_a_public_host_through_to_the_port_check(tmp_path: Path, taken: int) -> None:
    # PORT names another taken port: were --port ignored, that one would be refused instead.
    config = config_of(
        tmp_path, HOST="0.0.0.0", PORT=str(taken), LOCAL_API_TOKEN="serve-token-1234"
    )
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as wildcard:
        wildcard.bind(("0.0.0.0", 0))
        wildcard.listen()
        port = wildcard.getsockname()[1]
        with pytest.raises(CliFailure, match=rf"^port {port} is in use"):
            serve(config, "--port", str(port))


# -- cmd_serve: a start-up that fails in the lifespan ----------------------------------------


def test_a_config_error_in_the_lifespan_is_raised_as_itself_not_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "s.json").write_text("{not json", encoding="utf-8")
    uvicorn_log = logging.getLogger("uvicorn.error")
    filters_before = list(uvicorn_log.filters)
    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigError) as caught:
        serve(config_of(tmp_path), "--port", str(free_port()))
    assert str(caught.value).startswith("SCHEDULES_PATH")
    assert not [
        r for r in caplog.records if r.name.startswith("uvicorn") and r.levelno >= logging.ERROR
    ]  # uvicorn's own traceback of it was dropped
    assert uvicorn_log.filters == filters_before  # the filter is taken off again
    assert gc.isenabled()  # the collector, paused for the start-up, runs again


def test_the_collector_is_paused_until_resumed_and_left_off_if_it_was_off() -> None:
    assert gc.isenabled()
    with _collector_paused() as resume:
        assert not gc.isenabled()
        resume()  # the server started
        assert gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), _collector_paused():
        raise RuntimeError("start-up failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with _collector_paused() as resume:
            resume()
        assert not gc.isenabled()  # someone else turned it off: theirs to turn on
    finally:
        gc.enable()


def test_the_error_filter_drops_errors_only_after_a_failure() -> None:
    failures: list[BaseException] = []
    quiet = _DropErrorsAfterFailure(failures)

    def record(level: int) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", level, __file__, 1, "m", None, None)

    assert quiet.filter(record(logging.ERROR))  # nothing failed yet: errors pass
    failures.append(ConfigError("bad"))
    assert not quiet.filter(record(logging.ERROR))
    assert not quiet.filter(record(logging.CRITICAL))
    assert quiet.filter(record(logging.INFO))  # information still passes
