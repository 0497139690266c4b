"""A ``find`` page of only what a principal may see, and a cursor that says
nothing of what it may not.

The store pages by keyset: its cursor is the sort columns' values and the
key of the row it stops after.  Filtered after paging, a page of a
stranger's records came back empty with a cursor naming one of them (its
id, and the title, prompt or name it was sorted on), and whether a cursor
came back at all told whether records matched a filter on fields the caller
may not read.  So a page goes on past the records the caller may not see
until it holds ``$limit`` of its own and another one of its own follows
(then it ends with a cursor after its last), or the records end (then it
has no cursor); only past :data:`SCAN_ROWS` records read in one call does it
end early, after the last record read.  Every cursor is sealed (AES-SIV
under a key the database keeps, the same on every daemon of a cluster):
opaque, and refused if changed.  What remains: past :data:`SCAN_ROWS`
unseen records, a cursor says that more records follow, not which.  For
a caller who may not see every row, the rows are read with only the
columns the gate needs, and the visible ones whole afterwards: a
stranger's page does not read (and put together) the streamed texts and
outputs of rows it never shows."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from ..domain import ServiceError
from ..store import Page

__all__ = ["CURSOR_KEY", "SCAN_ROWS", "CursorSeal", "visible_page"]

SCAN_ROWS: Final = 2_000
"""Records one ``find`` call reads at most looking for visible ones."""

CURSOR_KEY: Final = "cursor_key"
"""The name of the sealing key in the store's ``meta`` table."""

_SEALED_CHARS_MAX: Final = 6 * 1024 * 1024
"""A sealed cursor's longest: the store's longest, base64'd (a frame of 1
MiB, or a URL, bounds it sooner)."""


class CursorSeal:
    """Seals the store's cursors for clients and opens them again."""

    def __init__(self, key_hex: str) -> None:
        key = bytes.fromhex(key_hex)
        if len(key) != 64:
            raise ValueError("the cursor key is 64 bytes (128 hex digits)")
        self._aead = AESSIV(key)

    def seal(self, cursor: str) -> str:
        sealed = self._aead.encrypt(cursor.encode("utf-8"), None)
        return base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")

    def open(self, sealed: object) -> str:
        """The store's cursor in ``sealed``; ``invalid_field`` if it is not
        a ``next_cursor`` this database's daemons gave."""
        if not isinstance(sealed, str) or len(sealed) > _SEALED_CHARS_MAX:
            raise _bad_cursor()
        try:
            raw = base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))
            return self._aead.decrypt(raw, None).decode("utf-8")
        except (binascii.Error, ValueError, InvalidTag):
            raise _bad_cursor() from None


def _bad_cursor() -> ServiceError:
    return ServiceError(
        "invalid_field", "query: $cursor is not a next_cursor of this query's pages"
    )


async def visible_page(
    find: Callable[[dict[str, Any]], Awaitable[Page]],
    query: dict[str, Any],
    visible: Callable[[dict[str, Any]], Awaitable[bool]],
    *,
    scan_rows: int = SCAN_ROWS,
    narrow: tuple[str, ...] | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """See :func:`_visible_page`.  With ``narrow`` (the columns ``visible``
    reads), the rows are read with only those columns, and then the
    visible ones whole, by id, in one more read: a caller who sees few
    rows does not have the others' prompts, outputs and streamed texts read
    (and put together) for nothing."""
    if narrow is None:
        return await _visible_page(find, query, visible, scan_rows)
    rows, after = await _visible_page(find, {**query, "$select": list(narrow)}, visible, scan_rows)
    if not rows:
        return rows, after
    ids = [row["id"] for row in rows]
    whole: dict[str, Any] = {"id": {"$in": ids}, "$limit": len(ids)}
    if query.get("$select") is not None:
        whole["$select"] = query["$select"]
    by_id = {row["id"]: row for row in (await find(whole)).items}
    # (one removed meanwhile is left out)
    return [by_id[ident] for ident in ids if ident in by_id], after


async def _visible_page(
    find: Callable[[dict[str, Any]], Awaitable[Page]],
    query: dict[str, Any],
    visible: Callable[[dict[str, Any]], Awaitable[bool]],
    scan_rows: int,
) -> tuple[list[dict[str, Any]], str | None]:
    """Up to the query's ``$limit`` records ``visible`` lets through, and
    the store's cursor to go on from: None unless a visible record follows
    (whether hidden ones follow is not told).  ``find`` runs the
    store's ``find`` with per-row cursors; ``query``'s ``$cursor`` is the
    store's (opened); past ``scan_rows`` records read, the page ends."""
    page = await find(query)
    limit = page.limit
    rows: list[dict[str, Any]] = []
    after: str | None = None  # once the page is full: the cursor after its last row
    read = 0
    while True:
        for item, cursor in zip(page.items, page.cursors or [], strict=True):
            if not await visible(item):
                continue
            if after is not None:
                return rows, after  # a visible record follows the page
            rows.append(item)
            if len(rows) == limit:
                after = cursor
        read += len(page.items)
        if page.next_cursor is None:
            return rows, None  # (full or not: nothing visible follows)
        if read >= scan_rows:
            # (sealed, the second names a record not shown)
            return rows, after if after is not None else page.next_cursor
        # on from the page's end, in larger steps: most of it may be unseen
        page = await find({**query, "$cursor": page.next_cursor, "$limit": max(limit, 100)})
