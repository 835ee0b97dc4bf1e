"""Splitting one ``sql.exec`` query into its SQLite statements, as Cloudflare runs them.

Cloudflare's ``sql.exec`` (workerd ``SqliteDatabase::prepareSql``) hands the query to
``sqlite3_prepare``, runs the statement it gets, skips the whitespace after it and goes
on with the rest, so that:

* statements are separated by ``;`` the way SQLite's parser sees them: a ``;`` in a
  string, a quoted name or a comment does not end one, nor does a ``;`` inside the
  ``BEGIN ... END`` body of a ``CREATE TRIGGER``;
* comments and empty statements (``;;``) before a statement are skipped;
* after the last statement only whitespace may follow: a trailing comment or a trailing
  empty statement is an error ("SQL code did not contain a statement"), and so is a
  query with no statement at all;
* only the last statement may take parameters (the bindings go to it).

Python's ``sqlite3`` runs one statement per call and cannot hand back the tail, so the
split is done here, with the state machine of SQLite's own ``sqlite3_complete()``
(``src/complete.c``): the same tokens (strings, quoted names, comments, words), the same
eight states, the same transitions. A ``;`` ends a statement exactly when
``sqlite3.complete_statement()`` would say the text up to it is complete (the tests
check this against SQLite). Plain Python: no I/O, no SQLite connection.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Final

import attrs

__all__ = ["SqlStatement", "split_statements", "statement_ends"]

#: What workerd skips after a statement (``prepareSql``). SQLite's own tokenizer refuses
#: ``\v``, so it is stripped here from the start of every statement but the first.
_TRAILING_WHITESPACE: Final = " \t\n\r\v\f"

# complete.c's tokens...
_SEMI, _WS, _OTHER, _EXPLAIN, _CREATE, _TEMP, _TRIGGER, _END = range(8)
# ... and states.
_NOTHING, _START, _NORMAL, _IN_EXPLAIN, _IN_CREATE, _IN_TRIGGER, _SEMI_SEEN, _END_SEEN = range(8)
#: complete.c's ``trans[state][token]``.
_TRANSITIONS: Final = (
    # SEMI WS OTHER EXPLAIN CREATE TEMP TRIGGER END
    (1, 0, 2, 3, 4, 2, 2, 2),  # NOTHING: no token yet
    (1, 1, 2, 3, 4, 2, 2, 2),  # START: at the end of a statement
    (1, 2, 2, 2, 2, 2, 2, 2),  # NORMAL: in a statement ended by ";"
    (1, 3, 3, 2, 4, 2, 2, 2),  # EXPLAIN: after a leading EXPLAIN
    (1, 4, 2, 2, 2, 4, 5, 2),  # CREATE: after a leading CREATE [TEMP]
    (6, 5, 5, 5, 5, 5, 5, 5),  # TRIGGER: in a trigger, ended by ";END;"
    (6, 6, 5, 5, 5, 5, 5, 7),  # SEMI: after the ";" of ";END;"
    (1, 7, 5, 5, 5, 5, 5, 5),  # END: after the ";END" of ";END;"
)
_KEYWORDS: Final = {
    "explain": _EXPLAIN,
    "create": _CREATE,
    "temp": _TEMP,
    "temporary": _TEMP,
    "trigger": _TRIGGER,
    "end": _END,
}
#: One complete.c token per match. A word is a run of SQLite identifier characters
#: (letters, digits, ``_``, ``$`` and everything beyond ASCII). An unterminated comment
#: runs to the end; so does an unterminated string or name (SQLite will refuse it).
_TOKEN: Final = re.compile(
    r"""
      (?P<ws> [ \t\n\f\r]+ | --[^\n]* | /\*.*?(?:\*/|\Z) )
    | (?P<quoted> '[^']*(?:'|\Z) | "[^"]*(?:"|\Z) | `[^`]*(?:`|\Z) | \[[^\]]*(?:\]|\Z) )
    | (?P<word> [0-9A-Za-z_$\x80-\U0010ffff]+ )
    | (?P<semi> ; )
    | (?P<other> . )
    """,
    re.VERBOSE | re.DOTALL,
)
#: SQLite's parameter syntax: ``?``, ``?NNN``, and ``:name``, ``@name``, ``#name``,
#: ``$name`` (a sigil followed by at least one identifier character).
_PARAMETER: Final = re.compile(r"\?|[:@#$][0-9A-Za-z_$\x80-\U0010ffff]")
#: Words that begin a statement that cannot write.
_READ_ONLY_VERBS: Final = frozenset({"SELECT", "VALUES", "EXPLAIN"})
#: The words that can follow the common table expressions of a ``WITH``.
_MAIN_VERBS: Final = frozenset({"SELECT", "VALUES", "INSERT", "REPLACE", "UPDATE", "DELETE"})


@attrs.frozen
class SqlStatement:
    """One statement of a query, as SQLite will be given it."""

    text: str
    """The statement, from its first token (comments and empty statements before it
    included) to its ``;`` (if it has one)."""
    has_parameters: bool
    """Whether it has a parameter (``?``, ``?1``, ``:name``...) outside strings and
    comments."""
    verb: str
    """What it does, upper-cased: its first word (``SELECT``, ``INSERT``, ``CREATE``,
    ``PRAGMA``...), except that for a ``WITH`` it is the word after the common table
    expressions (``SELECT``, ``DELETE``...)."""

    @property
    def read_only(self) -> bool:
        """True for statements that cannot write (``SELECT``, ``VALUES``, ``EXPLAIN``);
        others may write."""
        return self.verb in _READ_ONLY_VERBS


def _token_kind(match: re.Match[str]) -> int:
    group = match.lastgroup
    if group == "ws":
        return _WS
    if group == "semi":
        return _SEMI
    if group == "word":
        word = match.group()
        if word.isascii():
            return _KEYWORDS.get(word.lower(), _OTHER)
    return _OTHER


def statement_ends(query: str) -> list[int]:
    """The index of every ``;`` that ends a statement, empty statements included: the
    ones after which ``sqlite3.complete_statement(query[: index + 1])`` is true."""
    ends = []
    state = _NOTHING
    for match in _TOKEN.finditer(query):
        state = _TRANSITIONS[state][_token_kind(match)]
        if state == _START and match.lastgroup == "semi":
            ends.append(match.start())
    return ends


def _no_statement(query: str, detail: str) -> sqlite3.ProgrammingError:
    return sqlite3.ProgrammingError(f"SQL code did not contain a statement: {detail}")


def split_statements(query: str) -> list[SqlStatement]:
    """The statements of ``query``, in order, as Cloudflare's ``sql.exec`` runs them.

    Raises:
        sqlite3.ProgrammingError: the query has no statement, or something other than
            whitespace follows its last statement (a comment, an empty ``;``), as on
            Cloudflare; or a statement other than the last has parameters.
    """
    statements: list[SqlStatement] = []
    state = _NOTHING
    start = 0  # where the text not yet given to a statement begins
    verb = ""
    depth = 0  # of parentheses, to find the verb after a WITH's table expressions
    has_parameters = False
    for match in _TOKEN.finditer(query):
        kind = _token_kind(match)
        before, state = state, _TRANSITIONS[state][kind]
        group = match.lastgroup
        token = match.group()
        if group == "word":
            word = token.upper()
            first = not verb and before in (_NOTHING, _START)
            if first or (verb == "WITH" and depth == 0 and word in _MAIN_VERBS):
                verb = word
        elif group == "other" or group == "quoted":
            depth += token == "("
            depth -= token == ")"
            if not verb and before in (_NOTHING, _START) and token != "\v":
                verb = token
        if group == "other" or group == "word":
            has_parameters = has_parameters or _PARAMETER.match(query, match.start()) is not None
        if kind == _SEMI and state == _START and before != _START and before != _NOTHING:
            text = query[start : match.end()]
            if statements:
                text = text.lstrip(_TRAILING_WHITESPACE)
            statements.append(SqlStatement(text, has_parameters, verb))
            start = match.end()
            verb = ""
            depth = 0
            has_parameters = False
    rest = query[start:]
    trailing_whitespace = not rest.strip(_TRAILING_WHITESPACE)
    if state not in (_NOTHING, _START) and not (statements and trailing_whitespace):
        # A last statement with no ";". (Whitespace with a ``\v`` is not one: SQLite
        # does not take ``\v`` for whitespace, but workerd skips it.)
        text = rest.lstrip(_TRAILING_WHITESPACE) if statements else rest
        statements.append(SqlStatement(text, has_parameters, verb))
    elif not statements:
        raise _no_statement(query, "the query is empty, or only comments and semicolons")
    elif not trailing_whitespace:
        raise _no_statement(
            query,
            f"only whitespace may follow the last statement, not {rest.strip()[:40]!r} "
            "(a comment or an empty statement; Cloudflare refuses it too)",
        )
    for number, statement in enumerate(statements[:-1], start=1):
        if statement.has_parameters:
            raise sqlite3.ProgrammingError(
                "when sql.exec runs several statements, only the last one can have "
                f"parameters (the bindings go to it); statement {number} of "
                f"{len(statements)} has some: {statement.text[:80]!r}"
            )
    return statements
