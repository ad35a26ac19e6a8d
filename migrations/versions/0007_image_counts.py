"""Images per status, kept by triggers.

Every query command checked that the score matrix holds every indexed image with
`SELECT count(*) FROM images WHERE status = 'indexed'`, and `status` grouped every image by
status: a walk of the status index, 25-50 ms each at a million images, in every fresh process.
`image_counts` holds the same numbers, kept by triggers on `images` whoever writes it (like
`data_versions` in 0003), so a count is one indexed read. Rows may reach 0 and stay; readers
skip them. `piaa db check` compares the table with a real count and rewrites it if they differ.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# Postgres: statement-level triggers with transition tables, one upsert per statement however
# many rows it touches; statuses in a fixed order so concurrent writers lock rows alike.
UPSERT = (
    "INSERT INTO image_counts (status, n) {rows} "
    "ON CONFLICT (status) DO UPDATE SET n = image_counts.n + EXCLUDED.n"
)
PG_DELTAS = {
    "insert": "SELECT status, count(*) FROM new_rows GROUP BY status ORDER BY status",
    "delete": "SELECT status, -count(*) FROM old_rows GROUP BY status ORDER BY status",
    # Only statuses whose count moved: an update that keeps the status locks nothing.
    "update": (
        "SELECT status, sum(k) FROM (SELECT status, 1 AS k FROM new_rows "
        "UNION ALL SELECT status, -1 FROM old_rows) moved "
        "GROUP BY status HAVING sum(k) <> 0 ORDER BY status"
    ),
}
PG_TABLES = {
    "insert": "NEW TABLE AS new_rows",
    "delete": "OLD TABLE AS old_rows",
    "update": "OLD TABLE AS old_rows NEW TABLE AS new_rows",
}
ADD_NEW = (
    "INSERT INTO image_counts (status, n) VALUES (NEW.status, 1) "
    "ON CONFLICT (status) DO UPDATE SET n = n + 1"
)
SUB_OLD = "UPDATE image_counts SET n = n - 1 WHERE status = OLD.status"
SQLITE_TRIGGERS = {
    "insert": f"AFTER INSERT ON images BEGIN {ADD_NEW}; END",
    "delete": f"AFTER DELETE ON images BEGIN {SUB_OLD}; END",
    "update": (
        "AFTER UPDATE OF status ON images WHEN OLD.status IS NOT NEW.status "
        f"BEGIN {SUB_OLD}; {ADD_NEW}; END"
    ),
}


def upgrade() -> None:
    op.create_table(
        "image_counts",
        sa.Column("status", sa.String(16), primary_key=True),
        sa.Column("n", sa.BigInteger(), nullable=False),
    )
    op.execute(
        "INSERT INTO image_counts (status, n) SELECT status, count(*) FROM images GROUP BY status"
    )
    if op.get_bind().dialect.name == "postgresql":
        for event, delta in PG_DELTAS.items():
            op.execute(
                f"CREATE FUNCTION piaa_count_images_{event}() RETURNS trigger LANGUAGE plpgsql "
                f"AS $$ BEGIN {UPSERT.format(rows=delta)}; RETURN NULL; END $$"
            )
            op.execute(
                f"CREATE TRIGGER piaa_count_images_{event} AFTER {event.upper()} ON images "
                f"REFERENCING {PG_TABLES[event]} FOR EACH STATEMENT "
                f"EXECUTE PROCEDURE piaa_count_images_{event}()"
            )
    else:
        for event, body in SQLITE_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER piaa_count_images_{event} {body}")


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for event in PG_DELTAS:
        op.execute(
            f"DROP TRIGGER IF EXISTS piaa_count_images_{event}" + (" ON images" if postgres else "")
        )
        if postgres:
            op.execute(f"DROP FUNCTION IF EXISTS piaa_count_images_{event}()")
    op.drop_table("image_counts")
