"""Boolean label queries: ``dog AND (cat OR "fire hydrant") AND NOT person``.

Grammar (NOT binds tighter than AND, which binds tighter than OR)::

    expr := or
    or   := and (OR and)*
    and  := not (AND not)*
    not  := NOT not | atom
    atom := '(' expr ')' | label

Operators are the keywords ``AND``, ``OR``, ``NOT`` (any case) and the symbols ``&``, ``|``,
``!`` (``&&`` and ``||`` are accepted too); ``-`` is NOT when it starts an operand (``-person``).
A label is a quoted string (``"fire hydrant"`` or ``'fire hydrant'``; a backslash escapes a quote
or a backslash) or a run of bare words that are not operators (``red circle`` is one label).
Labels are compared case-insensitively (``str.casefold``) with whitespace collapsed.

Stdlib only, so importing it is cheap; see docs/query-language.md for the user reference.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "MAX_DEPTH",
    "And",
    "Label",
    "Node",
    "Not",
    "Or",
    "QueryError",
    "QuerySyntaxError",
    "UnknownLabelError",
    "normalize_label",
    "parse",
    "required_labels",
]

# Parentheses plus NOTs a query may nest; bounds recursion so hostile input gets a QueryError,
# never a RecursionError.
MAX_DEPTH = 100

# How many known labels an UnknownLabelError message lists before eliding the rest.
_KNOWN_SHOWN = 10


def normalize_label(name: str) -> str:
    """Return the matching key of a label: casefolded, whitespace collapsed to single spaces."""
    return " ".join(name.split()).casefold()


# --------------------------------------------------------------------------------------- errors


class QueryError(ValueError):
    """Base class of every error a query can raise."""


class QuerySyntaxError(QueryError):
    """The query text does not follow the grammar."""

    def __init__(self, reason: str, text: str = "", position: int = 0) -> None:
        self.reason = reason
        self.text = text
        self.position = position  # 0-based offset into text; messages show column = position + 1
        super().__init__(reason + _caret_block(text, position))

    @property
    def column(self) -> int:
        """1-based column of the problem, as shown in the message."""
        return self.position + 1

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.text, self.position))


class UnknownLabelError(QueryError):
    """The query names labels outside the known vocabulary."""

    def __init__(self, labels: Iterable[str], known: Iterable[str] = ()) -> None:
        self.labels = sorted(set(labels))
        self.known = sorted(set(known))
        self.suggestions = {
            name: difflib.get_close_matches(name, self.known, n=3, cutoff=0.6)
            for name in self.labels
        }
        super().__init__(self._message())

    def _message(self) -> str:
        """Build the one-line summary plus one 'did you mean' line per near miss."""
        if self.known:
            shown = ", ".join(self.known[:_KNOWN_SHOWN])
            more = len(self.known) - _KNOWN_SHOWN
            known = f"known: {shown}, ... {more} more" if more > 0 else f"known: {shown}"
        else:
            known = "no labels are known"
        lines = [f"unknown label(s): {', '.join(self.labels)} ({known})"]
        for name, close in self.suggestions.items():
            if close:
                options = " or ".join(f'"{c}"' for c in close)
                lines.append(f"  {name}: did you mean {options}?")
        return "\n".join(lines)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.labels, self.known))


def _caret_block(text: str, position: int) -> str:
    """Echo the query (windowed if long) with a caret under position."""
    if not text.strip():
        return ""
    start = max(0, position - 60)
    end = min(len(text), start + 100)
    # One output character per input character keeps the caret aligned.
    shown = "".join(" " if c.isspace() else c if c.isprintable() else "?" for c in text[start:end])
    prefix = "..." if start else ""
    suffix = "..." if end < len(text) else ""
    caret = " " * (len(prefix) + position - start) + "^"
    return f"\n  {prefix}{shown}{suffix}\n  {caret}"


# ------------------------------------------------------------------------------------------ AST


class _Values:
    """Looks labels up in a caller's mapping, normalising its keys only when a direct hit fails."""

    __slots__ = ("_mapping", "_normalised")

    def __init__(self, mapping: Mapping[str, Any]) -> None:
        self._mapping = mapping
        self._normalised: dict[str, Any] | None = None

    def get(self, name: str, default: Any) -> Any:
        """Return the value for the normalised label name, or default when absent."""
        if name in self._mapping:
            return self._mapping[name]
        if self._normalised is None:
            self._normalised = {normalize_label(k): v for k, v in self._mapping.items()}
        return self._normalised.get(name, default)


