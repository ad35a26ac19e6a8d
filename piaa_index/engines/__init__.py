"""Engines: the local indexer and the Ray Data engine (scan, decode, encode, write)."""
