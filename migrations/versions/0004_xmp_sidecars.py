"""XMP sidecars piaa-index wrote, so that `piaa export xmp --undo` can put them back.

`xmp_sidecars` has one row per sidecar file we created or changed: whether we created it, the
bytes it had before our first write (restored by undo when nobody touched the file since), and
the SHA-256 of the bytes of our last write (how undo knows nobody did), and of the keywords it
carried (a re-export that would write the same keywords into an untouched file skips parsing it).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "xmp_sidecars",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("path", sa.Text(), nullable=False, unique=True),
        sa.Column("created", sa.Boolean(), nullable=False),
        sa.Column("original", sa.LargeBinary(), nullable=True),
        sa.Column("written_sha256", sa.String(64), nullable=False),
        sa.Column("keywords_sha256", sa.String(64), nullable=False),
        sa.Column("written_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("xmp_sidecars")
