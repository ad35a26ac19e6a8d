"""Tests for the boolean label query language (piaa_index/query/language.py)."""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from piaa_index.query.language import (
    MAX_DEPTH,
    And,
    Label,
    Node,
    Not,
    Or,
    QueryError,
    QuerySyntaxError,
    UnknownLabelError,
    normalize_label,
    parse,
    required_labels,
)

# Modest example counts keep the whole file to a few seconds on a shared 2-core box.
FAST = settings(max_examples=150, deadline=None)

L = Label  # short alias for expected trees

# ------------------------------------------------------------------------------- strategies

# Characters that exercise the tokenizer: operators, quotes, escapes, hyphens, odd whitespace.
GRAMMAR_CHARS = "ab ()&|!-\"'\\\t\nANDORNTandornt\u00a0\u00c9\u00df"
TRICKY_WORDS = ["and", "OR", "Not", "-x", "x-y", "a'b", 'a"b', "(", ")", "&&", "|", "!", "\\"]

labels_text = st.one_of(
    st.text(min_size=1, max_size=12),
    st.lists(
        st.sampled_from(TRICKY_WORDS + ["dog", "fire", "hydrant"]), min_size=1, max_size=4
    ).map(" ".join),
).filter(lambda s: normalize_label(s) != "")

labels = labels_text.map(Label)


def _extend(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    """Build one level of Not / And / Or over smaller trees."""
    many = st.lists(children, min_size=2, max_size=4).map(tuple)
    return st.one_of(children.map(Not), many.map(And), many.map(Or))


asts = st.recursive(labels, _extend, max_leaves=12)


def reference_evaluate(node: Node, present: Mapping[str, bool]) -> bool:
    """Independent truth semantics, keyed by normalised label."""
    if isinstance(node, Label):
        return present.get(node.name, False)
    if isinstance(node, Not):
        return not reference_evaluate(node.child, present)
    assert isinstance(node, And | Or)
    results = [reference_evaluate(c, present) for c in node.children]
    return all(results) if isinstance(node, And) else any(results)


def reference_score(node: Node, scores: Mapping[str, float]) -> float:
    """Independent ranking semantics: AND = min, OR = max, NOT = 1 - x."""
    if isinstance(node, Label):
        return scores.get(node.name, 0.0)
    if isinstance(node, Not):
        return 1.0 - reference_score(node.child, scores)
    assert isinstance(node, And | Or)
    results = [reference_score(c, scores) for c in node.children]
    return min(results) if isinstance(node, And) else max(results)


# ------------------------------------------------------------------------- property tests


@FAST
@given(asts)
def test_str_parses_back_to_an_equal_ast(ast: Node) -> None:
    assert parse(str(ast)) == ast


@FAST
@given(asts, st.data())
def test_evaluate_survives_round_trip_and_matches_reference(ast: Node, data: st.DataObject) -> None:
    names = sorted(ast.labels())
    truth = data.draw(st.fixed_dictionaries({n: st.booleans() for n in names}))
    expected = reference_evaluate(ast, truth)
    assert ast.evaluate(truth) == expected
    assert parse(str(ast)).evaluate(truth) == expected
    # Keys are matched case-insensitively and whitespace-normalised.
    shouted = {f"  {n.upper()} ": v for n, v in truth.items()}
    assert ast.evaluate(shouted) == expected


@FAST
@given(asts, st.data())
def test_score_matches_reference(ast: Node, data: st.DataObject) -> None:
    unit = st.floats(min_value=0.0, max_value=1.0)
    scores = data.draw(st.fixed_dictionaries({n: unit for n in sorted(ast.labels())}))
    value = ast.score(scores)
    assert value == reference_score(ast, scores)
    assert 0.0 <= value <= 1.0


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40), st.text(alphabet=GRAMMAR_CHARS, max_size=40)))
def test_parser_raises_only_query_errors(text: str) -> None:
    try:
        node = parse(text)
    except QueryError:
        return
    # Whatever parses has a canonical form that is a fixed point.
    assert parse(str(node)) == node
    assert str(parse(str(node))) == str(node)


