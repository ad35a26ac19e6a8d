"""Ingest: finding image files, decoding them, bounded reads."""
