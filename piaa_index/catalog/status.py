"""Image status values, in the SQL schema (piaa_index/catalog/schema.py) and the read-only reader
(piaa_index/catalog/readonly.py), which starts without SQLAlchemy."""

INDEXED = "indexed"
FAILED = "failed"
MISSING_VECTORS = "missing_vectors"  # SQL row survived but its vector shard did not: re-encode
