"""HybridConfig: the documented defaults, validation that names the variable, secrets kept
out of errors and repr(), and where values come from (.env, the environment, a mapping)."""

from __future__ import annotations

import traceback
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from config.hybrid_config import HybridConfig, redact_url
from errors import ConfigError, Env

pytestmark = pytest.mark.prd200

# Every variable of the configuration contract (other programs set these names).
DESIGN_VARIABLES = [
    "EVERREACH_ENV",
    "CLOUD_ENDPOINT",
    "LOCAL_ENDPOINT",
    "EVERREACH_CLOUD_KEY",
    "LOCAL_API_TOKEN",
    "HOST",
    "PORT",
    "EVERREACH_SERVICES",
    "ROUTE_TABLE_PATH",
    "DATA_DIR",
    "REDIS_URL",
    "DATABASE_URL",
    "SUPABASE_DB_URL",
    "SUPABASE_URL",
    "SUPABASE_SERVICE_KEY",
    "VECTOR_DB_URL",
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "MONTHLY_COST_CAP",
    "COST_SOFT_CAP",
    "COST_RATES_FILE",
    "CLOUD_TIMEOUT_SEC",
    "CLOUD_RETRIES",
    "CLOUD_BACKOFF_SEC",
    "CONNECTIVITY_INTERVAL_SEC",
    "OFFLINE_AFTER_FAILURES",
    "OFFLINE_MODE",
    "CACHE_TTL_SEC",
    "SYNC_INTERVAL_SEC",
    "BUS_POLL_INTERVAL_SEC",
    "EVERREACH_TZ",
    "DAILY_ROUTINE_TIME",
    "SCHEDULES_PATH",
    "RATE_LIMITS_PATH",
    "ALERT_WEBHOOK_URL",
    "ALERT_ACTION",
]
CLOUD_OK = {
    "EVERREACH_ENV": "hybrid",
    "CLOUD_ENDPOINT": "https://cloud.example.com",
    "EVERREACH_CLOUD_KEY": "k-123",
}


