"""The broker seam: what the publisher and the feed need of a pub/sub
server, and its implementation on Redis with ``coredis`` (which runs under
trio as it is: no worker threads)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import coredis
import trio

__all__ = ["BrokerLink", "BrokerSession", "Handler", "RedisLink", "open_redis_link"]

Handler = Callable[[str, bytes], None]
"""Called with a channel and a message, in the task that reads the
subscription's connection: must not block."""


class BrokerSession(Protocol):
    """One subscription connection; lost as a whole (then a new one is made).
    Its calls take effect at the server in the order they are made, as
    commands on one connection do: the feed may give a channel up and want
    it again before the first call has returned, and counts on the second
    one winning (Redis: one connection; PostgreSQL: one, behind a lock)."""

    async def subscribe(self, handlers: Mapping[str, Handler]) -> None:
        """Subscribe to the channels; returns once the server confirmed."""

    async def unsubscribe(self, channels: Sequence[str]) -> None: ...

    async def closed(self) -> None:
        """Returns (or raises) only when the connection is lost."""


class BrokerLink(Protocol):
    @property
    def max_message_bytes(self) -> int | None:
        """The longest message it carries (None: no limit worth minding);
        the publisher cuts longer ones (``_wire``)."""

    def session(self) -> Any:
        """An async context manager of a :class:`BrokerSession`; raises on
        its way out when the connection is lost."""

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish ``(channel, message)`` pairs in order (one round trip).
        Raises if the server cannot be reached."""


class _RedisSession:
    def __init__(self, pubsub: coredis.patterns.pubsub.PubSub[bytes]) -> None:
        self._pubsub = pubsub

    async def subscribe(self, handlers: Mapping[str, Handler]) -> None:
        if not handlers:
            return

        def wrap(handler: Handler) -> Callable[[Any], None]:
            def on_message(message: Any) -> None:
                channel = message["channel"]
                if isinstance(channel, bytes):
                    channel = channel.decode("utf-8", "replace")
                data = message["data"]
                handler(str(channel), data if isinstance(data, bytes) else str(data).encode())

            return on_message

        await self._pubsub.subscribe(**{channel: wrap(h) for channel, h in handlers.items()})

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        if channels:
            await self._pubsub.unsubscribe(*channels)

    async def closed(self) -> None:
        await trio.sleep_forever()  # coredis cancels this when its connection fails


class RedisLink:
    """:class:`BrokerLink` on a ``coredis`` client."""

    max_message_bytes = None  # Redis takes up to 512 MB

    def __init__(self, client: coredis.Redis[bytes], *, idle_ping_s: float = 5.0) -> None:
        self._client = client
        self._idle_ping_s = idle_ping_s

    @asynccontextmanager
    async def session(self) -> AsyncIterator[_RedisSession]:
        # no retries inside coredis: a lost connection ends the session, and
        # the feed makes a new one (and has its rooms read what they missed)
        async with self._client.pubsub(
            retry_policy=None, max_idle_seconds=self._idle_ping_s
        ) as pubsub:
            yield _RedisSession(pubsub)

    async def publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        if len(messages) == 1:
            await self._client.publish(*messages[0])
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for channel, message in messages:
                pipe.publish(channel, message)


@asynccontextmanager
async def open_redis_link(
    url: str, *, connect_timeout_s: float = 2.0, stream_timeout_s: float = 5.0
) -> AsyncIterator[RedisLink]:
    """A :class:`RedisLink` to the Redis server at ``url``
    (``redis://host:port/db``).  Connects lazily: an unreachable server
    makes publishing and subscribing fail, not this."""
    client: coredis.Redis[bytes] = coredis.Redis.from_url(
        url,
        decode_responses=False,
        connect_timeout=connect_timeout_s,
        stream_timeout=stream_timeout_s,
    )
    async with client:
        yield RedisLink(client)
