"""API keys: `Authorization: Bearer KEY` or `X-API-Key: KEY`.

A key is a random 32-byte token; SQL keeps only its sha256 (`piaa keys create` prints the token
once). Scopes: `read` (queries, images, tags, status) and `write` (vocabulary, jobs, and every
read). `piaa serve` also makes a write key valid for that run only, never stored, and prints it
in the gallery URL's fragment (`#key=`), which browsers do not send to the server.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from piaa_index_plugins.http_api.errors import ApiError
from piaa_index_plugins.http_api.state import ApiState, get_state

from piaa_index.errors import UserInputError

SCOPES = ("read", "write")
TOKEN_PREFIX = "piaa_"

_bearer = HTTPBearer(auto_error=False, description="An API key (`piaa keys create`).")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key.")


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def create_key(library: object, scope: str, name: str | None = None) -> tuple[int, str]:
    """Store a new key in the library; (its id, the token to hand out, shown only now)."""
    if scope not in SCOPES:
        raise UserInputError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    token = new_token()
    key_id = library.add_api_key(  # type: ignore[attr-defined]
        hash_token(token), token[: len(TOKEN_PREFIX) + 6], scope, name
    )
    return key_id, token


def scope_of(state: ApiState, token: str | None) -> str | None:
    """The scope a presented token grants (None: no valid key)."""
    if not token:
        return None
    session = state.config.session_key
    if session and hmac.compare_digest(token.encode(), session.encode()):
        return "write"
    if len(token) > 200:  # never a key of ours; not worth a database round trip
        return None
    return state.library.api_key_scope(hash_token(token))


def _token(
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header: Annotated[str | None, Depends(_header)],
) -> str | None:
    if bearer is not None:
        return bearer.credentials
    return header


def _require(needed: str):  # type: ignore[no-untyped-def]
    def check(
        request: Request,
        token: Annotated[str | None, Depends(_token)],
        state: Annotated[ApiState, Depends(get_state)],
    ) -> str | None:
        scope = scope_of(state, token)
        if needed == "read" and state.config.public_read:
            return scope
        if scope is None:
            raise ApiError(
                401,
                "unauthorized",
                "an API key is required (Authorization: Bearer KEY or X-API-Key: KEY)"
                if not token
                else "unknown or revoked API key",
                {"WWW-Authenticate": "Bearer"},
            )
        if needed == "write" and scope != "write":
            raise ApiError(403, "forbidden", "this key may only read; writes need a write key")
        return scope

    return check


require_read = Depends(_require("read"))
require_write = Depends(_require("write"))
