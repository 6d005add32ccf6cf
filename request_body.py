"""Request bodies: strict JSON parsing and the pydantic models of what each endpoint accepts.

Bad input is the caller's fault and is answered 4xx here, before any handler, breaker or store
sees it. JSON is read as RFC 8259 defines it, not as Python's ``json`` module allows:

* NaN, Infinity, -Infinity and numbers that overflow a float (``1e999``) are refused;
* integers past Python's 4300-digit conversion limit are refused (not a ``ValueError`` 500);
* nesting deeper than ``MAX_DEPTH`` is refused (no ``RecursionError`` later, in a handler or
  an encoder);
* strings must be valid Unicode: a lone UTF-16 surrogate (``"\\ud800"``) cannot be written to
  UTF-8 (logs, SQLite, the answer) and is refused.

The models carry ``extra="forbid"``: a typo such as ``"parms"`` is a 422 that names the field and
the allowed ones, never a call with other input. They also document the bodies in OpenAPI.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from envelope import IDEMPOTENCY_KEY_RULE, check_idempotency_key
from errors import InvalidParams, UnsupportedMediaType
from local_batch import MAX_BATCH_ITEMS, MAX_CONCURRENT_CEILING
from service_registry import check_action_name

MAX_DEPTH = 64

# Types a browser can send cross-site without a preflight are "simple": text/plain and
# multipart/form-data have no use here but CSRF, so they are refused. A missing type and
# form-urlencoded (what `curl -d` sends) are read as JSON, so the README's curl lines work.
_JSON_TYPES = ("application/json", "application/x-www-form-urlencoded")
# A JSON string, written as runs of plain characters between escapes: twice as fast in ``re``
# as one alternation per character.
_STRING_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS_RE = re.compile(r"[^\[\]{}]+")
_EMPTY_PAIRS_RE = re.compile(r"\{\}|\[\]")
_LONG_DIGITS = re.compile(rb"[0-9]{19}")  # an integer that may not fit in 64 bits
_ACTION_PATTERN = r"^[a-z][a-z0-9_]{0,63}\.[a-z][a-z0-9_]{0,63}$"


def check_content_type(content_type: str | None) -> None:
    """Refuse a body whose Content-Type is not JSON (or form-urlencoded, for curl)."""
    if not content_type or content_type == "application/json":  # what clients send: no parse
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media in _JSON_TYPES or (media.startswith("application/") and media.endswith("+json")):
        return
    raise UnsupportedMediaType(
        f"the body must be JSON (Content-Type: application/json); got {media[:80]!r}"
    )


def _refuse_constant(name: str) -> Any:
    raise InvalidParams(f"the body is not valid JSON: {name} is not a JSON number (RFC 8259)")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise InvalidParams(f"the body is not valid JSON: {text[:40]} is out of range for a number")
    return value


def _bounded_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # Python refuses to convert integers of more than 4300 digits
        raise InvalidParams(
            f"the body has an integer of {len(text)} digits; at most 4300 are accepted"
        ) from None


def nested_deeper_than(text: str, limit: int) -> bool:
    """Whether the valid JSON ``text`` nests arrays and objects more than ``limit`` deep.

    With strings and all but brackets removed, each pass removes the empty pairs, i.e. the
    innermost containers: text nested ``d`` deep is empty after exactly ``d`` passes. Every
    step runs in C (a Python loop over the brackets took 5 ms for a /batch of 1,000 items).
    """
    brackets = _NOT_BRACKETS_RE.sub("", _STRING_RE.sub("", text))
    for _ in range(limit):
        if not brackets:
            return False
        brackets = _EMPTY_PAIRS_RE.sub("", brackets)
    return bool(brackets)


# One decoder, built once: ``json.loads`` with hooks builds a decoder and its scanner per call.
_DECODER = json.JSONDecoder(
    parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int
)


def parse_json(raw: bytes) -> Any:
    """Parse ``raw`` as strict RFC 8259 JSON in UTF-8; raise ``InvalidParams`` otherwise."""
    if not raw:
        return None
    # orjson first (0.4 µs instead of 3-4 µs for a dispatch body): it is as strict (no NaN, no
    # BOM, no lone surrogate, UTF-8 only) but reads an integer past 64 bits as a float, so a
    # body with 19 digits in a row, and any body it refuses, is read by the decoder below,
    # which keeps every integer exact and says what is wrong. A property test keeps the two
    # paths' answers the same.
    if _LONG_DIGITS.search(raw) is None:
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
        else:
            _check_depth(raw)
            return value
    return _parse_strictly(raw)


def _check_depth(raw: bytes, text: str | None = None) -> None:
    """Refuse valid JSON ``raw`` (``text``: it decoded, if at hand) nested deeper than
    ``MAX_DEPTH``."""
    # Nesting is never deeper than the count of brackets (in strings or not), counted in C: the
    # string-skipping scan runs only past that, on valid JSON, where it is linear.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and nested_deeper_than(
        raw.decode() if text is None else text, MAX_DEPTH
    ):
        raise InvalidParams(f"the body is nested deeper than {MAX_DEPTH} levels")


def _parse_strictly(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidParams(f"the body is not UTF-8: {exc}") from None
    try:
        if text.startswith("\ufeff"):  # as json.loads refuses it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        value = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise InvalidParams(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidParams(f"the body is nested deeper than {MAX_DEPTH} levels") from None
    _check_depth(raw, text)
    # UTF-8 cannot carry a surrogate (the decode above refuses one), so only a \u escape can.
    if b"\\u" in raw:
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidParams(
                "the body holds a lone UTF-16 surrogate (e.g. \\ud800), which is not Unicode text"
            ) from None
    return value


# -- the bodies ----------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DispatchBody(_Body):
    """``POST /dispatch``: one action to route."""

    action: str = Field(
        pattern=_ACTION_PATTERN, description="service.topic", examples=["system.echo"]
    )
    params: dict[str, Any] | None = Field(default=None, examples=[{"hi": 1}])
    force_env: Literal["local", "cloud"] | None = Field(
        default=None, description="run it here or in the cloud, whatever the route table says"
    )
    idempotency_key: str | None = Field(
        default=None,
        min_length=8,
        max_length=200,
        pattern=r"^[!-~]+$",
        description=f"a repeat answers what the first call did; {IDEMPOTENCY_KEY_RULE}",
    )

    not_before: datetime | None = Field(
        default=None,
        description="run it at (not before) this RFC 3339 time with a time zone; kept until then",
        examples=["2030-01-02T09:00:00Z"],
    )
    delay_sec: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        strict=True,
        description="run it this many seconds from now (instead of not_before)",
    )

    @field_validator("idempotency_key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        return None if value is None else check_idempotency_key(value)

    @field_validator("not_before", mode="before")
    @classmethod
    def _not_before(cls, value: Any) -> datetime | None:
        return None if value is None else parse_rfc3339(value)

    @model_validator(mode="after")
    def _one_time(self) -> DispatchBody:
        if self.not_before is not None and self.delay_sec is not None:
            raise ValueError("give not_before or delay_sec, not both")
        return self


def parse_rfc3339(value: Any) -> datetime:
    """An RFC 3339 date-time with a time zone (``2030-01-02T09:00:00Z``), in UTC."""
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 date-time string, e.g. 2030-01-02T09:00:00Z")
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{value[:40]!r} is not an RFC 3339 date-time, e.g. 2030-01-02T09:00:00Z"
        ) from None
    if when.tzinfo is None or "T" not in value.upper():
        raise ValueError(f"{value[:40]!r} needs a date, a time and a time zone (Z or +01:00)")
    try:
        return when.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{value[:40]!r} is out of range") from None


class BatchItem(_Body):
    """One entry of ``POST /batch``."""

    action: str = Field(pattern=_ACTION_PATTERN, examples=["system.echo"])
    params: dict[str, Any] | None = None
    force_env: Literal["local", "cloud"] | None = None


class BatchBody(_Body):
    """``POST /batch``: actions run with bounded concurrency, answered in order.

    Items are checked one by one by the batch runner, which names the item at fault, so
    ``items`` is read as a list here; the OpenAPI document shows each item as a ``BatchItem``.
    """

    items: list[Any] = Field(max_length=MAX_BATCH_ITEMS)
    max_concurrent: int = Field(default=3, ge=1, le=MAX_CONCURRENT_CEILING, strict=True)


class ServeBody(_Body):
    """``POST /api/services/{service}/{topic}``: the params of an action run here."""

    params: dict[str, Any] | None = None


class ServeBatchItem(_Body):
    """One item of ``POST /api/batch``: what ``POST /api/services/{service}/{topic}`` carries
    in its path, body and ``Idempotency-Key`` / ``Cost-Limit`` headers."""

    action: str = Field(pattern=_ACTION_PATTERN, examples=["research.keyword"])
    params: dict[str, Any] | None = None
    idempotency_key: str | None = Field(default=None, description=IDEMPOTENCY_KEY_RULE)
    cost_limit: str | None = Field(
        default=None, description="the highest price (USD) the caller accepts, as Cost-Limit"
    )


class ServeBatchBody(_Body):
    """``POST /api/batch``: actions another instance asks this one to run, answered as lines.

    Items are checked one by one (an item at fault gets its own 4xx line), so ``items`` is read
    as a list here; the OpenAPI document shows each item as a ``ServeBatchItem``.
    """

    items: list[Any] = Field(max_length=MAX_BATCH_ITEMS)


class RetryBody(_Body):
    """``POST /outbox/{id}/retry``: ``rerun`` confirms re-running an item that may have run."""

    rerun: bool = Field(default=False, strict=True)


REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    DispatchBody,
    BatchItem,
    BatchBody,
    ServeBody,
    ServeBatchItem,
    ServeBatchBody,
    RetryBody,
)

Body = TypeVar("Body", bound=BaseModel)


def read_body(raw: bytes, content_type: str | None, model: type[Body]) -> Body:
    """Parse and validate a request body; raise ``InvalidParams`` naming the field at fault."""
    check_content_type(content_type)
    data = parse_json(raw)
    if data is None and model in (ServeBody, RetryBody):
        data = {}
    if not isinstance(data, dict):
        example = '{"action": "system.echo"}' if _names_an_action(model) else '{"params": {}}'
        raise InvalidParams(f"the body must be a JSON object, e.g. {example}")
    if _names_an_action(model):
        # The name first: it is in every answer and log line, so it must be clean before use.
        if "action" not in data:
            raise InvalidParams("'action' is required: a 'service.topic' string")
        check_action_name(data["action"])
    try:
        # What model_validate runs, less its Python wrapper and keywords (~0.5 µs a body).
        return model.__pydantic_validator__.validate_python(data)  # type: ignore[no-any-return]
    except ValidationError as exc:
        raise InvalidParams(explain(exc, model)) from None


@functools.cache
def _names_an_action(model: type[BaseModel]) -> bool:
    # Cached: pydantic's model_fields is a property that costs ~1 µs per read.
    return "action" in model.model_fields


def explain(exc: ValidationError, model: type[BaseModel]) -> str:
    """Say which field is wrong and why, in one line (unknown fields list the allowed ones)."""
    allowed = ", ".join(model.model_fields)
    reasons = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "body"
        if error["type"] == "extra_forbidden":
            reasons.append(f"unknown field {where!r}; allowed fields: {allowed}")
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
            reasons.append(f"{where!r}: {message}")
    return "; ".join(reasons)[:600]