def _error(values: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        HybridConfig.from_mapping(values)
    return str(info.value)


def test_every_design_variable_is_a_field() -> None:
    fields = set(HybridConfig.model_fields)
    assert [v for v in DESIGN_VARIABLES if v.lower() not in fields] == []


@pytest.mark.parametrize(
    ("field", "default"),
    [
        ("everreach_env", Env.LOCAL),
        ("host", "127.0.0.1"),
        ("port", 8080),
        ("data_dir", Path("./data")),
        ("monthly_cost_cap", Decimal("400")),
        ("cost_soft_cap", Decimal("380")),
        ("cloud_timeout_sec", 30.0),
        ("cloud_retries", 3),
        ("cloud_backoff_sec", 1.0),
        ("connectivity_interval_sec", 30.0),
        ("offline_after_failures", 3),
        ("offline_mode", False),
        ("cache_ttl_sec", 3600.0),
        ("sync_interval_sec", 60.0),
        ("bus_poll_interval_sec", 5.0),
        ("daily_routine_time", "06:00"),
        ("schedules_path", Path("schedules.json")),
        ("everreach_services", ""),
        ("everreach_tz", ""),  # empty: the machine's local zone
    ],
)
def test_default(field: str, default: object) -> None:
    assert getattr(HybridConfig.from_mapping({}), field) == default


@pytest.mark.parametrize(
    "field",
    [
        "cloud_endpoint",
        "local_endpoint",
        "everreach_cloud_key",
        "local_api_token",
        "route_table_path",
        "redis_url",
        "database_url",
        "supabase_db_url",
        "supabase_url",
        "supabase_service_key",
        "vector_db_url",
        "openai_api_key",
        "anthropic_api_key",
        "cost_rates_file",
    ],
)
def test_optional_variable_is_unset_by_default(field: str) -> None:
    assert getattr(HybridConfig.from_mapping({}), field) is None


@pytest.mark.parametrize(
    ("variable", "given", "field", "expected"),
    [
        ("PORT", "9000", "port", 9000),
        ("OFFLINE_MODE", "true", "offline_mode", True),
        ("OFFLINE_MODE", "0", "offline_mode", False),
        ("MONTHLY_COST_CAP", "400.50", "monthly_cost_cap", Decimal("400.50")),
        ("CLOUD_TIMEOUT_SEC", "2.5", "cloud_timeout_sec", 2.5),
        ("CLOUD_RETRIES", "0", "cloud_retries", 0),
        ("CLOUD_BACKOFF_SEC", "0", "cloud_backoff_sec", 0.0),
        ("DATA_DIR", "/srv/everreach", "data_dir", Path("/srv/everreach")),
        ("EVERREACH_ENV", "cloud", "everreach_env", Env.CLOUD),
        ("EVERREACH_TZ", "Europe/Berlin", "everreach_tz", "Europe/Berlin"),
        ("DAILY_ROUTINE_TIME", " 23:59 ", "daily_routine_time", "23:59"),
        ("REDIS_URL", "redis://127.0.0.1:6379/0", "redis_url", "redis://127.0.0.1:6379/0"),
        ("REDIS_URL", "unix:///run/redis.sock", "redis_url", "unix:///run/redis.sock"),
        ("CLOUD_ENDPOINT", "https://c.example/base/", "cloud_endpoint", "https://c.example/base"),
        ("ROUTE_TABLE_PATH", "", "route_table_path", None),
        ("REDIS_URL", "  ", "redis_url", None),
        ("DATABASE_URL", "", "database_url", None),
        ("EVERREACH_CLOUD_KEY", "   ", "everreach_cloud_key", None),
    ],
)
def test_value_is_parsed(variable: str, given: str, field: str, expected: object) -> None:
    assert getattr(HybridConfig.from_mapping({variable: given}), field) == expected


@pytest.mark.parametrize(
    ("values", "variable", "allowed"),
    [
        ({"EVERREACH_ENV": "prod"}, "EVERREACH_ENV", "'local', 'cloud' or 'hybrid'"),
        ({"MONTHLY_COST_CAP": "-1"}, "MONTHLY_COST_CAP", "greater than or equal to 0"),
        ({"COST_SOFT_CAP": "-0.01"}, "COST_SOFT_CAP", "greater than or equal to 0"),
        ({"MONTHLY_COST_CAP": "lots"}, "MONTHLY_COST_CAP", "valid decimal"),
        ({"COST_SOFT_CAP": "401"}, "COST_SOFT_CAP", "must not exceed MONTHLY_COST_CAP"),
        ({"CLOUD_ENDPOINT": "cloud.example.com"}, "CLOUD_ENDPOINT", "http:// or https://"),
        ({"CLOUD_ENDPOINT": "ftp://cloud.example.com"}, "CLOUD_ENDPOINT", "http:// or https://"),
        ({"CLOUD_ENDPOINT": "https://"}, "CLOUD_ENDPOINT", "naming a host"),
        ({"LOCAL_ENDPOINT": "localhost:8080"}, "LOCAL_ENDPOINT", "http:// or https://"),
        ({"VECTOR_DB_URL": "chroma:8000"}, "VECTOR_DB_URL", "http:// or https://"),
        ({"SUPABASE_URL": "x.supabase.co"}, "SUPABASE_URL", "http:// or https://"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL", "redis:// or rediss:// or unix://"),
        ({"REDIS_URL": "http://127.0.0.1:6379"}, "REDIS_URL", "redis://"),
        ({"REDIS_URL": "unix://"}, "REDIS_URL", "socket path"),
        ({"DATABASE_URL": "mysql://u@h/db"}, "DATABASE_URL", "postgres:// or postgresql://"),
        ({"DATABASE_URL": "127.0.0.1:5432"}, "DATABASE_URL", "postgresql://"),
        ({"SUPABASE_DB_URL": "sqlite:///x.db"}, "SUPABASE_DB_URL", "postgresql://"),
        ({"PORT": "0"}, "PORT", "greater than or equal to 1"),
        ({"PORT": "65536"}, "PORT", "less than or equal to 65535"),
        ({"PORT": "-80"}, "PORT", "greater than or equal to 1"),
        ({"PORT": "http"}, "PORT", "valid integer"),
        ({"CLOUD_TIMEOUT_SEC": "0"}, "CLOUD_TIMEOUT_SEC", "greater than 0"),
        ({"CLOUD_RETRIES": "11"}, "CLOUD_RETRIES", "less than or equal to 10"),
        ({"CLOUD_BACKOFF_SEC": "-1"}, "CLOUD_BACKOFF_SEC", "greater than or equal to 0"),
        ({"OFFLINE_AFTER_FAILURES": "0"}, "OFFLINE_AFTER_FAILURES", "greater than or equal to 1"),
        ({"CACHE_TTL_SEC": "0"}, "CACHE_TTL_SEC", "greater than 0"),
        ({"OFFLINE_MODE": "maybe"}, "OFFLINE_MODE", "valid boolean"),
        ({"DAILY_ROUTINE_TIME": "6:00"}, "DAILY_ROUTINE_TIME", "HH:MM"),
        ({"DAILY_ROUTINE_TIME": "24:00"}, "DAILY_ROUTINE_TIME", "HH:MM"),
        ({"DAILY_ROUTINE_TIME": "06:60"}, "DAILY_ROUTINE_TIME", "HH:MM"),
        ({"DAILY_ROUTINE_TIME": "06:00:00"}, "DAILY_ROUTINE_TIME", "HH:MM"),
        ({"DAILY_ROUTINE_TIME": "0600"}, "DAILY_ROUTINE_TIME", "HH:MM"),
        ({"EVERREACH_TZ": "Mars/Olympus_Mons"}, "EVERREACH_TZ", "IANA time zone"),
        ({"EVERREACH_TZ": "../../etc/passwd"}, "EVERREACH_TZ", "IANA time zone"),
        ({"EVERREACH_SERVICES": "my-services"}, "EVERREACH_SERVICES", "Python module names"),
        ({"EVERREACH_SERVICES": "ok,1bad"}, "EVERREACH_SERVICES", "Python module names"),
        ({"EVERREACH_SERVICES": "pkg..mod"}, "EVERREACH_SERVICES", "Python module names"),
        ({"EVERREACH_SERVICES": "a b"}, "EVERREACH_SERVICES", "Python module names"),
        ({"EVERREACH_SERVICES": "pkg/mod.py"}, "EVERREACH_SERVICES", "Python module names"),
        ({"EVERREACH_ENV": "hybrid"}, "CLOUD_ENDPOINT", "EVERREACH_ENV=hybrid needs"),
        (
            {"EVERREACH_ENV": "hybrid", "CLOUD_ENDPOINT": "https://c.example"},
            "EVERREACH_CLOUD_KEY",
            "EVERREACH_ENV=hybrid with CLOUD_ENDPOINT set needs",
        ),
        (
            {"EVERREACH_ENV": "cloud", "CLOUD_ENDPOINT": "https://c.example"},
            "EVERREACH_CLOUD_KEY",
            "EVERREACH_ENV=cloud with CLOUD_ENDPOINT set needs",
        ),
        (
            {"EVERREACH_ENV": "cloud", "CLOUD_ENDPOINT": "https://c.x", "EVERREACH_CLOUD_KEY": " "},
            "EVERREACH_CLOUD_KEY",
            "needs",
        ),
    ],
)
def test_bad_value_stops_with_a_config_error_naming_the_variable(
    values: dict[str, Any], variable: str, allowed: str
) -> None:
    message = _error(values)
    assert variable in message
    assert allowed in message


def test_every_wrong_variable_is_reported_at_once() -> None:
    message = _error({"PORT": "0", "EVERREACH_ENV": "prod", "DAILY_ROUTINE_TIME": "noon"})
    assert all(name in message for name in ("PORT", "EVERREACH_ENV", "DAILY_ROUTINE_TIME"))


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"EVERREACH_ENV": "cloud"},  # the instance that *is* the cloud needs no endpoint
        {"EVERREACH_ENV": "local", "CLOUD_ENDPOINT": "https://c.example"},  # local: key unused
        CLOUD_OK,
        {**CLOUD_OK, "EVERREACH_ENV": "cloud"},
        {"MONTHLY_COST_CAP": "0", "COST_SOFT_CAP": "0"},
        {"COST_SOFT_CAP": "400"},  # soft == hard is allowed
        {"EVERREACH_SERVICES": " my_services , pkg.more_services ,"},
    ],
)
def test_good_configuration_is_accepted(values: dict[str, Any]) -> None:
    HybridConfig.from_mapping(values)