class Node:
    """Base class of query AST nodes."""

    __slots__ = ()

    def labels(self) -> frozenset[str]:
        """Return every (normalised) label the query mentions."""
        raise NotImplementedError

    def evaluate(self, present: Mapping[str, bool]) -> bool:
        """Return whether a photo with these labels matches; absent labels count as False."""
        return self._evaluate(_Values(present))

    def score(self, scores: Mapping[str, float]) -> float:
        """Return the ranking score in [0, 1]: AND = min, OR = max, NOT = 1 - x; absent = 0."""
        return self._score(_Values(scores))

    def _evaluate(self, values: _Values) -> bool:
        raise NotImplementedError

    def _score(self, values: _Values) -> float:
        raise NotImplementedError

    def _format(self) -> str:
        raise NotImplementedError

    def __str__(self) -> str:
        return self._format()


def _check_children(kind: str, children: Any) -> tuple[Node, ...]:
    """Validate And/Or children: at least two Nodes (one would print as a bare child)."""
    children = tuple(children)
    if len(children) < 2:
        raise ValueError(f"{kind} needs at least two children, got {len(children)}")
    for child in children:
        if not isinstance(child, Node):
            raise TypeError(f"{kind} children must be Nodes, got {type(child).__name__}")
    return children


@dataclass(frozen=True)
class Label(Node):
    """A single label; the name is stored normalised (see normalize_label)."""

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"label name must be str, got {type(self.name).__name__}")
        normalised = normalize_label(self.name)
        if not normalised:
            raise ValueError("label name is empty")
        object.__setattr__(self, "name", normalised)

    def labels(self) -> frozenset[str]:
        """Return the one label."""
        return frozenset((self.name,))

    def _evaluate(self, values: _Values) -> bool:
        return bool(values.get(self.name, False))

    def _score(self, values: _Values) -> float:
        return float(values.get(self.name, 0.0))

    def _format(self) -> str:
        if _is_bare(self.name):
            return self.name
        escaped = self.name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'


@dataclass(frozen=True)
class And(Node):
    """True when every child is true."""

    children: tuple[Node, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "children", _check_children("And", self.children))

    def labels(self) -> frozenset[str]:
        """Return the union of the children's labels."""
        return frozenset().union(*(c.labels() for c in self.children))

    def _evaluate(self, values: _Values) -> bool:
        return all(c._evaluate(values) for c in self.children)

    def _score(self, values: _Values) -> float:
        return min(c._score(values) for c in self.children)

    def _format(self) -> str:
        # An And or Or child needs parentheses to come back as a separate node.
        return " AND ".join(
            f"({c._format()})" if isinstance(c, And | Or) else c._format() for c in self.children
        )


@dataclass(frozen=True)
class Or(Node):
    """True when any child is true."""

    children: tuple[Node, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "children", _check_children("Or", self.children))

    def labels(self) -> frozenset[str]:
        """Return the union of the children's labels."""
        return frozenset().union(*(c.labels() for c in self.children))

    def _evaluate(self, values: _Values) -> bool:
        return any(c._evaluate(values) for c in self.children)

    def _score(self, values: _Values) -> float:
        return max(c._score(values) for c in self.children)

    def _format(self) -> str:
        # AND binds tighter than OR, so only a nested Or needs parentheses.
        return " OR ".join(
            f"({c._format()})" if isinstance(c, Or) else c._format() for c in self.children
        )


@dataclass(frozen=True)
class Not(Node):
    """True when the child is false."""

    child: Node

    def __post_init__(self) -> None:
        if not isinstance(self.child, Node):
            raise TypeError(f"Not child must be a Node, got {type(self.child).__name__}")

    def labels(self) -> frozenset[str]:
        """Return the child's labels."""
        return self.child.labels()

    def _evaluate(self, values: _Values) -> bool:
        return not self.child._evaluate(values)

    def _score(self, values: _Values) -> float:
        return 1.0 - self.child._score(values)

    def _format(self) -> str:
        inner = self.child._format()
        return f"NOT ({inner})" if isinstance(self.child, And | Or) else f"NOT {inner}"