@FAST
@given(st.text(alphabet=GRAMMAR_CHARS, max_size=30), st.lists(st.text(max_size=8), max_size=5))
def test_parser_with_vocabulary_raises_only_query_errors(text: str, known: list[str]) -> None:
    try:
        node = parse(text, known_labels=known)
    except UnknownLabelError as exc:
        assert exc.labels == sorted(exc.labels) and exc.labels
    except QueryError:
        pass
    else:
        assert node.labels() <= {normalize_label(k) for k in known}


@FAST
@given(asts)
def test_labels_lists_every_leaf(ast: Node) -> None:
    leaves: set[str] = set()
    stack: list[Node] = [ast]
    while stack:
        node = stack.pop()
        if isinstance(node, Label):
            leaves.add(node.name)
        elif isinstance(node, Not):
            stack.append(node.child)
        elif isinstance(node, And | Or):
            stack.extend(node.children)
    assert ast.labels() == frozenset(leaves)


@FAST
@given(asts, st.data())
def test_required_labels_are_necessary(ast: Node, data: st.DataObject) -> None:
    required = required_labels(ast)
    if required is None:
        assert not isinstance(ast, Label | And)
        return
    assert required <= ast.labels()
    truth = data.draw(st.fixed_dictionaries({n: st.booleans() for n in sorted(ast.labels())}))
    if ast.evaluate(truth):
        assert all(truth[n] for n in required)


# ----------------------------------------------------------------------- grammar examples


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # NOT > AND > OR
        ("a OR b AND NOT c", Or((L("a"), And((L("b"), Not(L("c"))))))),
        ("NOT a AND b", And((Not(L("a")), L("b")))),
        ("a AND b OR c AND d", Or((And((L("a"), L("b"))), And((L("c"), L("d")))))),
        ("NOT NOT a", Not(Not(L("a")))),
        # parentheses
        ("(a OR b) AND c", And((Or((L("a"), L("b"))), L("c")))),
        ("NOT (a OR b)", Not(Or((L("a"), L("b"))))),
        ("((a))", L("a")),
        # chains are n-ary; an explicit group stays a separate node
        ("a AND b AND c", And((L("a"), L("b"), L("c")))),
        ("a AND (b AND c)", And((L("a"), And((L("b"), L("c")))))),
        ("a OR b OR c", Or((L("a"), L("b"), L("c")))),
        # symbols and case-insensitive keywords
        ("a & b | !c", Or((And((L("a"), L("b"))), Not(L("c"))))),
        ("a && b || c", Or((And((L("a"), L("b"))), L("c")))),
        ("a and b Or nOt c", Or((And((L("a"), L("b"))), Not(L("c"))))),
        ("a&b|c", Or((And((L("a"), L("b"))), L("c")))),
        # '-' is NOT only at the start of an operand
        ("-person", Not(L("person"))),
        ("dog AND -person", And((L("dog"), Not(L("person"))))),
        ("- person", Not(L("person"))),
        ("--a", Not(Not(L("a")))),
        ("t-shirt", L("t-shirt")),
        ("dog's bowl", L("dog's bowl")),
        # bare multi-word labels
        ("red circle AND blue circle", And((L("red circle"), L("blue circle")))),
        ("  Red \t CIRCLE  ", L("red circle")),
        ("fish and chips", And((L("fish"), L("chips")))),
        # quoted labels keep operator words and symbols
        ('"fish and chips"', L("fish and chips")),
        ("'fish and chips' OR x", Or((L("fish and chips"), L("x")))),
        ('"a (b) & c | !d"', L("a (b) & c | !d")),
        ('"-x"', L("-x")),
        ('"Fire   Hydrant" & -car', And((L("fire hydrant"), Not(L("car"))))),
        (r'"say \"hi\""', L('say "hi"')),
        (r"'it\'s'", L("it's")),
        (r'"a\\b"', L("a\\b")),
        (r'"a\b"', L("a\\b")),  # a backslash before anything else is kept
        ('"it\'s"', L("it's")),
    ],
)
def test_parse_examples(text: str, expected: Node) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("ast", "text"),
    [
        (And((L("dog"), L("bicycle"), Not(L("person")))), "dog AND bicycle AND NOT person"),
        (Or((L("cat"), L("dog"))), "cat OR dog"),
        (And((L("fire hydrant"), Not(L("car")))), "fire hydrant AND NOT car"),
        (L("fish and chips"), '"fish and chips"'),
        (L("-x"), '"-x"'),
        (L("'quoted"), '"\'quoted"'),
        (L('say "hi"'), r'"say \"hi\""'),
        (L("a\\b"), "a\\b"),
        (L("a&b"), '"a&b"'),
        (L('a"b'), 'a"b'),
        (L("NOT"), '"not"'),
        (Not(And((L("a"), L("b")))), "NOT (a AND b)"),
        (And((Or((L("a"), L("b"))), L("c"))), "(a OR b) AND c"),
        (Or((And((L("a"), L("b"))), L("c"))), "a AND b OR c"),
        (Or((L("a"), Or((L("b"), L("c"))))), "a OR (b OR c)"),
    ],
)
def test_canonical_str(ast: Node, text: str) -> None:
    assert str(ast) == text
    assert parse(text) == ast


