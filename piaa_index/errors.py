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