def required_labels(node: Node) -> frozenset[str] | None:
    """Return labels every match must have if node is a Label or And, else None."""
    # Only the positive Label conjuncts (nested Ands flattened) are collected; other conjuncts
    # (NOT x, a OR b) still constrain the match, so callers prefilter with this and then evaluate.
    if isinstance(node, Label):
        return node.labels()
    if not isinstance(node, And):
        return None
    required: set[str] = set()
    stack: list[Node] = list(node.children)
    while stack:
        child = stack.pop()
        if isinstance(child, Label):
            required.add(child.name)
        elif isinstance(child, And):
            stack.extend(child.children)
    return frozenset(required)


# ------------------------------------------------------------------------------------ tokenizer

_LPAREN, _RPAREN, _AND, _OR, _NOT, _WORD, _QUOTED, _EOF = (
    "(",
    ")",
    "AND",
    "OR",
    "NOT",
    "word",
    "quoted",
    "end",
)
_KEYWORDS = {"and": _AND, "or": _OR, "not": _NOT}
_SYMBOLS = {"(": _LPAREN, ")": _RPAREN, "&": _AND, "|": _OR, "!": _NOT, "-": _NOT}
_WORD_BREAK = frozenset("()&|!")  # end a bare word; '-' and quotes only matter at a word's start
_WORD_START_BAN = frozenset("\"'-")
_ESCAPABLE = frozenset("\"'\\")


class _Token(NamedTuple):
    kind: str
    value: str  # the label text for words and quoted strings, else the raw text
    start: int
    end: int


def _is_bare(name: str) -> bool:
    """Return whether a normalised name reads back as itself without quotes."""
    for word in name.split(" "):
        if (
            not word
            or word[0] in _WORD_START_BAN
            or word in _KEYWORDS
            or not _WORD_BREAK.isdisjoint(word)
        ):
            return False
    return True


def _tokenize(text: str) -> Iterator[_Token]:
    """Yield tokens lazily (so errors surface left to right), ending with one EOF token."""
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in _SYMBOLS:
            end = i + 2 if ch in "&|" and text.startswith(ch * 2, i) else i + 1
            yield _Token(_SYMBOLS[ch], text[i:end], i, end)
            i = end
        elif ch in "\"'":
            token = _scan_quoted(text, i)
            yield token
            i = token.end
        else:
            j = i + 1
            while j < n and not text[j].isspace() and text[j] not in _WORD_BREAK:
                j += 1
            word = text[i:j]
            yield _Token(_KEYWORDS.get(word.casefold(), _WORD), word, i, j)
            i = j
    yield _Token(_EOF, "", n, n)


def _scan_quoted(text: str, start: int) -> _Token:
    """Scan a quoted label starting at text[start]; a backslash escapes a quote or backslash."""
    quote = text[start]
    out: list[str] = []
    i, n = start + 1, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n and text[i + 1] in _ESCAPABLE:
            out.append(text[i + 1])
            i += 2
        elif ch == quote:
            return _Token(_QUOTED, "".join(out), start, i + 1)
        else:
            out.append(ch)
            i += 1
    raise QuerySyntaxError(f"unterminated quote opened at column {start + 1}", text, start)


# --------------------------------------------------------------------------------------- parser


