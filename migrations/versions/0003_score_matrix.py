"""Score matrices on disk, sparse tags in SQL, and a catalog version counter.

- `tags` keeps only present labels (image, label, classifier, fused score): every score of
  every label now lives in the classifier's memory-mapped score matrix (piaa_index/vectors/scores.py).
  Absent rows are deleted and the per-branch columns dropped.
- `classifiers.scores_key` names the classifier's score folder and `score_segments` lists its
  committed segments (files are written and fsynced first, then SQL points at them). Existing
  classifiers get no key: the next query re-scores with the stored classifier (no refit).
- `data_versions('catalog')` is bumped by triggers on every change to images, classifiers and
  vocabularies, whoever makes it (the indexer, another process), so a cached Library checks one
  row per query instead of scanning the collection.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

WATCHED = ("images", "classifiers", "vocabularies")
BUMP = "UPDATE data_versions SET version = version + 1 WHERE name = 'catalog'"


def upgrade() -> None:
    op.create_table(
        "data_versions",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("version", sa.BigInteger(), nullable=False),
    )
    op.execute("INSERT INTO data_versions (name, version) VALUES ('catalog', 1)")
    with op.batch_alter_table("classifiers") as batch:
        batch.add_column(sa.Column("scores_key", sa.String(40), nullable=True))
        batch.add_column(sa.Column("score_segments", sa.JSON(), nullable=True))
    op.execute("DELETE FROM tags WHERE NOT present")
    with op.batch_alter_table("tags") as batch:
        batch.drop_column("patch_score")
        batch.drop_column("cls_score")
        batch.drop_column("present")
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(
            "CREATE FUNCTION piaa_bump_catalog() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN {BUMP}; RETURN NULL; END $$"
        )
        for table in WATCHED:
            # Statement-level: one bump per statement, however many rows it touches.
            op.execute(
                f"CREATE TRIGGER piaa_bump_{table} AFTER INSERT OR UPDATE OR DELETE ON {table} "
                "FOR EACH STATEMENT EXECUTE PROCEDURE piaa_bump_catalog()"
            )
    else:  # SQLite has row-level triggers only
        for table in WATCHED:
            for event in ("INSERT", "UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER piaa_bump_{table}_{event.lower()} AFTER {event} ON {table} "
                    f"BEGIN {BUMP}; END"
                )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        for table in WATCHED:
            op.execute(f"DROP TRIGGER IF EXISTS piaa_bump_{table} ON {table}")
        op.execute("DROP FUNCTION IF EXISTS piaa_bump_catalog()")
    else:
        for table in WATCHED:
            for event in ("insert", "update", "delete"):
                op.execute(f"DROP TRIGGER IF EXISTS piaa_bump_{table}_{event}")
    # Sparse rows were all present; the branch scores are gone (the next fit rewrites them).
    with op.batch_alter_table("tags") as batch:
        batch.add_column(sa.Column("patch_score", sa.Float(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("cls_score", sa.Float(), nullable=False, server_default="0"))
        batch.add_column(
            sa.Column("present", sa.Boolean(), nullable=False, server_default=sa.true())
        )
    with op.batch_alter_table("classifiers") as batch:
        batch.drop_column("score_segments")
        batch.drop_column("scores_key")
    op.drop_table("data_versions")
