"""Index image paths in byte order on Postgres, for the per-root range scans of an index run.

`Store.images_under` compares paths with COLLATE "C" so that "everything under a folder" is one
index range whatever the database's locale; the unique index on `path` uses the database's
collation and cannot serve it. SQLite compares bytes already (BINARY), so it needs nothing.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.create_index("ix_images_path_bytes", "images", [sa.text('path COLLATE "C"')])


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_images_path_bytes", table_name="images")
