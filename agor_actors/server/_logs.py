"""The daemon's logs: one line per record, readable text (the default) or
JSON lines (``--log-format json``), and the access log of the HTTP routes.

A JSON line holds ``ts`` (ISO 8601, UTC, milliseconds), ``level``,
``logger``, ``msg`` and every extra field the record was given
(``log.info("...", extra={"user_id": ...})``); a text line shows the same
extras as ``key=value`` after the message.  An exception goes in ``exc``
(JSON) or after the line (text).

The access log (:func:`install_access_log`): one record of the
``agor_actors.access`` logger per HTTP request, with ``method``, ``path``,
``status``, ``duration_ms``, ``client`` and ``user_id`` when the request was
authenticated (the app leaves it in the ASGI scope, :func:`note_user`).
Quart's request hooks, not hypercorn's access logger: hypercorn logs a
request whose client closed the connection as it read the last bytes with
no status.  ``/ws`` is not the app's, so it has no access line here.

The timestamps are the logging module's own (``record.created``): logs are
for people, not part of any actor's behaviour.
"""

from __future__ import annotations

import datetime
import logging
import sys
from collections.abc import Mapping
from typing import IO, Any, Final, Literal, cast

import orjson
from quart import Quart, Response, request

from ..printable import escape_controls
from ..world import Clock

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "SCOPE_USER_ID",
    "JsonFormatter",
    "TextFormatter",
    "access_fields",
    "configure_logging",
    "extra_fields",
    "install_access_log",
    "note_user",
]

LogFormat = Literal["text", "json"]
LOG_FORMATS: Final[tuple[LogFormat, ...]] = ("text", "json")
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")

SCOPE_USER_ID: Final = "agor.user_id"
"""The ASGI scope key under which the app leaves the authenticated user's id."""

ACCESS_LOG: Final = logging.getLogger("agor_actors.access")
_SCOPE_STARTED_S: Final = "agor.started_s"
_IN_ACCESS_MESSAGE: Final = ("method", "path", "status")
"""Fields the access line's text already shows (a text line skips them)."""

_STANDARD: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a record was given with ``extra=``, in their order."""
    return {
        k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
    }


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, the
    extra fields, ``exc`` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        return orjson.dumps(line, default=repr).decode()


class TextFormatter(logging.Formatter):
    """``<ts> <LEVEL> <logger>: <msg> key=value ...`` (extras named in the
    record's ``_shown`` are in the message already and left out)."""

    def format(self, record: logging.LogRecord) -> str:
        message = escape_controls(record.getMessage())  # (a request's path: one line)
        text = f"{_timestamp(record)} {record.levelname} {record.name}: {message}"
        shown = getattr(record, "_shown", ())
        extras = {k: v for k, v in extra_fields(record).items() if k not in shown}
        if extras:
            text += " " + " ".join(f"{k}={_text_value(v)}" for k, v in extras.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    if " " in text or not text or escape_controls(text) != text:
        return repr(text)
    return text


def configure_logging(
    level: str = "INFO", log_format: LogFormat = "text", stream: IO[str] | None = None
) -> logging.Handler:
    """Send every record at ``level`` or above to ``stream`` (stderr) in
    ``log_format``; replaces the root logger's handlers.  Returns the handler."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


def install_access_log(app: Quart, clock: Clock) -> None:
    """One ``agor_actors.access`` record per HTTP request ``app`` answers
    (``/ws`` is not the app's).  Install it first, so that its start time is
    taken before any other ``before_request`` hook can answer the request.
    ``duration_ms`` is from the request's dispatch until its response is
    made (the body may still be on its way), on ``clock``."""

    @app.before_request
    async def _started() -> None:
        request.scope[_SCOPE_STARTED_S] = clock.now_s()  # type: ignore[typeddict-unknown-key]

    @app.after_request
    async def _access(response: Response) -> Response:
        if ACCESS_LOG.isEnabledFor(logging.INFO):
            ACCESS_LOG.info(
                "%s %s %s",
                request.method,
                request.path,
                response.status_code,
                extra={
                    **access_fields(request.scope, response.status_code, clock.now_s()),
                    "_shown": _IN_ACCESS_MESSAGE,
                },
            )
        return response


def access_fields(scope: Mapping[str, Any], status: int, now_s: float) -> dict[str, Any]:
    """The fields of a request's access record."""
    fields: dict[str, Any] = {
        "method": scope.get("method"),
        "path": scope.get("path"),
        "status": status,
    }
    started_s = scope.get(_SCOPE_STARTED_S)
    if isinstance(started_s, float):
        fields["duration_ms"] = round((now_s - started_s) * 1000.0, 3)
    user_id = scope.get(SCOPE_USER_ID)
    if isinstance(user_id, str):
        fields["user_id"] = user_id
    client = scope.get("client")
    if client:
        fields["client"] = f"{client[0]}:{client[1]}"
    return fields


def note_user(scope: object, user_id: str) -> None:
    """Leave the authenticated user's id in an ASGI scope (a dict), for the
    request's access line."""
    cast(dict[str, Any], scope)[SCOPE_USER_ID] = user_id
