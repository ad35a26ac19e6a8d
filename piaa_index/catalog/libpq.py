"""Postgres for the read-only twin through libpq itself (ctypes), not psycopg.

A fresh `piaa search` on Postgres spent more time importing psycopg (0.14-0.24 s: its error
classes, asyncio, ssl, its type adapters) than on the queries and the connection together
(~10 ms). The read-only twin only sends a handful of SELECTs and reads text results, which
libpq's C API does directly: loading the library takes ~20 ms. It is the libpq that psycopg's
binary wheel ships (the one psycopg itself would use), else the system's. Where neither loads,
`connect` raises `Unavailable` and the caller leaves the query to the Library.

Values arrive in Postgres's text format and are converted by column type the way psycopg
converts them (ints, floats, bools, JSON decoded, timestamps as datetimes, text as str), so
the twin's rows equal the Library's.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import json
import os
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

CONNECTION_OK = 0
COMMAND_OK, TUPLES_OK = 1, 2
_PLACEHOLDER = re.compile(r"\?")


class Error(Exception):
    """What the server or libpq reported (a failed statement, a lost connection)."""


class Unavailable(Error):
    """No libpq could be loaded here."""


def _number(text: str) -> int | float:
    return int(text) if text.lstrip("-").isdigit() else float(text)


# Postgres type oids -> the Python value psycopg gives for them (anything else: str).
_CONVERT: dict[int, Callable[[str], Any]] = {
    16: lambda v: v == "t",  # bool
    20: int,  # int8
    21: int,  # int2
    23: int,  # int4
    26: int,  # oid
    700: float,  # float4
    701: float,  # float8
    1700: _number,  # numeric (sum() of integers)
    114: json.loads,  # json
    3802: json.loads,  # jsonb
    1114: datetime.fromisoformat,  # timestamp (DateStyle ISO, set on connect)
    1184: datetime.fromisoformat,  # timestamptz
    17: lambda v: bytes.fromhex(v[2:]),  # bytea, hex output
}


def _candidates() -> list[str]:
    spec = importlib.util.find_spec("psycopg_binary")
    found: list[str] = []
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        libs = os.path.join(os.path.dirname(folder), "psycopg_binary.libs")
        found += sorted(glob.glob(os.path.join(libs, "libpq*.so*")))
        found += sorted(glob.glob(os.path.join(libs, "libpq*.dylib")))
    return found + ["libpq.so.5", "libpq.5.dylib", "libpq.dylib", "libpq.dll"]


_lib: Any = None


def _libpq() -> Any:
    global _lib
    if _lib is not None:
        return _lib
    for name in _candidates():
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        p, s, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        for func, restype, argtypes in (
            ("PQconnectdb", p, [s]),
            ("PQstatus", i, [p]),
            ("PQerrorMessage", s, [p]),
            ("PQfinish", None, [p]),
            ("PQexecParams", p, [p, s, i, p, ctypes.POINTER(s), p, p, i]),
            ("PQresultStatus", i, [p]),
            ("PQresultErrorMessage", s, [p]),
            ("PQntuples", i, [p]),
            ("PQnfields", i, [p]),
            ("PQftype", ctypes.c_uint, [p, i]),
            ("PQgetisnull", i, [p, i, i]),
            ("PQgetvalue", s, [p, i, i]),
            ("PQclear", None, [p]),
        ):
            f = getattr(lib, func)
            f.restype, f.argtypes = restype, argtypes
        _lib = lib
        return lib
    raise Unavailable("no libpq could be loaded")


def _param(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return b"t" if value else b"f"
    return str(value).encode()


class Connection:
    """One libpq connection; `execute` takes sqlite3-style statements (`?` parameters)."""

    def __init__(self, conninfo: str):
        self._pq = _libpq()
        self._conn = self._pq.PQconnectdb(conninfo.encode())
        if not self._conn or self._pq.PQstatus(self._conn) != CONNECTION_OK:
            message = self._message()
            self.close()
            raise Error(message)

    def _message(self) -> str:
        raw = self._pq.PQerrorMessage(self._conn) if self._conn else None
        return (raw or b"cannot connect").decode(errors="replace").strip()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        if not self._conn:
            raise Error("the connection is closed")
        numbered = iter(range(1, len(params) + 1))
        statement = _PLACEHOLDER.sub(lambda _: f"${next(numbered)}", sql)
        values = (ctypes.c_char_p * max(1, len(params)))(*map(_param, params))
        result = self._pq.PQexecParams(
            self._conn, statement.encode(), len(params), None, values, None, None, 0
        )
        if not result:
            raise Error(self._message())
        try:
            status = self._pq.PQresultStatus(result)
            if status not in (COMMAND_OK, TUPLES_OK):
                raw = self._pq.PQresultErrorMessage(result) or b""
                raise Error(raw.decode(errors="replace").strip() or self._message())
            return Rows(self._rows(result))
        finally:
            self._pq.PQclear(result)

    def _rows(self, result: int) -> list[tuple[Any, ...]]:
        pq = self._pq
        width = pq.PQnfields(result)
        converts = [_CONVERT.get(int(pq.PQftype(result, c)), str) for c in range(width)]
        rows = []
        for r in range(pq.PQntuples(result)):
            row: list[Any] = []
            for c, convert in enumerate(converts):
                if pq.PQgetisnull(result, r, c):
                    row.append(None)
                else:  # UTF-8 (set on connect); a bad byte raises UnicodeDecodeError
                    row.append(convert(pq.PQgetvalue(result, r, c).decode()))
            rows.append(tuple(row))
        return rows

    def close(self) -> None:
        if self._conn:
            self._pq.PQfinish(self._conn)
            self._conn = None


class Rows:
    """A finished statement's rows, in the cursor shape `sqlite3` gives."""

    def __init__(self, rows: list[tuple[Any, ...]]):
        self._rows = rows
        self._next = 0

    def fetchone(self) -> tuple[Any, ...] | None:
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchall(self) -> list[tuple[Any, ...]]:
        rest, self._next = self._rows[self._next :], len(self._rows)
        return rest

    def close(self) -> None:
        self._rows = []


def connect(url: str, timeout: int = 5) -> Connection:
    """A connection to `url` (postgresql://[user@]host[:port]/dbname), text in UTF-8 and
    timestamps in ISO format whatever the server's defaults."""
    sep = "&" if "?" in url else "?"
    options = "options=-c%20DateStyle%3DISO"
    return Connection(f"{url}{sep}connect_timeout={timeout}&client_encoding=UTF8&{options}")
