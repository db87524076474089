"""The grouped settings read every environment variable the project documents, under its exact name, and refuse
what they cannot use; docs/configuration.md is the reference generated from them. No service is used."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from operations import settings as settings_module
from operations.settings import (
    PROJECT_ROOT,
    DatabaseSettings,
    Settings,
    StackSettings,
    TurnstilesSettings,
    env_names,
    render_markdown,
)

# Every environment variable of the settings: the value an operator writes and where the code reads it.
VARIABLES: dict[str, tuple[str, str, object]] = {
    "DATA_DIR": ("stack.data_dir", "/srv/ops", Path("/srv/ops")),
    "OUTPUT_DIR": ("stack.output_dir", "/srv/ops/out", Path("/srv/ops/out")),
    "STACK_HOST": ("stack.host", "0.0.0.0", "0.0.0.0"),
    "STACK_AUTH_STRING": ("stack.auth_string", "ops:pw", SecretStr("ops:pw")),
    "STACK_PREFECT_DATABASE": ("stack.prefect_database", "sqlite", "sqlite"),
    "FILE_SERVER_PORT": ("stack.file_server_port", "4999", 4999),
    "OUTPUT_BASE_URL": ("stack.output_base_url", "https://files.example.com/ops", "https://files.example.com/ops"),
    "STACK_SCHEDULES": ("stack.schedules", "on", True),
    "DATABASE_URL": ("database.url", "sqlite:///x.db", SecretStr("sqlite:///x.db")),
    "DATABASE_POOL_SIZE": ("database.pool_size", "7", 7),
    "DATABASE_MAX_OVERFLOW": ("database.max_overflow", "3", 3),
    "DATABASE_POOL_TIMEOUT_SECONDS": ("database.pool_timeout_seconds", "4.5", 4.5),
    "DATABASE_STATEMENT_TIMEOUT_SECONDS": ("database.statement_timeout_seconds", "0", 0.0),
    "REDIS_URL": ("redis.url", "redis://10.0.0.2:6379/1", SecretStr("redis://10.0.0.2:6379/1")),
    "REDIS_PASSWORD": ("redis.password", "hunter2", SecretStr("hunter2")),
    "REDIS_START_TIMEOUT_SECONDS": ("redis.start_timeout_seconds", "12", 12.0),
    "DASK_SCHEDULER_ADDRESS": ("dask.scheduler_address", "tcp://10.0.0.3:8786", "tcp://10.0.0.3:8786"),
    "DASK_N_WORKERS": ("dask.n_workers", "5", 5),
    "DASK_THREADS_PER_WORKER": ("dask.threads_per_worker", "3", 3),
    "DASK_CONNECT_TIMEOUT_SECONDS": ("dask.connect_timeout_seconds", "2.5", 2.5),
    "IN_PROCESS_MAX_QUANTITY": ("lottery.in_process_max_quantity", "0", 0),
    "MIN_GAMES_PER_CHUNK": ("lottery.min_games_per_chunk", "1000", 1000),
    "MAX_GAMES_PER_CHUNK": ("lottery.max_games_per_chunk", "5000", 5000),
    "ROWS_PER_SHEET": ("lottery.rows_per_sheet", "4000", 4000),
    "MAX_ROWS_PER_FILE": ("lottery.max_rows_per_file", "6000", 6000),
    "PAST_DRAWS_FILE": ("lottery.past_draws_file", "/srv/draws.xlsx", Path("/srv/draws.xlsx")),
    "COUNTER_BLOCK_NAME": ("lottery.counter_block_name", "other-counter", "other-counter"),
    "GAMES_CONCURRENCY_LIMIT": ("lottery.games_concurrency_limit", "4", 4),
    "GAMES_TASK_RETRIES": ("lottery.task_retries", "1", 1),
    "RUN_RETENTION_DAYS": ("retention.days", "7.5", 7.5),
    "KEEP_CHUNK_FILES": ("retention.keep_chunk_files", "true", True),
    "MARKETPLACE_APP_BLOCK": ("marketplace.app_block", "other-app", "other-app"),
    "MARKETPLACE_API_URL": ("marketplace.api_url", "https://api.example.com", "https://api.example.com"),
    "MARKETPLACE_CLIENT_ID": ("marketplace.client_id", "app-1", "app-1"),
    "MARKETPLACE_CLIENT_SECRET": ("marketplace.client_secret", "s3cret", SecretStr("s3cret")),
    "MARKETPLACE_REDIRECT_URI": ("marketplace.redirect_uri", "https://ops.example.com/cb", "https://ops.example.com/cb"),
    "MARKETPLACE_TASK_RUNNER": ("marketplace.task_runner", "dask", "dask"),
    "MARKETPLACE_CONCURRENCY": ("marketplace.concurrency", "3", 3),
    "MARKETPLACE_ACCOUNT_TIMEOUT_SECONDS": ("marketplace.account_timeout_seconds", "60", 60.0),
    "MARKETPLACE_LOOKBACK_HOURS": ("marketplace.lookback_hours", "1.5", 1.5),
    "MARKETPLACE_INITIAL_HISTORY_DAYS": ("marketplace.initial_history_days", "10", 10.0),
    "MARKETPLACE_MAX_WINDOW_DAYS": ("marketplace.max_window_days", "5", 5.0),
    "MARKETPLACE_LOCK_WAIT_SECONDS": ("marketplace.lock_wait_seconds", "0", 0.0),
    "MARKETPLACE_TASK_RETRIES": ("marketplace.task_retries", "4", 4),
    "MARKETPLACE_RETRY_DELAY_SECONDS": ("marketplace.retry_delay_seconds", "1", 1.0),
    "MARKETPLACE_PARKED_REMINDER_HOURS": ("marketplace.parked_reminder_hours", "6", 6.0),
    "MARKETPLACE_TOKEN_MARGIN_SECONDS": ("marketplace.token_margin_seconds", "30", 30.0),
    "MARKETPLACE_TOKEN_KEY": ("marketplace.token_key", "k1,k2", SecretStr("k1,k2")),
    "MARKETPLACE_NOTIFICATIONS": ("marketplace_notifications.enabled", "on", True),
    "MARKETPLACE_RECEIVER_PORT": ("marketplace_notifications.receiver_port", "5282", 5282),
    "MARKETPLACE_CALLBACK_BASE_URL": ("marketplace_notifications.public_url", "https://ops.example.com",
                                      "https://ops.example.com"),
    "MARKETPLACE_NOTIFICATIONS_WINDOW_SECONDS": ("marketplace_notifications.window_seconds", "1.5", 1.5),
    "MARKETPLACE_NOTIFICATIONS_IDLE_SECONDS": ("marketplace_notifications.idle_seconds", "10", 10.0),
    "MARKETPLACE_NOTIFICATIONS_EVENT_SECONDS": ("marketplace_notifications.event_seconds", "1", 1.0),
    "MARKETPLACE_NOTIFICATIONS_MAX_TRIES": ("marketplace_notifications.max_tries", "3", 3),
    "MARKETPLACE_NOTIFICATIONS_RETENTION_DAYS": ("marketplace_notifications.retention_days", "7", 7.0),
    "PRODUCTS_QUEUE_BLOCK": ("products.queue_block", "other-queue", "other-queue"),
    "PRODUCTS_IN_PROCESS_MAX_ROWS": ("products.in_process_max_rows", "100", 100),
    "PRODUCTS_MIN_CHUNK_ROWS": ("products.min_chunk_rows", "500", 500),
    "PRODUCTS_MAX_CHUNK_ROWS": ("products.max_chunk_rows", "900", 900),
    "PRODUCTS_TASK_RETRIES": ("products.task_retries", "1", 1),
    "PRODUCTS_OUTBOX_STALE_MINUTES": ("products.outbox_stale_minutes", "2.5", 2.5),
    "PRODUCTS_INBOX_DIR": ("products.inbox_dir", "/srv/drop/products", Path("/srv/drop/products")),
    "PARTICIPANTS_FILE": ("turnstiles.participants_file", "/srv/people.xlsx", Path("/srv/people.xlsx")),
    "TURNSTILE_EMULATOR_DEVICES": ("turnstiles.emulator_devices", "0", 0),
    "TURNSTILE_CACHE_BLOCK": ("turnstiles.cache_block", "other-cache", "other-cache"),
    "TURNSTILES_TASK_RUNNER": ("turnstiles.task_runner", "dask", "dask"),
    "TURNSTILES_CONCURRENCY": ("turnstiles.concurrency", "4", 4),
    "TURNSTILE_TASK_RETRIES": ("turnstiles.task_retries", "5", 5),
    "TURNSTILES_TIMEZONE": ("turnstiles.timezone", "America/Manaus", "America/Manaus"),
    "TURNSTILES_INBOX_DIR": ("turnstiles.inbox_dir", "/srv/drop/people", Path("/srv/drop/people")),
    "NOTIFY_BLOCK": ("alerts.notify_block", "slack-webhook/ops", "slack-webhook/ops"),
    "NOTIFICATION_RECEIVER_PORT": ("alerts.receiver_port", "5281", 5281),
    "FLOW_HEARTBEAT_SECONDS": ("alerts.heartbeat_seconds", "45", 45),
    "ZOMBIE_AFTER_SECONDS": ("alerts.zombie_after_seconds", "120", 120),
}


def _read(settings: Settings, path: str) -> object:
    group, field = path.split(".")
    return getattr(getattr(settings, group), field)


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No settings variable in the environment and no `.env` in the working directory."""
    monkeypatch.chdir(tmp_path)
    for name in os.environ:
        if name.upper() in VARIABLES:
            monkeypatch.delenv(name)
    settings_module.get_settings.cache_clear()
    yield monkeypatch
    settings_module.get_settings.cache_clear()


