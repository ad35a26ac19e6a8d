"""The catalog: every SQL statement (SQLAlchemy store, its schema and migrations hook, the read-only sqlite3 twin, the image status values)."""
