"""The base of every expected failure, so the CLI and the HTTP API map them in one place.

Kept free of heavy imports: the CLI's error path must not load torch to learn an exit code.
"""

from __future__ import annotations


class PiaaError(Exception):
    """The tool could not do its job (model, database, vector files): exit code 1, HTTP 500."""

    exit_code = 1


class UsageError(PiaaError):
    """The user asked for something malformed or unknown: exit code 2, HTTP 400."""

    exit_code = 2


class LibraryError(PiaaError):
    """A user-facing problem: bad query, unknown label, no vocabulary, model mismatch…"""


class UserInputError(UsageError, LibraryError):
    """The user asked for something malformed or unknown (CLI exit code 2)."""


class NotFoundError(UserInputError):
    """The user named something that is not there, e.g. an image id not indexed (HTTP 404)."""


# What SQLite says about a damaged file (its pages, its schema, a cell's text).
_DAMAGE_SIGNS = (
    "malformed",
    "not a database",
    "could not decode to utf-8",
    "database corrupt",
    "disk i/o error",
    "the database file is damaged",
)
DAMAGED_DATABASE_WAY_OUT = (
    "restore the database file from a backup, or copy out what SQLite can still read: "
    "`sqlite3 piaa.sqlite3 .recover | sqlite3 recovered.sqlite3`"
)


def is_damaged_database(reason: object) -> bool:
    """Whether a database error's text says the SQLite file itself is damaged."""
    text = str(reason).lower()
    return any(sign in text for sign in _DAMAGE_SIGNS)