def test_the_table_is_every_variable_of_the_settings():
    declared = {variable for group in Settings.groups().values() for variable in env_names(group).values()}
    assert declared == set(VARIABLES)
    for variable, (path, _, _) in VARIABLES.items():
        group, field = path.split(".")
        assert env_names(Settings.groups()[group])[field] == variable


def test_every_variable_is_read_under_its_name_through_its_group(clean_env):
    for variable, (_, raw, _) in VARIABLES.items():
        clean_env.setenv(variable, raw)
    settings = Settings()
    for variable, (path, _, expected) in VARIABLES.items():
        assert _read(settings, path) == expected, variable


def test_names_are_case_insensitive_and_dotenv_is_read(clean_env, tmp_path):
    clean_env.setenv("turnstile_task_retries", "6")
    (tmp_path / ".env").write_text("MIN_GAMES_PER_CHUNK=2000\nDATABASE_POOL_SIZE=4\nSOMETHING_ELSE=1\n")
    settings = Settings()
    assert settings.turnstiles.task_retries == 6
    assert (settings.lottery.min_games_per_chunk, settings.database.pool_size) == (2000, 4)


def test_defaults_and_derived_paths(clean_env):
    settings = Settings()
    for variable, (path, _, _) in VARIABLES.items():
        group, field = path.split(".")
        assert _read(settings, path) == Settings.groups()[group].model_fields[field].default, variable
    stack = settings.stack
    assert stack.data_dir == PROJECT_ROOT / "data" and stack.output_dir == PROJECT_ROOT / "data" / "output"
    assert stack.redis_dir == stack.data_dir / "redis" and stack.postgres_dir == stack.data_dir / "postgres"
    assert stack.prefect_worker_dir == stack.data_dir / "prefect" / "worker"
    assert stack.file_server_dir == stack.data_dir / "file-server"
    assert stack.marketplace_emulator_dir == stack.data_dir / "marketplace-emulator"
    assert stack.turnstile_emulator_dir == stack.data_dir / "turnstile-emulator"


