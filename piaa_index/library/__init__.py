"""The library: `Library` (library.core) and its parts (tagging, searching, maintenance, vocabulary, ...).

This package imports nothing on purpose: importing one part must not import every part (the
CLI's start-up stays fast). Use `from piaa_index.library.core.core import Library` (or
`from piaa_index import Library`).
"""
