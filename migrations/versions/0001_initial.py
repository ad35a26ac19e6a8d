"""Initial schema: settings, images, vocabularies, labels, classifiers, tags.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "settings",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.JSON(), nullable=False),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("path", sa.Text(), nullable=False, unique=True),
        sa.Column("content_hash", sa.String(64), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("mtime", sa.Float(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("shard", sa.Integer(), nullable=True),
        sa.Column("shard_row", sa.Integer(), nullable=True),
        sa.Column("indexed_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_images_content_hash", "images", ["content_hash"])
    op.create_index("ix_images_status", "images", ["status"])
    op.create_index("ix_images_shard", "images", ["shard"])
    op.create_table(
        "vocabularies",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("templates", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "labels",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "vocabulary_id",
            sa.Integer(),
            sa.ForeignKey("vocabularies.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("templates", sa.JSON(), nullable=True),
    )
    op.create_index("ix_labels_vocab_name", "labels", ["vocabulary_id", "name"], unique=True)
    op.create_table(
        "classifiers",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "vocabulary_id",
            sa.Integer(),
            sa.ForeignKey("vocabularies.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("n_images", sa.Integer(), nullable=False),
        sa.Column("n_patches", sa.Integer(), nullable=False),
        sa.Column("fit_seconds", sa.Float(), nullable=False),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.Column("thresholds", sa.JSON(), nullable=True),
        sa.Column("weights", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "tags",
        sa.Column(
            "image_id",
            sa.Integer(),
            sa.ForeignKey("images.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "label_id",
            sa.Integer(),
            sa.ForeignKey("labels.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "classifier_id",
            sa.Integer(),
            sa.ForeignKey("classifiers.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("patch_score", sa.Float(), nullable=False),
        sa.Column("cls_score", sa.Float(), nullable=False),
        sa.Column("present", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_tags_label_score", "tags", ["label_id", "score"])


def downgrade() -> None:
    op.drop_table("tags")
    op.drop_table("classifiers")
    op.drop_index("ix_labels_vocab_name", table_name="labels")
    op.drop_table("labels")
    op.drop_table("vocabularies")
    op.drop_table("images")
    op.drop_table("settings")
