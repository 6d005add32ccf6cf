"""The exception tree: its drawing in the module docstring is the truth, and storage faults."""

from __future__ import annotations

import errno
import re
import sqlite3

import pytest

import errors
from errors import (
    HTTP_STATUS_BY_CODE,
    ActionError,
    CloudUnavailable,
    ErrorCode,
    EverReachError,
    StorageUnavailable,
    UnknownAction,
    storage_fault,
)

pytestmark = pytest.mark.prd200

# "    │   ├── BadRequest               400  invalid_params (a Host header ...)"
_NODE = re.compile(
    r"^(?P<indent>[ │]*)[├└]── (?P<name>\w+)\s+(?:(?P<status>\d{3})\s+(?P<code>\w+))?"
)


def drawn_tree() -> list[tuple[str, str, int | None, str | None]]:
    """(class, parent, status, code) for every node the module docstring draws."""
    assert errors.__doc__ is not None
    lines = [line[4:] for line in errors.__doc__.splitlines() if line.startswith("    ")]
    root = lines[0].split()[0]
    parents = [root]
    nodes = []
    for line in lines[1:]:
        match = _NODE.match(line)
        if match is None:
            continue
        depth = len(match["indent"]) // 4
        del parents[depth + 1 :]
        status = int(match["status"]) if match["status"] else None
        nodes.append((match["name"], parents[depth], status, match["code"]))
        parents.append(match["name"])
    return nodes


def test_the_docstring_draws_a_tree_rooted_at_everreach_error() -> None:
    assert errors.__doc__ is not None and errors.__doc__.splitlines()[2].split()[0] == (
        EverReachError.__name__
    )
    assert len(drawn_tree()) >= 20


@pytest.mark.parametrize(("name", "parent", "status", "code"), drawn_tree())
def test_each_drawn_exception_exists_under_its_drawn_parent_with_its_status_and_code(
    name: str, parent: str, status: int | None, code: str | None
) -> None:
    cls = getattr(errors, name)
    assert cls.__bases__ == (getattr(errors, parent),)
    if status is not None:
        assert cls.http_status == status
        assert cls.code == code


def every_action_error() -> list[type[ActionError]]:
    found: list[type[ActionError]] = []
    todo: list[type[ActionError]] = [ActionError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [cls for cls in found if cls.__module__ == "errors"]


@pytest.mark.parametrize("cls", every_action_error(), ids=lambda cls: cls.__name__)
def test_every_action_error_speaks_an_enum_code_and_an_error_status(
    cls: type[ActionError],
) -> None:
    assert isinstance(cls.code, ErrorCode)
    assert 400 <= cls.http_status <= 599
    assert cls.__name__ in (errors.__doc__ or "")  # drawn: the tree leaves nothing out


def test_the_status_table_gives_each_code_the_status_of_the_class_that_introduces_it() -> None:
    """A subclass may refine the status (Forbidden 403 under Unauthorized 401), not the table."""
    for cls in every_action_error():
        parent = cls.__mro__[1]
        introduces = cls is not ActionError and getattr(parent, "code", None) is not cls.code
        if introduces and cls.code in HTTP_STATUS_BY_CODE:
            assert HTTP_STATUS_BY_CODE[cls.code] == cls.http_status, cls.__name__


def test_an_action_error_carries_its_fields_and_never_ran_defaults_by_class() -> None:
    error = CloudUnavailable("cloud answered 503", attempts=3, retry_after_s=1)
    assert (error.detail, error.attempts, error.never_ran) == ("cloud answered 503", 3, False)
    assert error.extra == {"retry_after_s": 1}
    assert str(error) == "cloud answered 503"
    assert UnknownAction("nope").never_ran is True
    assert CloudUnavailable("refused", never_ran=True).never_ran is True


@pytest.mark.parametrize(
    ("fault", "is_storage"),
    [
        (sqlite3.OperationalError("database or disk is full"), True),
        (sqlite3.OperationalError("attempt to write a readonly database"), True),
        (sqlite3.OperationalError("unable to open database file"), True),
        (sqlite3.DatabaseError("disk I/O error"), True),
        (sqlite3.OperationalError("no such table: x"), False),
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EROFS, "Read-only file system"), True),
        (OSError(errno.EACCES, "Permission denied"), True),
        (OSError(errno.ENOENT, "No such file or directory"), False),
        (ValueError("database or disk is full"), False),
    ],
)
def test_storage_fault_names_disk_and_database_faults_only(
    fault: BaseException, is_storage: bool
) -> None:
    mapped = storage_fault(fault)
    assert (mapped is not None) is is_storage
    if mapped is not None:
        assert isinstance(mapped, StorageUnavailable) and mapped.never_ran
        assert "DATA_DIR" in mapped.detail and len(mapped.detail) <= 400
