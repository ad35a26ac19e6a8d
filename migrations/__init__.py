"""Alembic environment and versions for piaa-index's SQL schema (import name `piaa_index_migrations`)."""
