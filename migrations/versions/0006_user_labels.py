"""Users' own labels (issue 21): keywords imported from sidecars or a CSV, tags confirmed or
rejected, examples of a taught concept. Kept apart from our tags, with their source.

`user_labels` has one row per image and label (the label's case-folded name, so "Dog" and
"dog" are one label; `name` keeps the spelling given): present or absent, where it came from,
and when. Its changes bump the catalog version like the tables of 0003, so every process
learns that the next fit must learn again.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BUMP = "UPDATE data_versions SET version = version + 1 WHERE name = 'catalog'"


def upgrade() -> None:
    op.create_table(
        "user_labels",
        sa.Column(
            "image_id",
            sa.Integer(),
            sa.ForeignKey("images.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("label", sa.Text(), primary_key=True),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("present", sa.Boolean(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_user_labels_label", "user_labels", ["label"])
    if op.get_bind().dialect.name == "postgresql":
        # piaa_bump_catalog() comes from 0003.
        op.execute(
            "CREATE TRIGGER piaa_bump_user_labels AFTER INSERT OR UPDATE OR DELETE ON "
            "user_labels FOR EACH STATEMENT EXECUTE PROCEDURE piaa_bump_catalog()"
        )
    else:
        for event in ("INSERT", "UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER piaa_bump_user_labels_{event.lower()} AFTER {event} ON "
                f"user_labels BEGIN {BUMP}; END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS piaa_bump_user_labels ON user_labels")
    else:
        for event in ("insert", "update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS piaa_bump_user_labels_{event}")
    op.drop_index("ix_user_labels_label", "user_labels")
    op.drop_table("user_labels")
