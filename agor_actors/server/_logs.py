"""The daemon's logs: one line per record, readable text (the default) or
JSON lines (``--log-format json``), and the access log of the HTTP routes.

A JSON line holds ``ts`` (ISO 8601, UTC, milliseconds), ``level``,
``logger``, ``msg`` and every extra field the record was given
(``log.info("...", extra={"user_id": ...})``); a text line shows the same
extras as ``key=value`` after the message.  An exception goes in ``exc``
(JSON) or after the line (text).

The access log: hypercorn calls its logger's ``access`` once per HTTP
request it served; :class:`AccessLogger` turns that into one record of the
``agor_actors.access`` logger with ``method``, ``path``, ``status``,
``duration_ms`` and ``user_id`` when the request was authenticated (the app
puts it in the ASGI scope under :data:`SCOPE_USER_ID`).  ``/ws`` is not
hypercorn's, so it has no access line here.

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
from hypercorn.logging import Logger as HypercornLogger
from hypercorn.typing import ResponseSummary, WWWScope

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "SCOPE_USER_ID",
    "AccessLogger",
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "extra_fields",
    "note_user",
]

LogFormat = Literal["text", "json"]
LOG_FORMATS: Final[tuple[LogFormat, ...]] = ("text", "json")
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")

SCOPE_USER_ID: Final = "agor.user_id"
"""The ASGI scope key under which the app leaves the authenticated user's id."""

ACCESS_LOGGER: Final = "agor_actors.access"
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
        text = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        shown = getattr(record, "_shown", ())
        extras = {k: v for k, v in extra_fields(record).items() if k not in shown}
        if extras:
            text += " " + " ".join(f"{k}={_text_value(v)}" for k, v in extras.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return repr(text) if (" " in text or not text) else text


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


class AccessLogger(HypercornLogger):
    """hypercorn's logger with its access line replaced by a structured
    record of ``agor_actors.access`` (errors still go to ``hypercorn.error``)."""

    access_log = logging.getLogger(ACCESS_LOGGER)

    async def access(
        self, request: WWWScope, response: ResponseSummary | None, request_time: float
    ) -> None:
        if request.get("type") != "http" or not self.access_log.isEnabledFor(logging.INFO):
            return
        status = response["status"] if response is not None else None
        fields: dict[str, Any] = {
            "method": request.get("method"),
            "path": request.get("path"),
            "status": status,
            "duration_ms": round(request_time * 1000.0, 3),
        }
        user_id = _scope_user(request)
        if user_id is not None:
            fields["user_id"] = user_id
        client = request.get("client")
        if client:
            fields["client"] = f"{client[0]}:{client[1]}"
        self.access_log.info(
            "%s %s %s",
            fields["method"],
            fields["path"],
            status if status is not None else "-",
            extra={**fields, "_shown": _IN_ACCESS_MESSAGE},
        )


def note_user(scope: object, user_id: str) -> None:
    """Leave the authenticated user's id in an ASGI scope (a dict), for the
    request's access line."""
    cast(dict[str, Any], scope)[SCOPE_USER_ID] = user_id


def _scope_user(scope: Mapping[str, Any]) -> str | None:
    user_id = scope.get(SCOPE_USER_ID)
    return user_id if isinstance(user_id, str) else None
