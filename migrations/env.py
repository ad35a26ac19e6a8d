"""Alembic environment: runs on the connection the store hands over (no URL in an ini file)."""

from alembic import context

from piaa_index.catalog.schema import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("piaa-index migrations run online only (piaa db upgrade)")
run_migrations_online()