class _Parser:
    """Recursive-descent parser over a lazy token stream with one token of lookahead."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.tok = next(self.tokens)
        self.prev: _Token | None = None
        self.depth = 0

    def advance(self) -> None:
        """Move to the next token; never called on EOF."""
        self.prev = self.tok
        self.tok = next(self.tokens)

    def error(self, reason: str, position: int) -> QuerySyntaxError:
        """Build a syntax error for this query."""
        return QuerySyntaxError(reason, self.text, position)

    def source(self, token: _Token) -> str:
        """Return the token as typed, quoted for messages and shortened if long."""
        raw = self.text[token.start : token.end]
        if len(raw) > 20:
            raw = raw[:20] + "..."
        return f"'{raw}'"

    def enter(self, token: _Token) -> None:
        """Count one nesting level (a '(' or a NOT) and refuse absurd depths."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(
                f"query nests more than {MAX_DEPTH} levels deep at column {token.start + 1}",
                token.start,
            )

    def parse(self) -> Node:
        """Parse the whole text."""
        node = self.parse_or()
        if self.tok.kind == _RPAREN:
            raise self.error(f"unexpected ')' at column {self.tok.start + 1}", self.tok.start)
        if self.tok.kind != _EOF:
            raise self.missing_operator()
        return node

    def parse_or(self) -> Node:
        """Parse `and (OR and)*`."""
        children = [self.parse_and()]
        while self.tok.kind == _OR:
            self.advance()
            children.append(self.parse_and())
        return children[0] if len(children) == 1 else Or(tuple(children))

    def parse_and(self) -> Node:
        """Parse `not (AND not)*`."""
        children = [self.parse_not()]
        while self.tok.kind == _AND:
            self.advance()
            children.append(self.parse_not())
        return children[0] if len(children) == 1 else And(tuple(children))

    def parse_not(self) -> Node:
        """Parse `NOT not | atom`."""
        if self.tok.kind != _NOT:
            return self.parse_atom()
        self.enter(self.tok)
        self.advance()
        node = Not(self.parse_not())
        self.depth -= 1
        return node

    def parse_atom(self) -> Node:
        """Parse `'(' expr ')' | label`."""
        tok = self.tok
        if tok.kind == _LPAREN:
            self.enter(tok)
            self.advance()
            node = self.parse_or()
            if self.tok.kind == _EOF:
                raise self.error(f"missing ')' opened at column {tok.start + 1}", tok.start)
            if self.tok.kind != _RPAREN:
                raise self.missing_operator()
            self.advance()
            self.depth -= 1
            return node
        if tok.kind == _WORD:
            words = []
            while self.tok.kind == _WORD:
                words.append(self.tok.value)
                self.advance()
            return Label(" ".join(words))
        if tok.kind == _QUOTED:
            if not tok.value.split():
                raise self.error(f"empty quoted label at column {tok.start + 1}", tok.start)
            self.advance()
            return Label(tok.value)
        raise self.missing_operand()

    def missing_operand(self) -> QuerySyntaxError:
        """Explain why no operand starts at the current token (')', an operator, or the end)."""
        tok, prev = self.tok, self.prev
        if prev is not None and prev.kind in (_AND, _OR):
            return self.error(
                f"{prev.kind} needs a label on both sides at column {prev.start + 1}", prev.start
            )
        if prev is not None and prev.kind == _NOT:
            return self.error(f"NOT needs a label after it at column {prev.start + 1}", prev.start)
        if tok.kind in (_AND, _OR):
            # Nothing usable on the operator's left: start of query or right after '('.
            return self.error(
                f"{tok.kind} needs a label on both sides at column {tok.start + 1}", tok.start
            )
        if prev is not None and prev.kind == _LPAREN:
            if tok.kind == _RPAREN:
                return self.error(f"empty parentheses at column {prev.start + 1}", prev.start)
            return self.error(f"missing ')' opened at column {prev.start + 1}", prev.start)
        if tok.kind == _RPAREN:
            return self.error(f"unexpected ')' at column {tok.start + 1}", tok.start)
        return self.error("empty query", 0)

    def missing_operator(self) -> QuerySyntaxError:
        """Explain an operand that follows another operand with no AND/OR between them."""
        tok = self.tok
        return self.error(
            f"missing AND or OR before {self.source(tok)} at column {tok.start + 1}", tok.start
        )


def parse(text: str, known_labels: Iterable[str] | None = None) -> Node:
    """Parse a query; with known_labels, also reject labels outside that vocabulary."""
    if not isinstance(text, str):
        raise TypeError(f"query must be str, got {type(text).__name__}")
    node = _Parser(text).parse()
    if known_labels is not None:
        if isinstance(known_labels, str):
            raise TypeError("known_labels must be an iterable of labels, not a single str")
        known = {normalize_label(k) for k in known_labels}
        known.discard("")
        unknown = node.labels() - known
        if unknown:
            raise UnknownLabelError(unknown, known)
    return node