def test_services_modules_are_split_and_trimmed() -> None:
    config = HybridConfig.from_mapping({"EVERREACH_SERVICES": " a , pkg.b ,, "})
    assert config.services_modules == ["a", "pkg.b"]


def test_the_serving_cloud_is_env_cloud_without_an_endpoint() -> None:
    assert HybridConfig.from_mapping({"EVERREACH_ENV": "cloud"}).is_serving_cloud
    assert not HybridConfig.from_mapping({**CLOUD_OK, "EVERREACH_ENV": "cloud"}).is_serving_cloud
    assert not HybridConfig.from_mapping(CLOUD_OK).is_serving_cloud


def test_database_url_wins_over_supabase_db_url() -> None:
    both = {"DATABASE_URL": "postgresql://a@h1/db", "SUPABASE_DB_URL": "postgres://b@h2/db"}
    assert HybridConfig.from_mapping(both).postgres_dsn == "postgresql://a@h1/db"
    only = {"SUPABASE_DB_URL": "postgres://b@h2/db"}
    assert HybridConfig.from_mapping(only).postgres_dsn == "postgres://b@h2/db"
    assert HybridConfig.from_mapping({}).postgres_dsn is None


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False)],
)
def test_binds_loopback(host: str, loopback: bool) -> None:
    assert HybridConfig.from_mapping({"HOST": host}).binds_loopback is loopback


