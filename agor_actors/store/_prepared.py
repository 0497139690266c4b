"""Statements of the commit path, compiled once and run on the DB-API cursor.

SQLAlchemy Core builds and compiles each statement (so the SQL is the
dialect's own: qmark for sqlite3, pyformat with casts for psycopg); what a
:class:`Prepared` skips is SQLAlchemy's work per execution (the cache key,
the execution context, the parameter dictionaries, the result object),
which cost about as much as SQLite itself on the store's group commit.
Parameters are bound with the column types' own bind processors, so a
value reaches the driver exactly as ``Connection.execute`` would pass it,
and a driver error comes out as SQLAlchemy's exception for it
(``sqlalchemy.exc.IntegrityError`` and so on) so that callers map errors
in one place.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine.interfaces import DBAPICursor

__all__ = ["Prepared", "driver_errors"]

Row = dict[str, Any]


class Prepared:
    """``statement`` compiled for ``dialect``.  Every bound parameter must
    be a named :func:`sqlalchemy.bindparam` without a value; a row passes a
    value for each.  Parameters named in ``raw`` skip their type's bind
    processor (the caller passes what the driver takes, e.g. JSON text it
    has already serialized)."""

    __slots__ = ("_dialect", "_getter", "_one", "_processors", "_results", "_selected", "sql")

    def __init__(
        self, statement: sa.ClauseElement, dialect: sa.Dialect, *, raw: Collection[str] = ()
    ) -> None:
        compiled = statement.compile(dialect=dialect)
        if not isinstance(compiled, sa.sql.compiler.SQLCompiler):  # pragma: no cover
            raise TypeError(f"not a SQL statement: {statement!r}")
        if compiled.literal_execute_params or compiled.post_compile_params:
            raise ValueError("a prepared statement cannot expand parameters at execution")
        binds = {name: bind for bind, name in compiled.bind_names.items()}
        for name, bind in binds.items():
            if not bind.required:
                raise ValueError(f"parameter {name!r} has a value; pass it in each row")
        self.sql = str(compiled)
        self._dialect = dialect
        processors: list[tuple[str, Callable[[Any], Any]]] = []
        for name, bind in binds.items():
            if name in raw:
                continue
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                processors.append((name, process))
        self._processors = tuple(processors)
        self._selected: tuple[tuple[str, sa.types.TypeEngine[Any]], ...] = ()
        if isinstance(statement, sa.Select):
            self._selected = tuple((str(c.name), c.type) for c in statement.selected_columns)
        self._results: tuple[Callable[[Any], Any] | None, ...] | None = None
        self._getter: Callable[[Row], Any] | None = None
        self._one = False
        if dialect.positional:
            order = compiled.positiontup
            assert order is not None
            self._getter = operator.itemgetter(*order)
            self._one = len(order) == 1

    def bind(self, rows: Sequence[Row]) -> list[Any]:
        """The driver's parameters for ``rows`` (their values are processed
        in place)."""
        for process_name, process in self._processors:
            for row in rows:
                row[process_name] = process(row[process_name])
        getter = self._getter
        if getter is None:
            return list(rows)
        if self._one:
            return [(getter(row),) for row in rows]
        return [getter(row) for row in rows]

    def executemany(self, cursor: DBAPICursor, rows: Sequence[Row]) -> int:
        """Run the statement once per row; the rows it changed in all."""
        params = self.bind(rows)
        with driver_errors(self._dialect, self.sql):
            cursor.executemany(self.sql, params)
        return int(cursor.rowcount)

    def execute(self, cursor: DBAPICursor, row: Row) -> DBAPICursor:
        """Run the statement for one row; the cursor, to fetch from."""
        (params,) = self.bind([row])
        with driver_errors(self._dialect, self.sql):
            cursor.execute(self.sql, params)
        return cursor

    def all(self, cursor: DBAPICursor, row: Row) -> list[Row]:
        """Run the select for one row of parameters; its rows as dicts of
        plain ``str`` keys, values through the column types' result
        processors (as ``Connection.execute`` would give them)."""
        if not self._selected:
            raise TypeError("all() runs a select of named columns")
        found = self.execute(cursor, row).fetchall()
        if not found:
            return []
        results = self._results
        if results is None:
            results = self._results = self._result_processors(cursor)
        names = [name for name, _ in self._selected]
        return [
            {
                name: value if process is None or value is None else process(value)
                for name, process, value in zip(names, results, values, strict=True)
            }
            for values in found
        ]

    def one_or_none(self, cursor: DBAPICursor, row: Row) -> Row | None:
        """Like :meth:`all` for a select of at most one row: the row, or None."""
        found = self.all(cursor, row)
        if len(found) > 1:
            raise sa.exc.MultipleResultsFound("more than one row where at most one was expected")
        return found[0] if found else None

    def _result_processors(self, cursor: DBAPICursor) -> tuple[Callable[[Any], Any] | None, ...]:
        """Each selected column's result processor for the type the driver
        reports (as SQLAlchemy's result metadata picks them)."""
        description = cursor.description
        assert description is not None and len(description) == len(self._selected)
        dialect = self._dialect
        return tuple(
            type_.dialect_impl(dialect).result_processor(dialect, column[1])
            for (_, type_), column in zip(self._selected, description, strict=True)
        )


@contextmanager
def driver_errors(dialect: sa.Dialect, sql: str) -> Iterator[None]:
    """Turn the driver's exceptions into SQLAlchemy's (``IntegrityError``,
    ``OperationalError``, ...), as ``Connection.execute`` would raise them."""
    dbapi = dialect.loaded_dbapi
    try:
        yield
    except dbapi.Error as exc:
        raise sa.exc.DBAPIError.instance(
            sql, None, exc, dbapi.Error, hide_parameters=True, dialect=dialect
        ) from exc
