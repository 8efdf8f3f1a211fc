"""Alembic environment: migrations run on the Flask app's own engine and models (Flask-Migrate),
under the release lock, so `flask db upgrade` and `flask release` never migrate at the same time."""

from __future__ import annotations

from alembic import context
from flask import current_app

from app.release import include_object, release_lock

migrate = current_app.extensions["migrate"]
target_metadata = migrate.db.metadata


def run_migrations_offline() -> None:
    """`flask db upgrade --sql`: print the SQL instead of running it."""
    url = migrate.db.engine.url.render_as_string(hide_password=False)
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True,
                      include_object=include_object, **migrate.configure_args)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = migrate.db.engine
    with release_lock(current_app._get_current_object()), engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          include_object=include_object, **migrate.configure_args)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
