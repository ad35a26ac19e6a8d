"""The read-only twin's libpq client gives the values psycopg gives, for every column type the
catalog holds, and reports errors as `libpq.Error` without losing the connection's state."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest

from piaa_index.catalog import libpq

TYPES = """
CREATE TABLE kinds (
    id integer PRIMARY KEY, big bigint, small smallint, flag boolean, x double precision,
    y real, total numeric, doc json, docb jsonb, at timestamp, blob bytea, name text,
    short varchar(16)
)
"""
ROW = "INSERT INTO kinds VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"


@pytest.fixture(scope="module")
def url(postgres_database: Callable[[], str]) -> str:
    full = postgres_database()
    plain = full.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(TYPES)
        rows = []
        for i in range(3000):  # thousands of rows through one result
            rows.append(
                (
                    i,
                    2**40 + i,
                    i % 300 - 150,
                    i % 3 == 0,
                    i / 7,
                    i / 3,
                    None if i % 11 == 0 else i * 10,
                    psycopg.types.json.Json({"i": i, "name": f"é{i}", "list": [1, 2.5, None]}),
                    psycopg.types.json.Jsonb({"deep": {"x": i}}),
                    f"2026-12-0{1 + i % 5} 10:{i % 60:02d}:0{i % 10}.{i:06d}",
                    bytes([i % 256, 0, 255]),
                    f"/photos/ümlaut {i} 'quoted' ?.jpg",
                    f"s{i % 10}",
                )
            )
        with conn.cursor() as cur:
            cur.executemany(ROW, rows)
    return plain


def test_rows_equal_psycopgs(url: str) -> None:
    ours = libpq.connect(url)
    try:
        mine = ours.execute("SELECT * FROM kinds ORDER BY id").fetchall()
        # sum() of integers is numeric in Postgres; an aggregate of a parameter
        extra = ours.execute(
            "SELECT sum(big), count(*), min(name) FROM kinds WHERE id < ? AND flag = ?",
            (1000, True),
        ).fetchone()
    finally:
        ours.close()
    with psycopg.connect(url) as conn:
        theirs = [tuple(r) for r in conn.execute("SELECT * FROM kinds ORDER BY id").fetchall()]
        sums = conn.execute(
            "SELECT sum(big), count(*), min(name) FROM kinds WHERE id < %s AND flag = %s",
            (1000, True),
        ).fetchone()
    assert len(mine) == 3000
    for a, b in zip(mine, theirs, strict=True):
        assert a[:6] == b[:6]
        assert a[6] == (None if b[6] is None else int(b[6]))  # psycopg: Decimal
        assert a[7:] == b[7:]
    assert extra == (int(sums[0]), sums[1], sums[2])


def test_parameters_and_nulls(url: str) -> None:
    conn = libpq.connect(url)
    try:
        rows = conn.execute(
            "SELECT id, name FROM kinds WHERE name = ? OR id IN (?, ?) ORDER BY id",
            ("/photos/ümlaut 5 'quoted' ?.jpg", 7, 9),
        ).fetchall()
        assert [r[0] for r in rows] == [5, 7, 9]
        assert conn.execute("SELECT ?::text IS NULL", (None,)).fetchone() == (True,)
        cursor = conn.execute("SELECT id FROM kinds WHERE id < 3 ORDER BY id")
        assert cursor.fetchone() == (0,)
        assert cursor.fetchall() == [(1,), (2,)]
        assert cursor.fetchone() is None
    finally:
        conn.close()


def test_errors_are_reported_and_the_connection_goes_on(url: str) -> None:
    conn = libpq.connect(url)
    try:
        with pytest.raises(libpq.Error, match="no_such_table"):
            conn.execute("SELECT * FROM no_such_table")
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        with pytest.raises(libpq.Error, match="read-only"):
            conn.execute("DELETE FROM kinds")
        conn.execute("ROLLBACK")
        assert conn.execute("SELECT count(*) FROM kinds").fetchone() == (3000,)
    finally:
        conn.close()
    with pytest.raises(libpq.Error, match="closed"):
        conn.execute("SELECT 1")
    with pytest.raises(libpq.Error):
        libpq.connect("postgresql://postgres@127.0.0.1:1/nowhere", timeout=2)