def test_config_is_frozen() -> None:
    config = HybridConfig.from_mapping({})
    with pytest.raises(ValidationError):
        config.port = 1  # type: ignore[misc]


def test_replace_returns_a_validated_copy() -> None:
    config = HybridConfig.from_mapping(CLOUD_OK)
    changed = config.replace(port=9001)
    assert (changed.port, config.port) == (9001, 8080)
    assert changed.secret("everreach_cloud_key") == "k-123"
    with pytest.raises(ConfigError, match="COST_SOFT_CAP"):
        config.replace(cost_soft_cap=Decimal("500"))


# -- secrets --------------------------------------------------------------------------------

SECRET = "s3cr3t-Value-9"


@pytest.mark.parametrize(
    "values",
    [
        {"EVERREACH_CLOUD_KEY": SECRET, "EVERREACH_ENV": "prod"},
        {"LOCAL_API_TOKEN": SECRET, "PORT": "0"},
        {"LOCAL_API_TOKEN": 12345, "OPENAI_API_KEY": [SECRET]},
        {"ANTHROPIC_API_KEY": {"k": SECRET}},
        {"SUPABASE_SERVICE_KEY": [SECRET]},
        {"DATABASE_URL": f"mysql://user:{SECRET}@db.example/x"},
        {"SUPABASE_DB_URL": f"postgresql://user:{SECRET}@/x"},
        {"REDIS_URL": f"http://:{SECRET}@cache.example:6379"},
        {"REDIS_URL": [f"redis://:{SECRET}@cache.example"]},
        {"CLOUD_ENDPOINT": f"ftp://user:{SECRET}@cloud.example"},
        {"CLOUD_ENDPOINT": f"https://user:{SECRET}@[::1"},
        {"VECTOR_DB_URL": [f"https://user:{SECRET}@chroma"]},
        {"EVERREACH_ENV": "hybrid", "CLOUD_ENDPOINT": f"https://u:{SECRET}@c.example"},
        {"COST_SOFT_CAP": "500", "EVERREACH_CLOUD_KEY": SECRET, "OPENAI_API_KEY": SECRET},
    ],
)
def test_secret_values_never_appear_in_a_config_error(values: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as info:
        HybridConfig.from_mapping(values)
    exc = info.value
    rendered = "".join(traceback.format_exception(exc))
    assert SECRET not in str(exc)
    assert SECRET not in repr(exc)
    assert SECRET not in rendered
    assert exc.__cause__ is None


def test_secret_values_never_appear_in_repr_or_str() -> None:
    config = HybridConfig.from_mapping(
        {
            **CLOUD_OK,
            "EVERREACH_CLOUD_KEY": SECRET + "1",
            "LOCAL_API_TOKEN": SECRET + "2",
            "CLOUD_ENDPOINT": f"https://user:{SECRET}3@cloud.example",
            "LOCAL_ENDPOINT": f"http://{SECRET}4@127.0.0.1:8080",
            "REDIS_URL": f"redis://:{SECRET}5@cache.example:6379/0",
            "DATABASE_URL": f"postgresql://u:{SECRET}6@db.example/x",
            "SUPABASE_DB_URL": f"postgresql://u:{SECRET}7@db.example/x",
            "SUPABASE_URL": f"https://u:{SECRET}8@x.supabase.co",
            "SUPABASE_SERVICE_KEY": SECRET + "9",
            "VECTOR_DB_URL": f"http://u:{SECRET}10@chroma:8000",
            "OPENAI_API_KEY": SECRET + "11",
            "ANTHROPIC_API_KEY": SECRET + "12",
        }
    )
    for text in (repr(config), str(config), f"{config}"):
        assert SECRET not in text
    assert "cache.example:6379/0" in repr(config)  # redacted, not dropped
    # The values themselves are intact for the code that needs them.
    assert config.redis_url == f"redis://:{SECRET}5@cache.example:6379/0"
    assert config.secret("everreach_cloud_key") == SECRET + "1"
    assert config.postgres_dsn == f"postgresql://u:{SECRET}6@db.example/x"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:6379/0", "redis://***@h:6379/0"),
        ("https://user:pw@h/x?q=1", "https://***@h/x?q=1"),
        ("https://token@h", "https://***@h"),
        ("https://h/x", "https://h/x"),
        ("http://[::1", "***"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


# -- where values come from -----------------------------------------------------------------


def _env_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "test.env"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_reads_the_env_file(tmp_path: Path) -> None:
    path = _env_file(
        tmp_path,
        "# comment\n"
        "EVERREACH_ENV=hybrid\n"
        "CLOUD_ENDPOINT=https://cloud.example.com/\n"
        "EVERREACH_CLOUD_KEY='k 1'\n"
        "export PORT=9090\n"
        'data_dir="/srv/data"\n'
        "EVERREACH_SERVICES=\n"
        "NOT_OURS=ignored\n",
    )
    config = HybridConfig.load(env_file=path, environ={})
    assert config.everreach_env is Env.HYBRID
    assert config.cloud_endpoint == "https://cloud.example.com"
    assert config.secret("everreach_cloud_key") == "k 1"
    assert config.port == 9090
    assert config.data_dir == Path("/srv/data")
    assert config.everreach_services == ""


def test_environment_wins_over_the_env_file(tmp_path: Path) -> None:
    path = _env_file(tmp_path, "PORT=9090\nHOST=127.0.0.1\n")
    config = HybridConfig.load(env_file=path, environ={"port": "9191", "PATH": "/bin"})
    assert (config.port, config.host) == (9191, "127.0.0.1")


def test_load_reads_os_environ_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _env_file(tmp_path, "PORT=9090\n")
    monkeypatch.setenv("PORT", "9292")
    assert HybridConfig.load(env_file=path).port == 9292


def test_a_missing_env_file_is_no_error(tmp_path: Path) -> None:
    config = HybridConfig.load(env_file=tmp_path / "absent.env", environ={})
    assert config == HybridConfig.from_mapping({})
    assert HybridConfig.load(env_file=None, environ={}) == config


def test_a_bad_value_in_the_env_file_names_the_variable(tmp_path: Path) -> None:
    path = _env_file(tmp_path, "EVERREACH_ENV=prod\n")
    with pytest.raises(ConfigError, match="EVERREACH_ENV: Input should be 'local'"):
        HybridConfig.load(env_file=path, environ={})


def test_from_mapping_reads_neither_environment_nor_dotenv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVERREACH_ENV", "prod")
    monkeypatch.setenv("PORT", "1234")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("HOST=0.0.0.0\nDATA_DIR=/elsewhere\n", encoding="utf-8")
    config = HybridConfig.from_mapping({"DATA_DIR": "d"})
    assert config.everreach_env is Env.LOCAL
    assert (config.port, config.host, config.data_dir) == (8080, "127.0.0.1", Path("d"))


def test_direct_construction_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "1234")
    assert HybridConfig().port == 8080


@pytest.mark.prd200
@pytest.mark.parametrize(
    ("values", "soft_cap"),
    [
        ({}, Decimal("380")),
        ({"MONTHLY_COST_CAP": "100"}, Decimal("95")),
        ({"MONTHLY_COST_CAP": "100", "COST_SOFT_CAP": ""}, Decimal("95")),
        ({"MONTHLY_COST_CAP": "100", "COST_SOFT_CAP": "50"}, Decimal("50")),
    ],
)
def test_unset_soft_cap_is_95_percent_of_the_hard_cap(values, soft_cap):
    assert HybridConfig.from_mapping(values).cost_soft_cap == soft_cap


def test_pacing_and_alert_settings_default_to_an_optional_file_and_no_sinks() -> None:
    config = HybridConfig.from_mapping({})
    assert config.rate_limits_path == Path("rate_limits.json")
    assert (config.alert_webhook_url, config.alert_action) == (None, None)


def test_alert_webhook_url_is_a_secret_checked_as_a_url() -> None:
    url = "https://hooks.example.com/services/T000/B000/s3cr3tpath"
    config = HybridConfig.from_mapping({"ALERT_WEBHOOK_URL": url, "ALERT_ACTION": "telegram.send"})
    assert config.secret("alert_webhook_url") == url
    assert "s3cr3tpath" not in repr(config)
    assert config.alert_action == "telegram.send"
    with pytest.raises(ConfigError, match="ALERT_WEBHOOK_URL must be a URL") as caught:
        HybridConfig.from_mapping({"ALERT_WEBHOOK_URL": "ftp://hooks.example.com/s3cr3tpath"})
    assert "s3cr3tpath" not in str(caught.value)


@pytest.mark.parametrize("action", ["telegram", "Telegram.send", "telegram.*", "a.b.c"])
def test_alert_action_must_name_one_action(action: str) -> None:
    with pytest.raises(ConfigError, match="ALERT_ACTION must be an action name"):
        HybridConfig.from_mapping({"ALERT_ACTION": action})


def test_the_time_zone_is_looked_up_in_one_place() -> None:
    from zoneinfo import ZoneInfo

    from tzlocal import get_localzone

    berlin = HybridConfig.from_mapping({"EVERREACH_TZ": "Europe/Berlin"})
    assert berlin.timezone() == ZoneInfo("Europe/Berlin")
    assert HybridConfig.from_mapping({"EVERREACH_TZ": ""}).timezone() == get_localzone()
