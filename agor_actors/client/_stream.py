"""A streamed message written exactly once, in order, across lost
connections and daemons: each chunk names the offset it must land at
(``messages.stream`` with ``at``), so a chunk sent again after its answer
was lost is refused as already there rather than written twice, and one
that would overtake a chunk still on its way (to another daemon, behind a
slow store) is refused rather than written out of order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import trio

from protocols import ErrorCode

from ._errors import CallError, ConnectionLost

if TYPE_CHECKING:
    from ._client import Client

__all__ = ["MessageWriter", "StreamBroken"]

RETRIES_MAX: Final = 20
"""Sends of one chunk before :meth:`MessageWriter.write` gives up (each
after a lost connection, an unavailable store or a chunk still on its way)."""

RETRY_BASE_S: Final = 0.05
RETRY_CAP_S: Final = 2.0


class StreamBroken(Exception):
    """The message is not what this writer wrote (another writer appended
    to it, or it was removed), or a chunk could not be written after
    :data:`RETRIES_MAX` sends: the chunks from ``length`` on are not known
    to be there."""

    def __init__(self, message: str, length: int) -> None:
        super().__init__(message)
        self.length = length


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, ConnectionLost):
        return True
    # the store away, or the session busy with an earlier chunk
    return isinstance(exc, CallError) and exc.code == "unavailable"


class MessageWriter:
    """Writes one message's chunks, each once and in order, whatever
    connection or daemon takes them; made by :meth:`Client.message_writer`.

    ``write`` returns once the chunk is durable (or known to be there from
    an earlier send), so at most one chunk is on its way at a time; a
    caller that produces faster sends larger chunks.  The rule it relies on:
    nobody else appends to the message (an agent's own stream)."""

    def __init__(self, client: Client, session_id: str, message_id: str, length: int = 0) -> None:
        self._client = client
        self.session_id = session_id
        self.message_id = message_id
        self.length = length
        """Characters of the message known to be there (the next chunk's offset)."""
        self.resent = 0
        """Chunks sent more than once (after a lost answer or a refusal)."""
        self._lock = trio.Lock()

    async def write(self, chunk: str) -> None:
        """Append ``chunk`` where this writer's last chunk ended.  Raises
        :class:`StreamBroken` (the message is not this writer's alone, or
        the chunk could not be written), or the call's :class:`CallError`
        for a refusal that sending again cannot mend (``invalid_field``,
        ``forbidden``, ``not_found``...)."""
        if not chunk:
            return
        async with self._lock:
            at = self.length
            delay = RETRY_BASE_S
            for attempt in range(RETRIES_MAX):
                if attempt:
                    self.resent += 1
                try:
                    await self._send({"chunk": chunk, "at": at})
                except CallError as exc:
                    length = _length(exc.data) if exc.code == ErrorCode.CONFLICT.value else None
                    if length is not None:
                        if length >= at + len(chunk):
                            break  # an earlier send landed; its answer was lost
                        if length != at:
                            raise StreamBroken(
                                f"message {self.message_id} is {length} characters long,"
                                f" this writer wrote {at}",
                                self.length,
                            ) from exc
                        # refused with another chunk merged with it: send again
                    elif not _retryable(exc):
                        raise
                    await trio.sleep(delay)
                    delay = min(delay * 2, RETRY_CAP_S)
                    continue
                break
            else:
                raise StreamBroken(
                    f"chunk at {at} of message {self.message_id} not written after"
                    f" {RETRIES_MAX} sends",
                    self.length,
                )
            self.length = at + len(chunk)

    async def _send(self, data: dict[str, Any]) -> None:
        """One ``messages.stream`` call (raises :class:`CallError`)."""
        await self._client.call("messages", "stream", id=self.message_id, data=data)


def _length(data: Any) -> int | None:
    length = data.get("length") if isinstance(data, dict) else None
    return length if type(length) is int else None