@pytest.mark.parametrize(
    ("mistake", "meant"),
    [
        ("TURNSTILES_TASK_RETRIES", "turnstiles.task_retries"),  # the variable is TURNSTILE_TASK_RETRIES
        ("TURNSTILE_CONCURRENCY", "turnstiles.concurrency"),  # TURNSTILES_CONCURRENCY
        ("TURNSTILE_TIMEZONE", "turnstiles.timezone"),  # TURNSTILES_TIMEZONE
        ("TURNSTILES_CACHE_BLOCK", "turnstiles.cache_block"),  # TURNSTILE_CACHE_BLOCK
        ("TASK_RETRIES", "turnstiles.task_retries"),  # a field name is not a variable
        ("HOST", "stack.host"),
        ("POOL_SIZE", "database.pool_size"),
        ("DAYS", "retention.days"),
        ("LOTTERY_MIN_GAMES_PER_CHUNK", "lottery.min_games_per_chunk"),
        ("STACK_DATA_DIR", "stack.data_dir"),
    ],
)
def test_a_misspelt_prefix_is_not_read(clean_env, mistake, meant):
    clean_env.setenv(mistake, "9")
    settings = Settings()
    group, field = meant.split(".")
    assert _read(settings, meant) == Settings.groups()[group].model_fields[field].default


