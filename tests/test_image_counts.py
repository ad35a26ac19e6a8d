"""Images per status are kept by triggers (migration 0007) and agree with a real count after
any mix of the store's writes, on SQLite and Postgres; `db check` rewrites counts that drifted."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from sqlalchemy import text

from piaa_index.catalog.common import utcnow
from piaa_index.catalog.readonly import ReadOnlyStore
from piaa_index.catalog.store import Store

FAILED, INDEXED = "failed", "indexed"


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new database of each backend (Postgres: a fresh one on PIAA_TEST_PG)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'piaa.sqlite3'}"
    return str(request.getfixturevalue("postgres_database")())


def _churn(store: Store, rounds: int, seed: int, folder: str = "photos") -> None:
    """Reserve, commit (indexed or failed), re-index, lose shards and remove images, at random,
    through the same Store methods the indexer, prune and `db check` use."""
    rng = random.Random(seed)
    serial = 0
    for _ in range(rounds):
        paths = [f"/{folder}/{serial + k:06d}.jpg" for k in range(rng.randint(200, 600))]
        serial += len(paths)
        ids = store.reserve_images(paths)
        shard = serial  # a new shard per commit group, as the indexer writes
        updates = []
        for row, image_id in enumerate(ids):
            if rng.random() < 0.1:
                updates.append({"id": image_id, "status": FAILED, "error": "unreadable"})
            elif rng.random() < 0.9:  # the rest stay pending (a crash before the commit)
                updates.append(
                    {"id": image_id, "status": INDEXED, "shard": shard, "shard_row": row}
                )
        failed_first_seen = [
            {"path": f"/{folder}/bad-{serial}-{k}.jpg", "size": 1, "mtime": 1.0}
            | {"status": FAILED, "error": "not an image", "indexed_at": utcnow()}
            for k in range(rng.randint(0, 5))
        ]
        store.commit_images(updates, failed_first_seen)
        live = store.live_locations()
        if live and rng.random() < 0.3:
            store.mark_shards_missing([rng.choice(live)[1]])
        if live and rng.random() < 0.5:
            gone = rng.sample([loc[0] for loc in live], k=min(len(live), rng.randint(1, 300)))
            store.remove_images(gone)


def test_counts_follow_every_write(url: str) -> None:
    store = Store.open(url)
    try:
        _churn(store, rounds=12, seed=5)
        real = store.counted_image_counts()
        assert sum(real.values()) > 2000  # thousands of rows went through every kind of write
        assert set(real) >= {"pending", INDEXED, FAILED, "missing_vectors"}
        assert store.image_counts() == real
        assert store.indexed_count() == real[INDEXED]
        assert store.repair_image_counts() is None  # nothing to rewrite
        if url.startswith("sqlite"):
            ro = ReadOnlyStore.open(url)
            assert ro is not None
            try:
                assert ro.image_counts() == real
                assert ro.indexed_count() == real[INDEXED]
            finally:
                ro.close()
    finally:
        store.close()


def test_db_check_rewrites_counts_that_drifted(tmp_path: Path) -> None:
    """Counts edited behind the triggers' back (a restored or hand-edited database) are found
    by `db check`'s repair and rewritten from a real count; queries then read true counts."""
    url = f"sqlite:///{tmp_path / 'piaa.sqlite3'}"
    store = Store.open(url)
    try:
        _churn(store, rounds=4, seed=9)
        real = store.counted_image_counts()
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE image_counts SET n = n + 7 WHERE status = 'indexed'"))
            conn.execute(text("DELETE FROM image_counts WHERE status = 'failed'"))
            conn.execute(text("INSERT INTO image_counts (status, n) VALUES ('gone', -3)"))
        assert store.image_counts() != real
        held = store.repair_image_counts()
        assert held is not None and held[INDEXED] == real[INDEXED] + 7 and FAILED not in held
        assert held["gone"] == -3  # hidden from readers, but drift all the same
        assert store.image_counts() == real
        assert store.repair_image_counts() is None
    finally:
        store.close()


def test_upgrade_counts_an_existing_library(url: str) -> None:
    """A database from before 0007 gets its counts from its rows when it is upgraded, and the
    migration goes down cleanly (no trigger left writing to a dropped table)."""
    from alembic import command

    from piaa_index.catalog.store import _alembic_config

    store = Store.open(url)
    try:
        _churn(store, rounds=2, seed=2)
        with store.engine.begin() as conn:
            command.downgrade(_alembic_config(conn), "0006")
        _churn(
            store, rounds=1, seed=3, folder="later"
        )  # written by the old schema: no triggers, no table
        real = store.counted_image_counts()
    finally:
        store.close()
    again = Store.open(url)
    try:
        assert again.schema_revision() == "0007"
        assert again.image_counts() == real
        assert again.indexed_count() == real[INDEXED]
    finally:
        again.close()
