"""API keys and the change feed of the HTTP API.

- `api_keys`: keys of `piaa serve`, stored as the sha256 of the token (the token itself is
  printed once by `piaa keys create`), with a scope (read / write) and a revocation time.
- `image_changes`: for each image, the feed version of its last change that a sync client
  cares about (indexed or re-encoded, its present tags changed, removed). No foreign key:
  a removed image keeps its row so that a client learns of the removal.
- `data_versions('feed')`: the feed counter, bumped once per writing transaction (its row lock
  orders the writers, so a client that saw version v never misses a change numbered <= v).
  Existing images are entered at version 1 so that `since=0` lists them all.

Revision ID: 0005
Revises: 0003
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("scope", sa.String(8), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
    )
    op.create_table(
        "image_changes",
        sa.Column("image_id", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_image_changes_version", "image_changes", ["version"])
    op.execute("INSERT INTO data_versions (name, version) VALUES ('feed', 1)")
    op.execute("INSERT INTO image_changes (image_id, version) SELECT id, 1 FROM images")


def downgrade() -> None:
    op.execute("DELETE FROM data_versions WHERE name = 'feed'")
    op.drop_index("ix_image_changes_version", table_name="image_changes")
    op.drop_table("image_changes")
    op.drop_table("api_keys")
