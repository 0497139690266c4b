"""What a client is told of a store error: a stable code, no SQL, and no
detail but what a ``find`` query got wrong in its own terms (the rest of
the detail goes to the log)."""

from __future__ import annotations

import logging

from ..domain import ServiceError
from ..store import (
    StoreConflict,
    StoreError,
    StoreFindError,
    StoreIntegrityError,
    StoreNotFound,
    StoreQueryError,
)

__all__ = ["store_error"]

log = logging.getLogger("agor_actors.services")


def store_error(exc: StoreError) -> ServiceError:
    """The :class:`ServiceError` a client sees for ``exc``."""
    if isinstance(exc, StoreNotFound):
        return ServiceError("not_found", "no such record")
    if isinstance(exc, StoreConflict):
        return ServiceError("conflict", "stale revision", {"current": exc.current})
    if isinstance(exc, StoreFindError):
        # the client's own query, in the query language's terms
        return ServiceError("invalid_field", f"query: {exc}")
    if isinstance(exc, StoreQueryError):
        log.info("the store refused a query: %s", exc)
        return ServiceError(
            "invalid_field", "a field of the query or data is unknown or of the wrong type"
        )
    if isinstance(exc, StoreIntegrityError):
        log.info("the store refused a write: %s", exc)
        return ServiceError("invalid_data", "the data does not fit the records")
    log.warning("the store failed: %s", exc)
    return ServiceError("unavailable", exc.told)
