"""Shared fixtures: every test gets its own PIAA_HOME; models are tiny and built offline."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.conftest_models import tiny_model_config  # noqa: F401  (fixture re-export)
from tests.shapes_library import shapes_home  # noqa: F401  (fixture re-export)


@pytest.fixture(autouse=True)
def piaa_home(tmp_path, monkeypatch):
    """Isolate every test's data folder and environment."""
    home = tmp_path / "piaa-home"
    monkeypatch.setenv("PIAA_HOME", str(home))
    for var in ("PIAA_DB", "PIAA_MODEL", "PIAA_PRETRAINED", "PIAA_FRONT_END", "PIAA_DEVICE"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[Callable[[], str]]:
    """A factory of fresh Postgres databases (PIAA_TEST_PG = server URL), all dropped after."""
    base = os.environ.get("PIAA_TEST_PG")
    if not base:
        pytest.skip(
            "PIAA_TEST_PG is not set (e.g. postgresql+psycopg://postgres@127.0.0.1/postgres)"
        )
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def create() -> str:
        name = f"piaa_test_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return make_url(base).set(database=name).render_as_string(hide_password=False)

    try:
        yield create
    finally:
        with admin.connect() as conn:
            for name in made:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
                    ),
                    {"n": name},
                )
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url(postgres_database: Callable[[], str]) -> str:
    """A fresh Postgres database shared by this test run's Postgres tests."""
    return postgres_database()