@pytest.mark.parametrize(
    ("variable", "value"),
    [("DATABASE_POOL_SIZE", "0"), ("MIN_GAMES_PER_CHUNK", "10"), ("ROWS_PER_SHEET", "2000000"),
     ("MARKETPLACE_TASK_RUNNER", "processes"), ("STACK_PREFECT_DATABASE", "mysql"), ("DASK_N_WORKERS", "many"),
     ("FILE_SERVER_PORT", "70000"), ("RUN_RETENTION_DAYS", "0")],
)
def test_a_bad_value_fails_naming_its_variable(clean_env, variable, value):
    clean_env.setenv(variable, value)
    with pytest.raises(ValidationError, match=variable) as raised:
        Settings()
    assert "input_value" not in str(raised.value)  # hide_input_in_errors


def test_a_malformed_auth_string_is_refused_without_echoing_it(clean_env):
    clean_env.setenv("STACK_AUTH_STRING", "only-a-secret-password")
    with pytest.raises(ValidationError, match="STACK_AUTH_STRING must be 'user:password'") as raised:
        Settings()
    assert "only-a-secret-password" not in str(raised.value)
    with pytest.raises(ValidationError, match="STACK_AUTH_STRING"):
        StackSettings(auth_string=":pw")


def test_keywords_take_field_or_variable_names_and_refuse_unknown_ones(clean_env, tmp_path):
    clean_env.setenv("STACK_HOST", "10.1.1.1")
    stack = StackSettings(data_dir=tmp_path, FILE_SERVER_PORT=5000)
    assert (stack.data_dir, stack.file_server_port, stack.host) == (tmp_path, 5000, "10.1.1.1")  # the rest: env
    with pytest.raises(TypeError, match="no setting 'stack_host'"):
        StackSettings(stack_host="0.0.0.0")  # the flat name: refused, not ignored
    with pytest.raises(ValidationError, match="data_dir"):
        Settings(data_dir=tmp_path)  # a field of a group, not of Settings
    with pytest.raises(ValidationError, match="STACK_HOST"):
        Settings(stack=StackSettings(host=["not", "text"]))


def test_settings_are_frozen_and_replace_validates(clean_env):
    settings = Settings(database=DatabaseSettings(pool_size=2))
    with pytest.raises(ValidationError):
        settings.database.pool_size = 3  # type: ignore[misc]
    changed = settings.replace(stack={"host": "0.0.0.0", "auth_string": "ops:pw"}, database={"max_overflow": 1})
    assert changed.stack.auth_string.get_secret_value() == "ops:pw"
    assert (changed.database.pool_size, changed.database.max_overflow) == (2, 1)
    assert settings.stack.host == "127.0.0.1" and settings.stack.auth_string is None
    with pytest.raises(ValidationError, match="STACK_AUTH_STRING"):
        settings.replace(stack={"auth_string": "no-colon"})
    with pytest.raises(TypeError, match="no setting 'hots'"):
        settings.replace(stack={"hots": "0.0.0.0"})
    with pytest.raises(TypeError, match="no group 'stak'"):
        settings.replace(stak={"host": "0.0.0.0"})


def test_from_env_reads_variable_names_over_the_environment(clean_env):
    clean_env.setenv("TURNSTILES_CONCURRENCY", "3")
    settings = Settings.from_env({"OUTPUT_DIR": "/srv/out", "min_games_per_chunk": "1000"})
    assert settings.stack.output_dir == Path("/srv/out") and settings.lottery.min_games_per_chunk == 1000
    assert settings.turnstiles.concurrency == 3
    with pytest.raises(ValueError, match="unknown settings: TURNSTILE_CONCURRENCY"):
        Settings.from_env({"TURNSTILE_CONCURRENCY": "3"})


def test_get_settings_reads_once(clean_env):
    first = settings_module.get_settings()
    clean_env.setenv("DASK_N_WORKERS", "9")
    assert settings_module.get_settings() is first and first.dask.n_workers == 2
    settings_module.get_settings.cache_clear()
    assert settings_module.get_settings().dask.n_workers == 9


def test_groups_pickle_for_workers(clean_env):
    import pickle

    settings = Settings(turnstiles=TurnstilesSettings(concurrency=4))
    assert pickle.loads(pickle.dumps(settings)) == settings


def test_the_configuration_reference_is_generated_from_the_settings():
    committed = (PROJECT_ROOT / "docs" / "configuration.md").read_text()
    assert committed == render_markdown(), "regenerate: python -m operations.settings --markdown > docs/configuration.md"
    for variable in VARIABLES:
        assert f"| `{variable}` |" in committed
