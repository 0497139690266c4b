"""The Feathers-like query language of ``find``, compiled to SQLAlchemy Core.

A query is a mapping.  Keys without ``$`` name columns; a value is either a
scalar (equality; ``None`` means IS NULL) or an object of operators, all of
which must hold:

``$in`` / ``$nin`` (lists), ``$ne``, ``$gt``, ``$gte``, ``$lt``, ``$lte``.

``$ne`` and ``$nin`` are "not equal" in the plain sense: rows whose column is
NULL match them unless NULL is among the excluded values.

Keys with ``$``: ``$sort`` ({column: 1 | -1}, several allowed, in order),
``$limit`` (default 50, at most 500; 0 returns only the total), ``$cursor``
(the ``next_cursor`` of the previous page), ``$select`` (list of columns;
the primary key is always returned) and ``$total`` (true: count the matches).

Paging is by keyset on the sort columns plus the primary key as tie-break,
so a row is returned exactly once across the pages even while rows are
inserted; a cursor is tied to the table, filters and sort it came from.
NULLs sort as the smallest value on every database.

Only columns of the schema can be named (neither secrets nor the internal
merge clocks), and values are bound parameters checked against the
column's type: there is no path from a query to SQL text.  Every refusal is
a :class:`StoreFindError`, whose message may be shown to the client.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs
import orjson
import sqlalchemy as sa

from ._schema import (
    INTERNAL_COLUMNS,
    PARTS,
    READABLE_TABLES,
    SECRET_COLUMNS,
    StoreFindError,
    StoreQueryError,
)

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "CompiledFind", "Page", "compile_find", "table_for"]

DEFAULT_LIMIT: Final = 50
MAX_LIMIT: Final = 500
MAX_IN_VALUES: Final = 1000
INT64: Final = range(-(2**63), 2**63)
"""The integers a column or a bare JSON value holds (SQLite's and
PostgreSQL's 64 bits)."""
CURSOR_CHARS_MAX: Final = 4 * 1024 * 1024
"""The longest cursor taken: it holds the sort columns' values of a row, and
a page sorted on a task's prompt (up to 262,144 characters) has a cursor of
that prompt (the daemon seals cursors for clients, who cannot change them)."""

_OPERATORS: Final = ("$in", "$nin", "$ne", "$gt", "$gte", "$lt", "$lte")
_SPECIALS: Final = ("$sort", "$limit", "$cursor", "$select", "$total")


@attrs.frozen
class Page:
    """One page of ``find``: ``next_cursor`` is None on the last page;
    ``total`` is the number of matching rows when the query asked ``$total``;
    ``limit`` the page size the query asked (``$limit`` or the default);
    ``cursors``, when asked, the cursor after each item (to go on from any
    of them, not only the last)."""

    items: list[dict[str, Any]]
    next_cursor: str | None
    total: int | None = None
    limit: int = DEFAULT_LIMIT
    cursors: list[str] | None = None


@attrs.frozen
class CompiledFind:
    """A compiled ``find``: run ``stmt`` (which fetches ``limit + 1`` rows to
    know whether another page follows), turn rows into items with
    :meth:`item`, and the last item's row into a cursor with :meth:`cursor_for`."""

    stmt: sa.Select[Any]
    count_stmt: sa.Select[Any] | None
    limit: int
    keys: tuple[sa.Column[Any], ...]
    output: tuple[str, ...]
    fingerprint: str

    def item(self, row: sa.Row[Any]) -> dict[str, Any]:
        mapping = row._mapping
        # plain ``str`` keys: column names are SQLAlchemy ``quoted_name``s
        return {str(name): mapping[name] for name in self.output}

    def cursor_for(self, row: sa.Row[Any]) -> str:
        mapping = row._mapping
        values = [mapping[column.name] for column in self.keys]
        raw = orjson.dumps({"f": self.fingerprint, "k": values})
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def table_for(name: object) -> sa.Table:
    if not isinstance(name, str) or name not in READABLE_TABLES:
        raise StoreQueryError(
            f"unknown table {name!r}; known: {', '.join(sorted(READABLE_TABLES))}"
        )
    return READABLE_TABLES[name]


def visible_columns(table: sa.Table) -> list[sa.Column[Any]]:
    secret = SECRET_COLUMNS.get(table.name, frozenset())
    return [c for c in table.columns if c.name not in secret]


def findable_columns(table: sa.Table) -> list[sa.Column[Any]]:
    """The columns a ``find`` may name and returns: no secret, nothing internal."""
    return [c for c in visible_columns(table) if c.name not in INTERNAL_COLUMNS]


def column_for(table: sa.Table, name: object, purpose: str) -> sa.Column[Any]:
    """A column of ``table`` that a ``find`` may use for ``purpose`` (filter,
    sort, select), else a :class:`StoreQueryError` naming the choices."""
    findable = [c.name for c in findable_columns(table)]
    if not isinstance(name, str) or name not in findable:
        if isinstance(name, str) and name.startswith("$"):
            raise StoreQueryError(
                f"unknown operator {name!r}; supported: {', '.join(_SPECIALS)} at the top "
                f"level and {', '.join(_OPERATORS)} on a column"
            )
        raise StoreQueryError(
            f"unknown column {name!r} in {table.name}; columns: {', '.join(findable)}"
        )
    column = table.c[name]
    if purpose != "select" and (table.name, name) in PARTS:
        # its text is the column followed by its parts: not one SQL value
        raise StoreQueryError(
            f"cannot {purpose} on {table.name}.{name}: a streamed text is stored in parts"
        )
    if purpose != "select" and isinstance(column.type, sa.JSON):
        raise StoreQueryError(f"cannot {purpose} on JSON column {table.name}.{name}")
    return column


def check_value(column: sa.Column[Any], value: object, *, allow_none: bool = True) -> Any:
    """``value`` if it fits ``column``'s type (no silent conversion)."""
    if value is None:
        if allow_none:
            return None
        raise StoreQueryError(f"{column.name}: null cannot be compared with an order")
    python_type = column.type.python_type
    ok: bool
    if python_type is bool:
        ok = isinstance(value, bool)
    elif python_type is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if isinstance(value, int) and value not in INT64:  # (the driver overflows)
            raise StoreQueryError(f"{column.name}: {value} is beyond a 64-bit integer")
    else:
        ok = isinstance(value, python_type)
    if not ok:
        raise StoreQueryError(
            f"{column.name}: expected {python_type.__name__}, got {type(value).__name__} {value!r}"
        )
    if isinstance(value, str) and "\x00" in value:  # (no text kept holds one: PostgreSQL's rule)
        raise StoreQueryError(f"{column.name}: a NUL character (\\u0000) is never stored")
    return value


def _in_list(column: sa.Column[Any], op: str, values: object) -> list[Any]:
    if not isinstance(values, list | tuple):
        raise StoreQueryError(f"{column.name}: {op} takes a list, got {type(values).__name__}")
    if len(values) > MAX_IN_VALUES:
        raise StoreQueryError(f"{column.name}: {op} takes at most {MAX_IN_VALUES} values")
    return [check_value(column, v) for v in values]


def _condition(column: sa.Column[Any], spec: object) -> sa.ColumnElement[bool]:
    if not isinstance(spec, Mapping):
        if isinstance(spec, list | tuple):
            raise StoreQueryError(
                f"{column.name}: a list is not a value; use {{'$in': [...]}} to match any of them"
            )
        value = check_value(column, spec)
        return column.is_(None) if value is None else column == value
    if not spec:
        raise StoreQueryError(f"{column.name}: empty operator object")
    parts: list[sa.ColumnElement[bool]] = []
    for op, operand in spec.items():
        if op == "$in":
            values = _in_list(column, op, operand)
            present = [v for v in values if v is not None]
            clause: sa.ColumnElement[bool] = column.in_(present)
            if None in values:
                clause = sa.or_(clause, column.is_(None))
            parts.append(clause)
        elif op == "$nin":
            values = _in_list(column, op, operand)
            present = [v for v in values if v is not None]
            if None in values:
                parts.append(sa.and_(column.not_in(present), column.is_not(None)))
            else:
                parts.append(sa.or_(column.not_in(present), column.is_(None)))
        elif op == "$ne":
            value = check_value(column, operand)
            if value is None:
                parts.append(column.is_not(None))
            else:
                parts.append(sa.or_(column != value, column.is_(None)))
        elif op in ("$gt", "$gte", "$lt", "$lte"):
            value = check_value(column, operand, allow_none=False)
            if op == "$gt":
                parts.append(column > value)
            elif op == "$gte":
                parts.append(column >= value)
            elif op == "$lt":
                parts.append(column < value)
            else:
                parts.append(column <= value)
        else:
            raise StoreQueryError(
                f"{column.name}: unknown operator {op!r}; supported: {', '.join(_OPERATORS)}"
            )
    return sa.and_(*parts)


def _parse_sort(table: sa.Table, spec: object) -> list[tuple[sa.Column[Any], int]]:
    if spec is None:
        return []
    if not isinstance(spec, Mapping) or not spec:
        raise StoreQueryError("$sort takes an object of {column: 1 | -1}")
    keys: list[tuple[sa.Column[Any], int]] = []
    for name, direction in spec.items():
        column = column_for(table, name, "sort")
        if type(direction) is not int or direction not in (1, -1):
            raise StoreQueryError(
                f"$sort: direction of {name!r} must be 1 or -1, got {direction!r}"
            )
        keys.append((column, int(direction)))
    return keys


def _parse_limit(value: object) -> int:
    if value is None:
        return DEFAULT_LIMIT
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_LIMIT:
        raise StoreQueryError(f"$limit must be an integer from 0 to {MAX_LIMIT}, got {value!r}")
    return value


def _parse_select(table: sa.Table, value: object) -> tuple[str, ...]:
    pk = [c.name for c in table.primary_key.columns]
    if value is None:
        return tuple(c.name for c in findable_columns(table))
    if not isinstance(value, list | tuple) or not value:
        raise StoreQueryError("$select takes a non-empty list of column names")
    chosen = [column_for(table, name, "select").name for name in value]
    return tuple(dict.fromkeys([*pk, *chosen]))


def _decode_cursor(
    cursor: object, fingerprint: str, keys: Sequence[tuple[sa.Column[Any], int]]
) -> list[Any]:
    if not isinstance(cursor, str) or len(cursor) > CURSOR_CHARS_MAX:
        raise StoreQueryError("$cursor must be the next_cursor string of a previous page")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        decoded = orjson.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise StoreQueryError("$cursor is not a valid cursor") from exc
    if not isinstance(decoded, dict) or not isinstance(decoded.get("k"), list):
        raise StoreQueryError("$cursor is not a valid cursor")
    if decoded.get("f") != fingerprint:
        raise StoreQueryError("$cursor belongs to another query (table, filters or sort differ)")
    values: list[Any] = decoded["k"]
    if len(values) != len(keys):
        raise StoreQueryError("$cursor is not a valid cursor")
    return [check_value(column, v) for (column, _), v in zip(keys, values, strict=True)]


def _after(
    keys: Sequence[tuple[sa.Column[Any], int]], values: Sequence[Any]
) -> sa.ColumnElement[bool]:
    """Rows strictly after ``values`` in the order of ``keys`` (NULL smallest)."""
    alternatives: list[sa.ColumnElement[bool]] = []
    ties: list[sa.ColumnElement[bool]] = []
    for (column, direction), value in zip(keys, values, strict=True):
        beyond: sa.ColumnElement[bool] | None
        if value is None:
            tie = column.is_(None)
            beyond = column.is_not(None) if direction == 1 else None
        else:
            tie = column == value
            if direction == 1:
                beyond = column > value
            elif column.nullable:
                beyond = sa.or_(column < value, column.is_(None))
            else:
                beyond = column < value
        if beyond is not None:
            alternatives.append(sa.and_(*ties, beyond))
        ties.append(tie)
    if not alternatives:
        return sa.false()
    return sa.or_(*alternatives)


def _fingerprint(
    table: sa.Table, filters: dict[str, Any], keys: Sequence[tuple[sa.Column[Any], int]]
) -> str:
    canonical = orjson.dumps(
        [table.name, filters, [[c.name, d] for c, d in keys]], option=orjson.OPT_SORT_KEYS
    )
    return hashlib.sha256(canonical).hexdigest()[:16]


def compile_find(table: sa.Table, query: Mapping[str, Any] | None) -> CompiledFind:
    """Check ``query`` against ``table`` and compile it (see the module
    doc); a :class:`StoreFindError` says what is wrong with it."""
    try:
        return _compile(table, query)
    except StoreFindError:
        raise
    except StoreQueryError as exc:
        raise StoreFindError(str(exc)) from None


def _compile(table: sa.Table, query: Mapping[str, Any] | None) -> CompiledFind:
    if query is None:
        query = {}
    if not isinstance(query, Mapping):
        raise StoreQueryError(f"a query is an object, got {type(query).__name__}")
    where: list[sa.ColumnElement[bool]] = []
    filters: dict[str, Any] = {}
    for name, spec in query.items():
        if isinstance(name, str) and name in _SPECIALS:
            continue
        column = column_for(table, name, "filter")
        where.append(_condition(column, spec))
        filters[str(column.name)] = spec

    keys = _parse_sort(table, query.get("$sort"))
    named = {column.name for column, _ in keys}
    keys += [(c, 1) for c in table.primary_key.columns if c.name not in named]
    limit = _parse_limit(query.get("$limit"))
    output = _parse_select(table, query.get("$select"))
    total = query.get("$total", False)
    if not isinstance(total, bool):
        raise StoreQueryError(f"$total must be true or false, got {total!r}")
    try:
        fingerprint = _fingerprint(table, filters, keys)
    except TypeError as exc:  # values were checked; this only guards odd mappings
        raise StoreQueryError(f"query values must be JSON: {exc}") from exc

    count_stmt = None
    if total or limit == 0:
        count_stmt = sa.select(sa.func.count()).select_from(table).where(*where)

    if "$cursor" in query and query["$cursor"] is not None:
        where.append(_after(keys, _decode_cursor(query["$cursor"], fingerprint, keys)))

    fetched = list(dict.fromkeys([*output, *(c.name for c, _ in keys)]))
    order: list[sa.UnaryExpression[Any]] = []
    for column, direction in keys:
        if direction == 1:
            order.append(column.asc().nulls_first() if column.nullable else column.asc())
        else:
            order.append(column.desc().nulls_last() if column.nullable else column.desc())
    stmt = (
        sa.select(*(table.c[name] for name in fetched))
        .where(*where)
        .order_by(*order)
        .limit(limit + 1)
    )
    return CompiledFind(
        stmt=stmt,
        count_stmt=count_stmt,
        limit=limit,
        keys=tuple(c for c, _ in keys),
        output=output,
        fingerprint=fingerprint,
    )
