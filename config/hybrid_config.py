"""HybridConfig: the one place environment variables and ``.env`` are read.

Every configuration variable (``.env.example`` lists them) is a field here (lower-cased name),
with its default. A wrong value stops start-up with a ``ConfigError`` that names the variable
and says what is allowed.
``HybridConfig.load()`` reads ``.env`` overlaid by the environment; tests build configs from
dicts with ``HybridConfig.from_mapping({...})``, which reads neither ``os.environ`` nor ``.env``
(pydantic-settings' own sources are switched off: they would make every construction read both).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from datetime import tzinfo
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from errors import ConfigError, Env

_TIME_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)\Z")
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_ACTION_RE = re.compile(r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*\Z")
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
_SECRET_FIELDS = frozenset(
    {
        "everreach_cloud_key",
        "local_api_token",
        "database_url",
        "supabase_db_url",
        "supabase_service_key",
        "openai_api_key",
        "anthropic_api_key",
        "redis_url",
        "alert_webhook_url",
    }
)
# Plain-str URL fields whose userinfo may hold credentials: redacted in repr() and errors.
_URL_FIELDS = frozenset(
    {"cloud_endpoint", "local_endpoint", "redis_url", "supabase_url", "vector_db_url"}
)


def redact_url(url: str | None) -> str | None:
    """Return ``url`` with any user:password part replaced by ``***`` (None stays None).

    The one redaction of URLs for answers, pages, logs and errors: the whole userinfo goes, as a
    lone user name may itself be a token (``https://token@host``).
    """
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


def _check_url(name: str, value: str | None, schemes: tuple[str, ...]) -> str | None:
    if value is None or value.strip() == "":
        return None
    value = value.strip()
    parts = urlsplit(value)
    # unix:///path/to/redis.sock names a socket file, not a host.
    where = parts.path if parts.scheme == "unix" else parts.hostname
    if parts.scheme not in schemes or not where:
        allowed = " or ".join(f"{s}://" for s in schemes)
        socket = " (unix://: a socket path)" if "unix" in schemes else ""
        raise ValueError(f"{name} must be a URL starting with {allowed} and naming a host{socket}")
    return value.rstrip("/") if parts.scheme in ("http", "https") else value


class HybridConfig(BaseSettings):
    """Validated, frozen settings of one orchestrator instance."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, case_sensitive=False)

    everreach_env: Env = Env.LOCAL
    cloud_endpoint: str | None = None
    local_endpoint: str | None = None
    everreach_cloud_key: SecretStr | None = None
    local_api_token: SecretStr | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    allowed_hosts: str = ""
    everreach_services: str = ""
    route_table_path: Path | None = None
    data_dir: Path = Path("./data")
    redis_url: str | None = None
    database_url: SecretStr | None = None
    supabase_db_url: SecretStr | None = None
    supabase_url: str | None = None
    supabase_service_key: SecretStr | None = None
    vector_db_url: str | None = None
    openai_api_key: SecretStr | None = None
    anthropic_api_key: SecretStr | None = None
    monthly_cost_cap: Decimal = Field(default=Decimal("400"), ge=0)
    cost_soft_cap: Decimal = Field(default=Decimal("380"), ge=0)
    cost_rates_file: Path | None = None
    cloud_timeout_sec: float = Field(default=30.0, gt=0)
    cloud_retries: int = Field(default=3, ge=0, le=10)
    cloud_backoff_sec: float = Field(default=1.0, ge=0)
    # A batch holds at most 1,000 items, so more in flight than that means nothing.
    batch_max_concurrent: int = Field(default=256, ge=1, le=1000)
    connectivity_interval_sec: float = Field(default=30.0, gt=0)
    offline_after_failures: int = Field(default=3, ge=1)
    offline_mode: bool = False
    cache_ttl_sec: float = Field(default=3600.0, gt=0)
    sync_interval_sec: float = Field(default=60.0, gt=0)
    bus_poll_interval_sec: float = Field(default=5.0, gt=0)
    everreach_tz: str = ""
    daily_routine_time: str = "06:00"
    schedules_path: Path = Path("schedules.json")
    rate_limits_path: Path = Path("rate_limits.json")
    # A secret: chat webhooks (Slack, Discord) carry their token in the path.
    alert_webhook_url: SecretStr | None = None
    alert_action: str | None = None
    log_format: Literal["console", "json"] | None = None
    log_level: str = "INFO"
    log_dispatch: bool = True

    # -- field checks -------------------------------------------------------------------------

    @field_validator("cloud_endpoint", "local_endpoint", "vector_db_url", "supabase_url")
    @classmethod
    def _http_url(cls, value: str | None, info: Any) -> str | None:
        return _check_url(info.field_name.upper(), value, ("http", "https"))

    @field_validator("alert_webhook_url")
    @classmethod
    def _alert_webhook_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        url = _check_url("ALERT_WEBHOOK_URL", value.get_secret_value(), ("http", "https"))
        return SecretStr(url) if url else None

    @field_validator("alert_action")
    @classmethod
    def _alert_action(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not _ACTION_RE.match(value.strip()):
            raise ValueError(
                f"ALERT_ACTION must be an action name such as telegram.send; {value!r} is not one"
            )
        return value.strip()

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        return _check_url("REDIS_URL", value, ("redis", "rediss", "unix"))

    @field_validator("database_url", "supabase_db_url")
    @classmethod
    def _pg_url(cls, value: SecretStr | None, info: Any) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        _check_url(info.field_name.upper(), value.get_secret_value(), ("postgres", "postgresql"))
        return value

    @field_validator(
        "everreach_cloud_key",
        "local_api_token",
        "supabase_service_key",
        "openai_api_key",
        "anthropic_api_key",
    )
    @classmethod
    def _blank_secret_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        return value

    @field_validator("route_table_path", "cost_rates_file", mode="before")
    @classmethod
    def _blank_path_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: str) -> str:
        for name in (part.strip() for part in value.split(",")):
            if name and (any(c in name for c in " /@") or "*" in name.lstrip("*.")):
                raise ValueError(
                    f"ALLOWED_HOSTS must be comma-separated host names such as "
                    f"'localhost,api.example.com', '*.example.com' or '*'; {name!r} is not one"
                )
        return value

    @field_validator("everreach_services")
    @classmethod
    def _services(cls, value: str) -> str:
        for name in (part.strip() for part in value.split(",")):
            if name and not _MODULE_RE.match(name):
                raise ValueError(
                    f"EVERREACH_SERVICES must be comma-separated Python module names; "
                    f"{name!r} is not one"
                )
        return value

    @field_validator("daily_routine_time")
    @classmethod
    def _routine_time(cls, value: str) -> str:
        if not _TIME_RE.match(value.strip()):
            raise ValueError("DAILY_ROUTINE_TIME must be HH:MM in 24-hour time, e.g. 06:00")
        return value.strip()

    @field_validator("log_format", mode="before")
    @classmethod
    def _log_format(cls, value: Any) -> Any:
        """Unset or blank: console on a terminal, else json (decided when logging starts)."""
        if isinstance(value, str):
            value = value.strip().lower()
            return value or None
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

    @field_validator("everreach_tz")
    @classmethod
    def _tz(cls, value: str) -> str:
        value = value.strip()
        if value:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(
                    f"EVERREACH_TZ must be an IANA time zone such as Europe/Berlin; "
                    f"{value!r} is not one"
                ) from None
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_soft_cap(cls, data: Any) -> Any:
        """An unset COST_SOFT_CAP is 95 % of MONTHLY_COST_CAP (380 of the default 400)."""
        if isinstance(data, dict):
            soft = data.get("cost_soft_cap")
            cap = data.get("monthly_cost_cap")
            if (soft is None or (isinstance(soft, str) and not soft.strip())) and cap not in (
                None,
                "",
            ):
                # A cap that is not a number is left for the field check, which names it.
                with contextlib.suppress(ArithmeticError):
                    data = {**data, "cost_soft_cap": Decimal(str(cap)) * Decimal("0.95")}
        return data

    @model_validator(mode="after")
    def _coherent(self) -> HybridConfig:
        if self.cost_soft_cap > self.monthly_cost_cap:
            raise ValueError(
                f"COST_SOFT_CAP ({self.cost_soft_cap}) must not exceed MONTHLY_COST_CAP "
                f"({self.monthly_cost_cap})"
            )
        if self.everreach_env is Env.HYBRID and not self.cloud_endpoint:
            raise ValueError(
                "EVERREACH_ENV=hybrid needs CLOUD_ENDPOINT (the cloud instance's base URL, "
                "e.g. https://cloud.example.com)"
            )
        if (
            self.everreach_env in (Env.HYBRID, Env.CLOUD)
            and self.cloud_endpoint
            and self.everreach_cloud_key is None
        ):
            raise ValueError(
                f"EVERREACH_ENV={self.everreach_env.value} with CLOUD_ENDPOINT set needs "
                f"EVERREACH_CLOUD_KEY (the bearer key the cloud instance expects)"
            )
        return self

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Take values only from the caller; ``load()`` is the one reader of the environment."""
        return (init_settings,)

    @classmethod
    def load(
        cls,
        *,
        env_file: str | Path | None = ".env",
        environ: Mapping[str, str] | None = None,
    ) -> HybridConfig:
        """Read ``env_file`` (if it exists) overlaid by ``environ`` (default ``os.environ``).

        Variables in the environment win over the file; names are case-insensitive. Raise
        ``ConfigError`` on any bad value.
        """
        fields = cls.model_fields
        values: dict[str, Any] = {}
        if env_file is not None and Path(env_file).is_file():
            for key, value in dotenv_values(env_file, encoding="utf-8").items():
                if value is not None and key.lower() in fields:
                    values[key.lower()] = value
        for key, value in (os.environ if environ is None else environ).items():
            if key.lower() in fields:
                values[key.lower()] = value
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> HybridConfig:
        """Build from a dict of variable names (any case) to values; reads no environment."""
        try:
            return cls.model_validate({key.lower(): value for key, value in values.items()})
        except ValidationError as exc:
            raise ConfigError(_explain(exc)) from None

    def replace(self, **changes: Any) -> HybridConfig:
        """Return a validated copy with some fields changed (field names, lower case)."""
        data = {name: getattr(self, name) for name in type(self).model_fields}
        data.update(changes)
        return type(self).from_mapping(data)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            if name in _URL_FIELDS and isinstance(value, str):
                value = redact_url(value)
            yield name, value

    # -- derived values -----------------------------------------------------------------------

    @property
    def services_modules(self) -> list[str]:
        return [part.strip() for part in self.everreach_services.split(",") if part.strip()]

    @property
    def is_serving_cloud(self) -> bool:
        """True for an instance that *is* the cloud: env=cloud with no CLOUD_ENDPOINT."""
        return self.everreach_env is Env.CLOUD and not self.cloud_endpoint

    @property
    def postgres_dsn(self) -> str | None:
        for secret in (self.database_url, self.supabase_db_url):
            if secret is not None:
                return secret.get_secret_value()
        return None

    @property
    def binds_loopback(self) -> bool:
        return self.host in _LOOPBACK_HOSTS

    def timezone(self) -> tzinfo:
        """EVERREACH_TZ's zone, or the machine's own zone when it is empty."""
        return resolve_timezone(self.everreach_tz)

    def secret(self, name: str) -> str | None:
        value = getattr(self, name)
        return value.get_secret_value() if isinstance(value, SecretStr) else None


def _explain(exc: ValidationError) -> str:
    """Turn pydantic's report into lines that name the variable and what is allowed."""
    lines = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ()) if part != "__root__"]
        name = loc[0].upper() if loc else ""
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        given = err.get("input")
        if name and name not in msg:
            shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
            if name.lower() in _SECRET_FIELDS:
                shown = ""
            elif name.lower() in _URL_FIELDS:
                shown = f" (got {redact_url(given)!r})" if isinstance(given, str) else ""
            lines.append(f"{name}: {msg}{shown}")
        else:
            lines.append(msg)
    return "invalid configuration: " + "; ".join(lines)


def resolve_timezone(name: str) -> tzinfo:
    """Return the IANA zone ``name``, or the machine's own zone when it is empty."""
    if name:
        from zoneinfo import ZoneInfo

        return ZoneInfo(name)
    from tzlocal import get_localzone

    return get_localzone()