def test_label_names_are_normalised() -> None:
    assert Label("  Fire \n HYDRANT ") == Label("fire hydrant")
    assert Label("Fire Hydrant").name == "fire hydrant"
    assert hash(Label("DOG")) == hash(Label("dog"))


def test_ast_constructors_validate() -> None:
    with pytest.raises(ValueError):
        Label("   ")
    with pytest.raises(ValueError):
        And((L("a"),))
    with pytest.raises(ValueError):
        Or(())
    with pytest.raises(TypeError):
        And((L("a"), "b"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Not("a")  # type: ignore[arg-type]
    assert And([L("a"), L("b")]).children == (L("a"), L("b"))  # type: ignore[arg-type]


def test_evaluate_and_score_examples() -> None:
    query = parse("dog AND bicycle AND NOT person")
    assert query.evaluate({"dog": True, "bicycle": True})
    assert query.evaluate({"Dog": True, "BICYCLE": True, "person": False})
    assert not query.evaluate({"dog": True, "bicycle": True, "person": True})
    assert not query.evaluate({})
    assert query.score({"dog": 0.9, "bicycle": 0.7, "person": 0.2}) == pytest.approx(0.7)
    assert query.score({"dog": 0.9, "bicycle": 0.7, "person": 0.8}) == pytest.approx(0.2)
    assert parse("cat OR dog").score({"cat": 0.3, "dog": 0.6}) == pytest.approx(0.6)
    assert parse("NOT cat").score({}) == 1.0  # an unscored label counts as 0


def test_required_labels_examples() -> None:
    assert required_labels(parse("dog")) == {"dog"}
    assert required_labels(parse("dog AND bicycle AND NOT person")) == {"dog", "bicycle"}
    assert required_labels(parse("dog AND (cat AND bird)")) == {"dog", "cat", "bird"}
    assert required_labels(parse("dog AND (cat OR bird)")) == {"dog"}
    assert required_labels(parse("NOT a AND NOT b")) == frozenset()
    assert required_labels(parse("cat OR dog")) is None
    assert required_labels(parse("NOT dog")) is None


# ------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "position", "message"),
    [
        ("", 0, "empty query"),
        ("   ", 0, "empty query"),
        ("dog AND cat)", 11, "unexpected ')' at column 12"),
        (")", 0, "unexpected ')' at column 1"),
        ("a AND ((b OR c)", 6, "missing ')' opened at column 7"),
        ("a AND (", 6, "missing ')' opened at column 7"),
        ("()", 0, "empty parentheses at column 1"),
        ("dog AND", 4, "AND needs a label on both sides at column 5"),
        ("AND dog", 0, "AND needs a label on both sides at column 1"),
        ("dog AND OR cat", 4, "AND needs a label on both sides at column 5"),
        ("(| dog)", 1, "OR needs a label on both sides at column 2"),
        ("dog &", 4, "AND needs a label on both sides at column 5"),
        ("a AND NOT", 6, "NOT needs a label after it at column 7"),
        ("-", 0, "NOT needs a label after it at column 1"),
        ("dog NOT cat", 4, "missing AND or OR before 'NOT' at column 5"),
        ("dog -cat", 4, "missing AND or OR before '-' at column 5"),
        ("(dog) cat", 6, "missing AND or OR before 'cat' at column 7"),
        ('"a" "b"', 4, "missing AND or OR before '\"b\"' at column 5"),
        ("(a b) (c)", 6, "missing AND or OR before '(' at column 7"),
        ('dog AND "fire hydrant', 8, "unterminated quote opened at column 9"),
        ("'abc\\'", 0, "unterminated quote opened at column 1"),
        ('a OR ""', 5, "empty quoted label at column 6"),
        ("') \"", 0, "unterminated quote opened at column 1"),
    ],
)
def test_syntax_error_positions(text: str, position: int, message: str) -> None:
    with pytest.raises(QuerySyntaxError) as info:
        parse(text)
    err = info.value
    assert err.position == position
    assert err.column == position + 1
    assert err.reason == message
    assert str(err).startswith(message)


def test_syntax_error_shows_caret_under_the_problem() -> None:
    with pytest.raises(QuerySyntaxError) as info:
        parse("cat AND\tdog)")
    lines = str(info.value).splitlines()
    assert lines == ["unexpected ')' at column 12", "  cat AND dog)", "             ^"]


def test_caret_stays_aligned_in_long_queries() -> None:
    text = " OR ".join(f"label{i}" for i in range(60)) + " )"
    with pytest.raises(QuerySyntaxError) as info:
        parse(text)
    _, echo, caret = str(info.value).splitlines()
    assert echo[caret.index("^")] == ")"


def test_errors_are_value_errors_and_pickle() -> None:
    assert issubclass(QuerySyntaxError, QueryError)
    assert issubclass(UnknownLabelError, QueryError)
    assert issubclass(QueryError, ValueError)
    syntax = QuerySyntaxError("empty parentheses at column 1", "()", 0)
    again = pickle.loads(pickle.dumps(syntax))
    assert (again.position, again.text, str(again)) == (0, "()", str(syntax))
    unknown = UnknownLabelError(["zebra"], ["dog"])
    assert str(pickle.loads(pickle.dumps(unknown))) == str(unknown)


def test_deep_nesting_is_a_syntax_error_not_a_recursion_error() -> None:
    assert parse("!" * MAX_DEPTH + "x") is not None
    assert parse("(" * MAX_DEPTH + "x" + ")" * MAX_DEPTH) == L("x")
    for text in ("(" * 5000 + "x" + ")" * 5000, "NOT " * 5000 + "x", "-" * 5000 + "x"):
        with pytest.raises(QuerySyntaxError, match="nests more than"):
            parse(text)


def test_rejects_non_str() -> None:
    with pytest.raises(TypeError):
        parse(b"dog")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        parse("dog", known_labels="dog")


# ------------------------------------------------------------------------ known labels

VOCAB = ["bicycle", "cat", "dog", "fire hydrant", "person"]


def test_known_labels_accept_matches_case_insensitively() -> None:
    node = parse('Dog AND "FIRE  hydrant"', known_labels=["DOG", "Fire Hydrant"])
    assert node == And((L("dog"), L("fire hydrant")))


def test_unknown_labels_are_reported_all_at_once() -> None:
    with pytest.raises(UnknownLabelError) as info:
        parse("zebra AND dgo AND (cat OR unicorn) AND zebra", known_labels=VOCAB)
    err = info.value
    assert err.labels == ["dgo", "unicorn", "zebra"]
    message = str(err)
    assert message.splitlines()[0] == (
        "unknown label(s): dgo, unicorn, zebra (known: bicycle, cat, dog, fire hydrant, person)"
    )
    assert 'dgo: did you mean "dog"?' in message
    assert err.suggestions["zebra"] == []


def test_unknown_label_message_elides_a_large_vocabulary() -> None:
    vocab = [f"label {i:03d}" for i in range(40)]
    with pytest.raises(UnknownLabelError) as info:
        parse("label 1000", known_labels=vocab)
    first = str(info.value).splitlines()[0]
    assert first.startswith("unknown label(s): label 1000 (known: label 000, label 001,")
    assert first.endswith("... 30 more)")
    assert "did you mean" in str(info.value)


def test_unknown_label_with_empty_vocabulary() -> None:
    with pytest.raises(UnknownLabelError, match=r"no labels are known"):
        parse("dog", known_labels=[])


def test_syntax_errors_win_over_unknown_labels() -> None:
    with pytest.raises(QuerySyntaxError):
        parse("zebra AND", known_labels=VOCAB)


def test_import_is_cheap() -> None:
    code = (
        "import sys; import piaa_index.query.language; "
        "print(','.join(m for m in ('numpy', 'torch', 'sqlalchemy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
