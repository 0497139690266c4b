"""The daemon's core: services over the actors, joins, authorization.

The server (WebSocket and HTTP), the embedding API and the simulator all go
through :class:`Hub`, so they share one path for every write:

connection → hub (authorize, route) → session actor (validate, merge) →
store writer (durable, group commit, seq) → room (fan-out) → outboxes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Final, Literal, Protocol, TypeVar

import attrs
import outcome
import trio
from argon2 import PasswordHasher
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from protocols import Call, Joined, Left, PresenceUpdate, Since, encode
from supervisors import ChildStartError, Intensity

from ..broker import (
    PUBLISHER_NAME,
    BrokerLink,
    BrokerPublisher,
    RoomFeed,
    broker_kind,
    open_broker_link,
)
from ..domain import Principal, ServiceError, SignOut, own_token_id
from ..domain.presence import (
    PresenceConfig,
    PresenceGone,
    PresenceTouch,
    Republish,
    UserPresenceBehaviour,
)
from ..domain.room import (
    ActivityQuery,
    CatchUp,
    Revoke,
    RoomBehaviour,
    Subscribe,
    Subscription,
    Unsubscribe,
    activity_entry,
    to_event,
)
from ..domain.session import Command, SessionBehaviour, idempotency_of, repeated_answer
from ..identity import AccessTokens, Authentication, IdentityConfig, Passwords, looks_like_jwt
from ..marks import mark
from ..metrics import Metrics
from ..outbox import Outbox, OutboxClosed, OutboxOverflow
from ..runtime import ActorDead, ActorRef, ActorSystem, Behaviour, Kind, open_system
from ..services import (
    CURSOR_KEY,
    MINTS_ID,
    READ_METHODS,
    SESSION_SCOPED,
    AccessChange,
    BoardCall,
    BoardPlan,
    CursorSeal,
    Gate,
    Level,
    UserLimits,
    access_change,
    check_call,
    narrower_role,
    parse_activity,
    plan_board,
    plan_token_rotation,
    plan_user,
    plan_user_removal,
    public,
    store_error,
    visible_page,
)
from ..store import (
    MAX_LIMIT,
    WRITER_NAME,
    Mutation,
    Once,
    Page,
    Resync,
    SqlStore,
    StoredEvent,
    StoreError,
    StoreRepeated,
    StoreUnavailable,
    StoreWriter,
    Write,
    WriteRequest,
    WriteResult,
    hash_token,
    open_store,
)
from ..world import World
from ._datadir import hold_data_dir
from ._keys import KeyedWrite, WriteKeys, replayed
from ._token import (
    JWT_SECRET_FILE,
    TOKEN_FILE,
    read_or_create_secret,
    read_or_create_token,
    stage_secret,
)

__all__ = ["AllowAll", "Authorizer", "Hub", "NotClusterKeys", "NotClusterOwner", "open_hub"]

T = TypeVar("T")

log = logging.getLogger("agor_actors.daemon")
_security_log = logging.getLogger("agor_actors.security")
_PASSWORD_CHANGED: Final = "the password was changed: sign in again"
_TOKEN_RENEWED: Final = "this user's token was renewed: connect with the new one"

OWNER_ID = "owner"


class _JoinRevoked(Exception):
    """A join's user lost sight of the room before the join reached it."""


class NotClusterOwner(Exception):
    """A cluster node's owner token is not the one the cluster's database
    knows: taking it would lock the other nodes' owner out."""


class NotClusterKeys(Exception):
    """A cluster node's keys (access tokens', browser cookies') are not the
    ones the other nodes keep: each node would refuse what the others
    signed.  The message says what to copy."""


KEY_CHECK_PREFIX: Final = "key_check:"
"""The ``meta`` rows (``key_check:jwt``, ``key_check:web``) that keep the
check value of a cluster's keys (see :meth:`Hub.check_cluster_key`)."""


class Authorizer(Protocol):
    """A deployment's own rule, checked on every call and join beside the
    permissions.  Raises ``ServiceError("forbidden", ...)`` to refuse."""

    async def authorize(self, principal: Principal, action: str, resource: str) -> None: ...


class AllowAll:
    """Adds nothing to the permissions (:mod:`agor_actors.services`'s
    gate), which every call and join passes first."""

    async def authorize(self, principal: Principal, action: str, resource: str) -> None:
        return None


@attrs.frozen
class _SessionWrite:
    """A call that is a session's write: the session actor and its command."""

    actor: str
    cmd: Command
    session_id: str
    access_change: bool = False
    """The write may change who sees the session (its owner, permissions,
    board or lock)."""


def _needs_record(write: _SessionWrite, result: outcome.Outcome[Any]) -> bool:
    """Whether the caller is answered with a task's or message's record
    (read once the write is durable) rather than the session's answer."""
    cmd = write.cmd
    if cmd.service not in SESSION_SCOPED or cmd.id is None:
        return False
    if isinstance(result, outcome.Value):
        return cmd.method in ("patch", "update")
    error = result.error  # type: ignore[attr-defined]
    # a streamed chunk's conflict (its ``at``) carries the message's length
    return isinstance(error, ServiceError) and error.code == "conflict" and cmd.method != "stream"


def _merged(first: PresenceUpdate, then: PresenceUpdate) -> PresenceUpdate:
    """``first`` with what ``then`` says (its fields that are not None)."""
    changed = {k: v for k, v in attrs.asdict(then, recurse=False).items() if v is not None}
    return attrs.evolve(first, **changed)


class Hub:
    """Made by :func:`open_hub`."""

    access_sweep_s = 30.0
    """A cluster node's: how often it forgets the access it read and checks
    every subscription again (the fallback for a change it was not told:
    see :meth:`access_check`)."""
    access_sweep_cut_s = 2.0
    """How often it does so while its subscription to the broker is down:
    it hears of no other daemon's access change then, and its own writer's
    events still reach its subscribers at once."""
    keys_kept_s = 3600.0
    """How long the store keeps a write's idempotency key (a write sent
    again later runs again); :meth:`_key_sweeper` drops older ones every
    :attr:`keys_sweep_s`."""
    keys_sweep_s = 300.0
    board_retry_min_s = 0.5
    board_retry_max_s = 30.0
    """The pause before asking again for a board's facepile whose room
    failed to start, doubling from the first to the second (see
    :meth:`_republish_later`)."""

    def __init__(
        self,
        world: World,
        store: SqlStore,
        system: ActorSystem,
        owner_token: str,
        authorizer: Authorizer,
        metrics: Metrics | None = None,
        identity: Authentication | None = None,
        *,
        tasks: trio.Nursery,
        limits: UserLimits | None = None,
        feed: RoomFeed | None = None,
        owner_token_file: pathlib.Path | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.feed = feed
        """A cluster node's feed of the other daemons' commits; None alone."""
        if feed is not None:
            feed.gap_check = self._gap_check
        self.world = world
        self.store = store
        self.system = system
        self.owner_token = owner_token
        self.owner_token_file = owner_token_file
        """Where the owner's token is kept (``<data_dir>/token``); None: the
        program embedding the daemon gave it."""
        self.authorizer = authorizer
        self.identity = identity
        """Sign-in and access tokens (JWT); None: local tokens only."""
        self.limits = limits or UserLimits()
        self.gate = Gate(world, store)
        self._seal: CursorSeal | None = None
        self._tasks = tasks
        self._subs: dict[str, dict[str, Subscription]] = {}
        self._by_actor: dict[str, dict[tuple[str, str], None]] = {}
        """Room actor -> the ``(connection, room)`` of each subscription it
        serves (an index of ``_subs``, kept by :meth:`_keep_sub` and
        :meth:`_forget_sub`; in the order they joined), so a room's exit
        looks at its own only."""
        self._principals: dict[str, Principal] = {}
        """Who each connection (joined or welcomed) is."""
        self._connections_of: dict[str, set[str]] = {}
        self._pending_of: dict[str, int] = {}
        self._joining: set[str] = set()
        self._lost_joins: set[str] = set()
        """Joins whose room's actor ended while their Subscribe was on its
        way (a subset of ``_joining``): the join tells its client to resume."""
        self._rechecks = 0
        """Rechecks begun: a join checked before one began asks again."""
        self._drops: dict[str, int] = {}
        """Rooms with subscriptions being dropped by a recheck (forgotten
        here, their room not told yet), with how many."""
        self._drops_done = trio.lowlevel.ParkingLot()
        self._revoked: dict[str, str] = {}
        """Subscriptions revoked while being joined: the join ends them."""
        self._recheck_users: set[str] = set()
        self._recheck_rooms: set[str] = set()
        self._recheck_everyone = False
        self._recheck_wanted = trio.Event()
        self.revocations = 0
        self._owner_of: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.keys = WriteKeys()
        """Writes under an idempotency key this daemon has in flight."""
        self._owner_cache_max = 65_536
        self._tokens: OrderedDict[str, Principal] = OrderedDict()
        self._sign_out_hooks: list[Callable[[SignOut], None]] = []
        """Told which connections a sign-out ends (the server closes them)."""
        self._signouts = 0
        """Moves when a user is removed or its token renewed: a check of a
        token or cookie that read the store before reads it again."""
        self._presence_of: dict[str, Principal] = {}
        self._presence_last: dict[str, PresenceUpdate] = {}
        """Each connection's presence as it last stood (its updates merged;
        one per connection, gone with it), told again to a user's presence
        actor that started over while their connections stayed."""
        self._presence_unchecked: dict[str, tuple[Principal, PresenceUpdate]] = {}
        """Per connection: its latest presence update whose board could not
        be checked (the store away; later updates of the same board merged
        in), applied once the check can be made (see :meth:`presence`)."""
        self._presence_checking = False
        """The task that checks them again runs."""
        self._forgotten_boards: dict[str, None] = {}
        """Boards whose room passivated since its last join (an ordered set)."""
        self._forgotten_boards_max = 65_536
        self._board_retries: dict[str, tuple[int, float]] = {}
        """Boards whose room failed to start with users present: how many
        times in a row, and when last (an ordered map, as large at most as
        ``_forgotten_boards``: overflow drops the oldest)."""
        self._board_retry_pending: set[str] = set()
        """Boards with a republish scheduled (one task each)."""
        self.presence_dropped = 0
        system.registry.exit_hooks.append(self._on_actor_exit)
        self.metrics.add_collector(self._scraped)

    def _on_actor_exit(self, name: str, ref: ActorRef) -> None:
        """A room that crashed forgot its subscribers: tell each one
        ``lagged`` from what it was offered, so that it resumes (from the
        new incarnation's memory or the log) instead of waiting forever."""
        reason = ref.exit_reason
        if reason is not None and reason.abnormal:
            self.metrics.actor_exits.labels(name.partition(":")[0]).inc()
        if name.startswith("room:board:") and reason is not None and not reason.abnormal:
            # it passivated (nobody was subscribed): its facepile is gone;
            # the next join asks those present to tell it again, whatever
            # started the room meanwhile (a commit to the board does)
            self._forget_board(name.removeprefix("room:board:"))
        if name.startswith("presence:user:") and reason is not None:
            self._presence_restarted(name.removeprefix("presence:user:"))
            return
        if not name.startswith("room:") or reason is None:
            return
        served = self._by_actor.get(name)
        if not reason.abnormal and (self.system.registry.supervisor.stopping or not served):
            return  # it passivated (nobody was subscribed), or the daemon stops
        # it crashed, or it was stopped with subscribers (its supervisor gave
        # up and every actor starts over): they are lost the same way
        if self.feed is not None:
            # its next incarnation starts at the log's head: an event that
            # changed access and that it had not checked yet is never shown
            # to :meth:`access_check`; the record is read again and who
            # may have lost sight of it checked again
            kind, _, ident = name.removeprefix("room:").partition(":")
            if kind == "session":
                self.gate.forget_session(ident)
                self._recheck_soon(rooms={f"session:{ident}"})
            else:
                self.gate.forget_board(ident)
                self._recheck_soon(everyone=True)
        if name.startswith("room:board:"):
            board = name.removeprefix("room:board:")
            if ref.started:
                # the facepile was the room's memory: every user present
                # asks the new incarnation to take their entry again
                self._republish(board)
            else:
                # it failed to start (the store away): what a republish now
                # sends would start it again at once, and a start that fails
                # at once would republish again, a loop with no time passing
                # (the simulator's cluster seeds 1692 and 1987); the next
                # join asks, as after a passivation, or else a republish
                # after a pause that grows while its starts keep failing
                self._forget_board(board)
                self._republish_later(board)
        for connection_id, room in list(served or ()):
            sub = self._forget_sub(connection_id, room)
            if sub is None:
                continue
            self._unwatch(sub)
            if sub.key in self._joining:
                # its Subscribe may be answered by the next incarnation
                self._lost_joins.add(sub.key)
            with contextlib.suppress(OutboxClosed, OutboxOverflow):
                # what was offered but not sent yet is resent too
                sub.outbox.room_lost(room)

    def _presence_restarted(self, user_id: str) -> None:
        """A user's presence actor stopped while some of their connections
        stayed (it crashed, or every actor started over): the next one is
        told what each of them last said, rather than nothing until their
        next change.  (A presence actor that passivated had none left.)"""
        if self.system.registry.supervisor.stopping:
            return
        present = [
            (conn, principal)
            for conn in self._connections_of.get(user_id, ())
            if (principal := self._presence_of.get(conn)) is not None
        ]
        if present:
            self._tasks.start_soon(self._present_again, present)

    async def _present_again(self, present: list[tuple[str, Principal]]) -> None:
        for conn, principal in present:
            update = self._presence_last.get(conn)
            if update is None or self._presence_of.get(conn) is not principal:
                continue  # gone meanwhile
            try:
                ref = await self.system.registry.get(f"presence:user:{principal.user_id}")
            except Exception as exc:  # the registry stopping: nothing to tell
                log.info("presence of %s not told again: %r", principal.user_id, exc)
                return
            # the wait for the actor can be long (every actor starting over):
            # a connection that closed meanwhile is not brought back (its
            # PresenceGone may have found no actor to tell), and one that
            # said something new meanwhile is told as it is now
            update = self._presence_last.get(conn)
            if update is None or self._presence_of.get(conn) is not principal:
                continue
            touch = PresenceTouch(conn, principal.user_id, principal.name, update)
            if not ref.try_send(touch):
                self.presence_dropped += 1

    def _forget_board(self, board: str) -> None:
        """``board``'s room holds no facepile: its next join republishes."""
        forgotten = self._forgotten_boards
        forgotten[board] = None
        while len(forgotten) > self._forgotten_boards_max:
            del forgotten[next(iter(forgotten))]  # overflow: drop the oldest

    def _republish_later(self, board: str) -> None:
        """A board's room failed to start (someone present sent it an entry,
        so someone is there): ask again after a pause, 0.5 s doubling to
        30 s while starts keep failing, unless a join asked meanwhile.  On
        one daemon only a join shows a facepile, but a cluster's other
        daemons see this daemon's users only through its board room's
        heartbeats: a room started by nobody left them out until a user's
        next change, up to a minute (the simulator's cluster seed 5446,
        where every actor of a node started over while the store was
        away, and its clients gave up the board)."""
        if self.system.registry.supervisor.stopping or board in self._board_retry_pending:
            return
        now = self.world.clock.now_s()
        failures, last_s = self._board_retries.pop(board, (0, now))
        if now - last_s > self.board_retry_max_s * 2:
            failures = 0  # it ran since: start over
        self._board_retries[board] = (failures + 1, now)
        while len(self._board_retries) > self._forgotten_boards_max:
            del self._board_retries[next(iter(self._board_retries))]
        pause_s = min(self.board_retry_max_s, self.board_retry_min_s * 2**failures)
        self._board_retry_pending.add(board)
        self._tasks.start_soon(self._republish_after, board, pause_s)

    async def _republish_after(self, board: str, pause_s: float) -> None:
        try:
            await trio.sleep(pause_s)
        finally:
            self._board_retry_pending.discard(board)
        if self._forgotten_boards.pop(board, False) is None:  # no join asked meanwhile
            self._republish(board)

    def _republish(self, board: str) -> None:
        """Every user with an entry asks ``board``'s room to take it again:
        every live presence actor, not only those of users connected now (a
        user in the offline grace has an entry too, and their actor, which
        believes the room holds it, would not send it again when they come
        back saying the same).  A passivated presence actor had none."""
        registry = self.system.registry
        for name in registry.names_of("presence:user:"):
            presence_ref = registry.lookup(name)
            if presence_ref is not None and not presence_ref.try_send(Republish(board)):
                self.presence_dropped += 1

    # ------------------------------------------------------------------ auth

    async def authenticate(self, token: str | None) -> Principal | None:
        """The principal a token stands for, or None: an access token (a
        JWT, checked by :attr:`identity`, with its expiry) or a local token
        (the owner's, a user's from ``users.create``)."""
        if not token or not isinstance(token, str):
            return None
        if looks_like_jwt(token):
            return None if self.identity is None else await self.identity.principal(token)
        digest = hash_token(token)
        cached = self._tokens.get(digest)
        if cached is not None:
            return cached
        store, signouts = self.store, self._signouts
        row = await self.world.blocking.run(lambda: store.user_by_token_hash(digest))
        if signouts != self._signouts:  # a user was removed, or its token renewed, meanwhile
            return await self.authenticate(token)
        if row is None:
            return None
        principal = Principal(
            user_id=row["id"],
            name=row["name"],
            is_owner=bool(row["is_owner"]),
            token_id=own_token_id(digest),
        )
        self._tokens[digest] = principal
        if len(self._tokens) > 4096:
            self._tokens.popitem(last=False)
        return principal

    async def confirm(self, principal: Principal) -> Principal | None:
        """``principal`` (a browser's, from its signed cookie) if its
        sign-in is open (:meth:`open_web_session`; not logged out, its
        password not changed since) and its user there and not removed,
        else None.  Read from the store each time: cookies are checked once
        per request or connection.  Raises ``ServiceError``
        (``unavailable``) while the store is away."""
        user_id, signouts, session = principal.user_id, self._signouts, principal.session
        if session is None:  # a cookie of a daemon before sign-ins were kept
            _security_log.info("cookie refused", extra={"user_id": user_id, "reason": "no_session"})
            return None
        row = await self._read_row("users", user_id)
        check = partial(
            self.store.web_session_user, hash_token(session), now_ms=self.world.wall.now_ms()
        )
        session_user = await self._stored(check)
        if signouts != self._signouts:  # a user was removed, or its token renewed, meanwhile
            return await self.confirm(principal)
        removed = row is None or row.get("removed_at") is not None
        if removed or session_user != user_id:
            reason = "no_user" if removed else "no_session"
            _security_log.info("cookie refused", extra={"user_id": user_id, "reason": reason})
            return None
        return principal

    async def open_web_session(self, principal: Principal, max_age_s: int) -> Principal:
        """A browser sign-in of ``principal``, kept for ``max_age_s``: the
        principal with its ``session`` (what the cookie names).  Raises
        ``ServiceError`` (``unavailable``)."""
        session = self.world.entropy.token(24)
        now_ms = self.world.wall.now_ms()
        keep = partial(
            self.store.open_web_session,
            hash_token(session),
            principal.user_id,
            now_ms=now_ms,
            expires_ms=now_ms + max_age_s * 1000,
        )
        await self._stored(keep)
        return attrs.evolve(principal, session=session)

    async def close_web_session(self, principal: Principal) -> None:
        """Log a browser out: the sign-in its cookie names is closed (the
        cookie is refused from then on, wherever it is), and the connections
        it opened here are closed (``unauthorized``).  Raises
        ``ServiceError`` (``unavailable``)."""
        if principal.session is None:
            return
        close = partial(self.store.close_web_sessions, digest=hash_token(principal.session))
        await self._stored(close)
        self._sign_out(SignOut(principal.user_id, "signed out", session=principal.session))

    async def _close_web_sessions_of(self, user_id: str) -> None:
        close = partial(self.store.close_web_sessions, user_id=user_id)
        closed = await self._stored(close)
        if closed:
            _security_log.info("browsers signed out", extra={"user_id": user_id, "closed": closed})

    async def new_sign_in_code(
        self,
        principal: Principal,
        next_path: str,
        *,
        ttl_s: float,
        pending_max: int,
        user_pending_max: int,
    ) -> str:
        """A one-time browser sign-in code for ``principal``, good for
        ``ttl_s`` on any daemon sharing this store (only its SHA-256 is
        kept).  Raises ``ServiceError``: ``rate_limited`` while
        ``pending_max`` codes are pending, or ``user_pending_max`` of the
        principal's; ``unavailable``."""
        code = self.world.entropy.token(24)
        now_ms = self.world.wall.now_ms()
        put = partial(
            self.store.put_sign_in_code,
            hash_token(code),
            principal.user_id,
            next_path,
            now_ms=now_ms,
            expires_ms=now_ms + int(ttl_s * 1000),
            pending_max=pending_max,
            user_pending_max=user_pending_max,
        )
        refused = await self._stored(put)
        if refused is not None:
            raise ServiceError(
                "rate_limited", f"too many sign-in links pending{refused}; try in a minute"
            )
        return code

    async def take_sign_in_code(self, code: str) -> tuple[Principal, str] | None:
        """``(principal, next_path)`` of a sign-in code, once; None if it
        is unknown, used, expired, or its user was removed.  Raises
        ``ServiceError`` (``unavailable``)."""
        take = partial(
            self.store.take_sign_in_code, hash_token(code), now_ms=self.world.wall.now_ms()
        )
        taken = await self._stored(take)
        if taken is None:
            return None
        user_id, next_path = taken
        row = await self._read_row("users", user_id)
        if row is None or row.get("removed_at") is not None:
            return None
        return Principal(user_id, str(row["name"]), bool(row["is_owner"])), next_path

    def on_sign_out(self, hook: Callable[[SignOut], None]) -> None:
        """Call ``hook`` with the connections to close when a user is
        removed, its password changed or its token renewed (here, or,
        found by the sweep, through another daemon of a cluster)."""
        self._sign_out_hooks.append(hook)

    def _forget_tokens_of(self, user_id: str) -> None:
        """Forget the user's cached local token; a check of a token or
        cookie that read the store before (its answer may predate this)
        reads it again (:attr:`_signouts` moves)."""
        self._signouts += 1
        for digest in [d for d, p in self._tokens.items() if p.user_id == user_id]:
            del self._tokens[digest]

    def _user_removed(self, user_id: str) -> None:
        """Forget what lets the user in, and close its connections."""
        self._forget_tokens_of(user_id)
        if self.identity is not None:
            self.identity.forget(user_id)
        self._sign_out(SignOut(user_id, "this user was removed", removed=True))

    def _sign_out(self, sign_out: SignOut) -> None:
        for hook in self._sign_out_hooks:
            try:
                hook(sign_out)
            except Exception:
                log.exception("a sign-out hook failed", extra={"user_id": sign_out.user_id})

    async def _find_removed(self) -> None:
        """A cluster node's sweep: users removed, passwords changed, tokens
        renewed and browsers logged out through another daemon.  The caches
        of tokens are emptied, and the users connected here are read again:
        those removed are closed out, and the connections of the others
        that an access token issued under an older password, an own token
        since renewed, or a browser sign-in since closed (or expired)
        opened."""
        self._tokens.clear()
        identity = self.identity
        if identity is not None:
            identity.forget()
        store = self.store
        for user_id in list(self._connections_of):
            try:
                if identity is None:
                    row = await self.world.blocking.run(partial(store.get, "users", user_id))
                    known, removed = None, row is not None and row.get("removed_at") is not None
                else:  # one read of the user and its password
                    known = await identity.known_user(user_id)
                    removed = known is None
            except StoreError as exc:
                log.warning("checking for removed users failed: %s", exc)
                return
            if removed:
                self._user_removed(user_id)
            elif known is not None:
                self._sign_out_if_any(SignOut(user_id, _PASSWORD_CHANGED, generation=known[1]))
        await self._find_renewed_tokens()
        await self._find_closed_sign_ins()

    def _sign_out_if_any(self, sign_out: SignOut) -> None:
        """``sign_out``, if it ends a connection here."""
        principals = self._principals
        mine = self._connections_of.get(sign_out.user_id, ())
        if any(c in principals and sign_out.ends(principals[c]) for c in mine):
            self._sign_out(sign_out)

    async def _find_renewed_tokens(self) -> None:
        """Close the connections of own tokens renewed since they were
        opened (one read for all the users they are of)."""
        users = sorted({p.user_id for p in self._principals.values() if p.token_id is not None})
        if not users:
            return
        try:
            hashes = await self.world.blocking.run(partial(self.store.token_hashes, users))
        except StoreError as exc:
            log.warning("checking for renewed tokens failed: %s", exc)
            return
        for user_id, token_hash in hashes.items():
            self._sign_out_if_any(
                SignOut(user_id, _TOKEN_RENEWED, token_id=own_token_id(token_hash))
            )

    async def _find_closed_sign_ins(self) -> None:
        """Close the connections of browser sign-ins closed or expired since
        they were opened (one read for all of them)."""
        cookies = {
            hash_token(p.session): p for p in self._principals.values() if p.session is not None
        }
        if not cookies:
            return
        check = partial(
            self.store.open_web_sessions, list(cookies), now_ms=self.world.wall.now_ms()
        )
        try:
            still = await self.world.blocking.run(check)
        except StoreError as exc:
            log.warning("checking for closed sign-ins failed: %s", exc)
            return
        for digest, principal in cookies.items():
            if digest not in still:
                message = "this sign-in is no longer valid"
                self._sign_out(SignOut(principal.user_id, message, session=principal.session))

    # ------------------------------------------------------------------ calls

    async def call(
        self,
        principal: Principal,
        *,
        connection_id: str | None,
        service: str,
        method: str,
        id: str | None = None,
        data: Any = None,
        query: dict[str, Any] | None = None,
        temp_id: str | None = None,
        base_rev: int | None = None,
        idempotency_key: str | None = None,
        if_match: bool = False,
    ) -> Any:
        """Run one service call; returns once any write is durable.  Raises
        :class:`ServiceError`.  A write under an ``idempotency_key`` its
        user sent before is not run again: it gets the first one's answer
        (marked ``_replayed``).  ``if_match``: ``base_rev`` is HTTP's
        ``If-Match``, which holds a session's whole write (a stale one
        changes nothing), not only its strict fields."""
        try:
            call = Call(0, service, method, id, data, query, temp_id, base_rev, idempotency_key)
        except ValueError as exc:  # an idempotency key out of bounds
            raise ServiceError("invalid_field", str(exc)) from None
        return await self._call_keyed(principal, connection_id, call, if_match)

    async def _call_keyed(
        self, principal: Principal, connection_id: str | None, call: Call, if_match: bool = False
    ) -> Any:
        keyed = self._keyed(principal, call)
        if keyed is None:
            return await self._call(principal, connection_id, call, if_match=if_match)
        write, first = keyed
        if not first:
            return await self._twin(
                write, partial(self._call_keyed, principal, connection_id, call, if_match)
            )
        result: outcome.Outcome[Any] = outcome.Error(ServiceError("unavailable", "cancelled"))
        try:
            result = await outcome.acapture(
                partial(self._call, if_match=if_match), principal, connection_id, call, write
            )
        finally:
            self.keys.settle(write, result)
        return result.unwrap()

    def _keyed(self, principal: Principal, call: Call) -> tuple[KeyedWrite, bool] | None:
        """A write sent under an idempotency key: its entry in :attr:`keys`
        and whether this call runs it (see :meth:`WriteKeys.claim`); None
        for a call without a key or a read (which may be sent again as it
        is).  A key is taken by the writes of sessions, tasks, messages and
        boards (their store request takes it); on a user's write it is
        refused (the store would keep the token ``users.create`` answers)."""
        key, service = call.idempotency_key, call.service
        if key is None or call.method in READ_METHODS or service == "authentication":
            return None
        if service == "users":  # its create answers a token, which the store would keep
            raise ServiceError(
                "invalid_field",
                "idempotency_key is taken by the writes of sessions, tasks, messages and boards",
            )
        what, digest = idempotency_of(service, call.method, call.id, call.data, call.base_rev)
        return self.keys.claim(principal.user_id, key, what, digest)

    async def _twin(self, write: KeyedWrite, again: Callable[[], Awaitable[Any]]) -> Any:
        """A write sent again under the key of ``write``: its answer, once
        it has one; if it failed (nothing written), it is called ``again``
        (under its key: the first of its twins runs it)."""
        answered = await self.keys.outcome_of(write)
        if answered is not None:
            return answered.unwrap()
        return await again()

    async def _call(
        self,
        principal: Principal,
        connection_id: str | None,
        call: Call,
        keyed: KeyedWrite | None = None,
        *,
        if_match: bool = False,
    ) -> Any:
        release = self._pending(principal)
        try:
            route = await self._route(principal, connection_id, call, keyed, if_match=if_match)
            if not isinstance(route, _SessionWrite):
                return await route()
            result = await outcome.acapture(
                self.system.registry.call, route.actor, route.cmd, timeout_s=30.0
            )
            if isinstance(result, outcome.Error):
                away = _store_away(result.error)
                if away is not None:  # the session's actor cannot read its record
                    result = outcome.Error(away)
            if self._settle_access(route):
                await self._recheck(rooms={f"session:{route.session_id}"})
            return (await self._answer(route, result)).unwrap()
        finally:
            release()

    async def submit(
        self,
        principal: Principal,
        connection_id: str | None,
        call: Call,
        reply: Callable[[outcome.Outcome[Any]], None],
        *,
        caller_gone: Callable[[], bool] | None = None,
    ) -> Callable[[], Awaitable[Any]] | None:
        """Start one service ``call``, for a connection that answers calls as
        they complete.  A session's write is put in the session's mailbox
        before this returns (so one connection's writes keep the order in
        which it sent them, and a full mailbox slows its reader), and its
        outcome is handed to ``reply`` in the answering actor's task, once
        durable: then None.  Anything else (reads, boards, users, activity)
        is returned as a call for the caller to run concurrently.  Raises
        :class:`ServiceError` for a call refused before it starts.

        ``caller_gone`` is asked before a write that had to wait for its
        session's actor (spawning, restarting: up to the registry's restart
        back-off) is sent to it: a write whose caller has gone meanwhile is
        dropped, unwritten (``unavailable``), rather than written after
        what the caller, told the connection was lost, wrote since through
        another connection, maybe another daemon (the simulator's cluster
        seed 2812: a stream's chunk landed after the five next ones).

        A write under an ``idempotency_key`` its user sent before is not
        run again: it is returned as a call that waits for the first one's
        answer (see :meth:`call`)."""
        keyed = self._keyed(principal, call)
        if keyed is None:
            return await self._submit(principal, connection_id, call, reply, caller_gone)
        write, first = keyed
        if not first:
            return partial(
                self._twin, write, partial(self._call_keyed, principal, connection_id, call)
            )
        keys = self.keys

        def settled(result: outcome.Outcome[Any]) -> None:
            keys.settle(write, result)
            reply(result)

        try:
            run = await self._submit(principal, connection_id, call, settled, caller_gone, write)
        except BaseException as exc:
            error = exc if isinstance(exc, Exception) else ServiceError("unavailable", "cancelled")
            keys.settle(write, outcome.Error(error))
            raise
        return None if run is None else partial(self._settled_run, write, run)

    async def _settled_run(self, write: KeyedWrite, run: Callable[[], Awaitable[Any]]) -> Any:
        result: outcome.Outcome[Any] = outcome.Error(ServiceError("unavailable", "cancelled"))
        try:
            result = await outcome.acapture(run)
        finally:
            self.keys.settle(write, result)
        return result.unwrap()

    async def _submit(
        self,
        principal: Principal,
        connection_id: str | None,
        call: Call,
        reply: Callable[[outcome.Outcome[Any]], None],
        caller_gone: Callable[[], bool] | None,
        keyed: KeyedWrite | None = None,
    ) -> Callable[[], Awaitable[Any]] | None:
        release = self._pending(principal)
        try:
            route = await self._route(principal, connection_id, call, keyed)
        except BaseException:
            release()
            raise
        if not isinstance(route, _SessionWrite):
            return partial(self._counted, release, route)
        write = route

        def answered(result: outcome.Outcome[Any]) -> None:
            release()
            if self._settle_access(write):
                self._recheck_soon(rooms={f"session:{write.session_id}"})
            if _needs_record(write, result):
                # the record with its new rev, or the current one of a conflict
                self._tasks.start_soon(self._answer_later, write, result, reply)
                return
            if isinstance(result, outcome.Value):
                self._written(write, result.value)
            reply(result)

        guard = None
        if caller_gone is not None:
            gone = caller_gone

            def guard() -> None:
                if gone():
                    raise ServiceError("unavailable", "the caller is gone: not written")

        try:
            await self.system.registry.request(write.actor, write.cmd, answered, guard=guard)
        except BaseException as exc:
            release()
            self._settle_access(write)  # what it assumed (nothing is written)
            away = _store_away(exc)
            if away is not None:  # the session's actor cannot read its record
                raise away from exc
            raise
        return None

    @staticmethod
    async def _counted(release: Callable[[], None], run: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await run()
        finally:
            release()

    def _pending(self, principal: Principal) -> Callable[[], None]:
        """One more call of ``principal`` in flight (``too_many_pending``
        past the user's cap; the local owner has none); returns what ends
        it (once)."""
        if principal.is_owner:
            return _nothing
        user = principal.user_id
        count = self._pending_of.get(user, 0)
        if count >= self.limits.pending_calls:
            raise ServiceError(
                "too_many_pending",
                f"{count} calls of this user are pending (at most {self.limits.pending_calls})",
            )
        self._pending_of[user] = count + 1
        done = False

        def release() -> None:
            nonlocal done
            if done:
                return
            done = True
            left = self._pending_of[user] - 1
            if left:
                self._pending_of[user] = left
            else:
                del self._pending_of[user]

        return release

    async def _answer_later(
        self,
        write: _SessionWrite,
        result: outcome.Outcome[Any],
        reply: Callable[[outcome.Outcome[Any]], None],
    ) -> None:
        reply(await self._answer(write, result))

    async def _answer(
        self, write: _SessionWrite, result: outcome.Outcome[Any]
    ) -> outcome.Outcome[Any]:
        """A session's answer as the caller gets it: a patch of a task or a
        message answers the record (with its new rev), a stale base_rev the
        current record."""
        cmd = write.cmd
        if isinstance(result, outcome.Value):
            self._written(write, result.value)
        if not _needs_record(write, result):
            return result
        assert cmd.id is not None
        try:
            record = await self._read(cmd.principal, cmd.service, "get", cmd.id, None)
        except ServiceError as exc:
            return outcome.Error(exc)
        if isinstance(result, outcome.Value):
            if isinstance(result.value, dict) and "_seq" in result.value:
                record = {**record, "_seq": result.value["_seq"]}
            return outcome.Value(record)
        return outcome.Error(
            ServiceError(
                "conflict",
                f"stale base_rev {cmd.base_rev}; the record is at rev {record.get('rev')}",
                {"current": record, "rev": record.get("rev")},
            )
        )

    def _settle_access(self, write: _SessionWrite) -> bool:
        """A session's write was answered: forget what the gate knew of the
        session's access (or assumed while the write was in flight); True if
        the write may have changed who sees the session."""
        if write.cmd.service != "sessions":
            return False
        self.gate.forget_session(write.session_id)
        return write.access_change

    async def _route(
        self,
        principal: Principal,
        connection_id: str | None,
        call: Call,
        keyed: KeyedWrite | None = None,
        *,
        if_match: bool = False,
    ) -> _SessionWrite | Callable[[], Awaitable[Any]]:
        """Check and authorize a call, and say where it goes: a session's
        write, or a call to run here.  ``keyed``: its idempotency key's
        entry (see :meth:`_keyed`), taken by its store request;
        ``if_match``: see :meth:`call`."""
        service, method, id, data = call.service, call.method, call.id, call.data
        query, temp_id, base_rev = call.query, call.temp_id, call.base_rev
        if service == "authentication":  # anyone connected may sign in or out
            return partial(self.authentication, method, data)
        check_call(service, method, id)
        resource = service if id is None else f"{service}:{id}"
        await self.authorizer.authorize(principal, method, resource)
        if service == "users":
            self.gate.check_users_call(principal, method, id)
        if service == "activity":
            return partial(self._activity, principal, method, query)
        if method in READ_METHODS:
            return partial(self._read, principal, service, method, id, query)
        now_ms = self.world.wall.now_ms()
        new_id = self.world.entropy.new_id(now_ms) if method in MINTS_ID else ""
        if service == "users":
            if base_rev is not None:  # HTTP's If-Match on a record without an ETag
                raise ServiceError(
                    "conflict", "users have no revision: no base_rev (If-Match) holds for them"
                )
            return partial(self._users, principal, method, id, data, now_ms, new_id)
        if service == "boards":
            await self.gate.check_board_call(principal, method, id, data)
            await self._check_users_named(principal, data, ("owner_id",))
            board_call = BoardCall(
                principal, connection_id, method, id, data, now_ms, new_id, temp_id, base_rev
            )
            return partial(self._boards, board_call, keyed)
        if service == "sessions":
            session_id = new_id if method == "create" else id
            if session_id is None:
                raise ServiceError("invalid_field", "id is required")
        else:
            session_id = await self._session_of(service, method, id, data)
        changed = await self.gate.check_session_write(principal, service, method, session_id, data)
        if service == "sessions":
            await self._check_users_named(principal, data, ("owner_id", "locked_by"))
        if changed is not None:
            # check against the narrower of the two until the write is
            # answered, and drop now who will not see the session then
            self.gate.assume_session(changed)
            try:
                await self._recheck(rooms={f"session:{session_id}"})
            except BaseException:
                self.gate.forget_session(session_id)  # nothing is written
                raise
        cmd = Command(
            principal=principal,
            connection_id=connection_id,
            service=service,
            method=method,
            id=id,
            data=data,
            query=query,
            temp_id=temp_id,
            base_rev=base_rev,
            now_ms=now_ms,
            new_id=new_id,
            idempotency=None if keyed is None else (keyed.key, keyed.call, keyed.digest),
            if_match=if_match,
        )
        return _SessionWrite(f"session:{session_id}", cmd, session_id, changed is not None)

    def _written(self, write: _SessionWrite, result: Any) -> None:
        cmd = write.cmd
        if cmd.service in SESSION_SCOPED and cmd.method == "create" and isinstance(result, dict):
            self._remember(cmd.service, result["id"], write.session_id)

    def _remember(self, service: str, entity_id: str, session_id: str) -> None:
        self._owner_of[(service, entity_id)] = session_id
        if len(self._owner_of) > self._owner_cache_max:
            self._owner_of.popitem(last=False)

    async def _session_of(self, service: str, method: str, id: str | None, data: Any) -> str:
        if method == "create":
            sid = data.get("session_id") if isinstance(data, dict) else None
            if not isinstance(sid, str):
                raise ServiceError("invalid_field", "data.session_id is required")
            return sid
        if id is None:
            raise ServiceError("invalid_field", "id is required")
        cached = self._owner_of.get((service, id))
        if cached is not None:
            return cached
        store = self.store
        row = await self.world.blocking.run(lambda: store.get(service, id))
        if row is None:
            raise ServiceError("not_found", f"no {service[:-1]} {id}")
        self._remember(service, id, row["session_id"])
        return str(row["session_id"])

    async def _stored(self, fn: Callable[[], T]) -> T:
        """``fn`` (a store call) as blocking work; a store error becomes the
        ``ServiceError`` a client is told."""
        try:
            return await self.world.blocking.run(fn)
        except StoreError as exc:
            raise store_error(exc) from None

    async def _read_row(self, table: str, id: str) -> dict[str, Any] | None:
        row = await self._stored(partial(self.store.get, table, id))
        return None if row is None else public(row)

    async def _read(
        self,
        principal: Principal,
        service: str,
        method: str,
        id: str | None,
        query: dict[str, Any] | None,
    ) -> Any:
        """``get`` (``forbidden`` for a record the principal may not see) or
        ``find`` (only what it may see: a page may hold fewer than
        ``$limit`` records; the last has no ``next_cursor``)."""
        store = self.store
        gate = self.gate
        try:
            if method == "get":
                if id is None:
                    raise ServiceError("invalid_field", "id is required")
                row = await self.world.blocking.run(lambda: store.get(service, id))
                if row is None:
                    raise ServiceError("not_found", f"no {service[:-1]} {id}")
                if not await gate.visible(principal, service, row):
                    raise gate.refuse(f"no {service[:-1]} {id} that this user may see")
                return public(row)
            asked, extra = gate.access_query(service, query or {})
            seal = await self._cursor_seal()
            if asked.get("$cursor") is not None:
                asked = {**asked, "$cursor": seal.open(asked["$cursor"])}
            if principal.is_owner:  # every row is the owner's to see: the store's page
                page = await self.world.blocking.run(lambda: store.find(service, asked))
                rows, after = page.items, page.next_cursor
            else:

                async def find(q: dict[str, Any]) -> Page:
                    return await self.world.blocking.run(
                        lambda: store.find(service, q, cursors=True)
                    )

                async def visible(row: dict[str, Any]) -> bool:
                    return await gate.visible(principal, service, row)

                narrow = gate.access_columns(service)
                rows, after = await visible_page(find, asked, visible, narrow=narrow)
        except StoreError as exc:
            raise store_error(exc) from None
        if extra:
            rows = [{k: v for k, v in r.items() if k not in extra} for r in rows]
        next_cursor = None if after is None else seal.seal(after)
        return {"data": [public(r) for r in rows], "next_cursor": next_cursor}

    async def _cursor_seal(self) -> CursorSeal:
        """What seals ``find``'s cursors, under the key the database keeps
        (made on the first ``find`` of the first daemon)."""
        if self._seal is None:
            # 64 bytes, in hex, from the hub's entropy (a stream of its own)
            drawn = self.world.entropy.fork("cursor-key").token(64)
            candidate = hashlib.sha512(drawn.encode("ascii")).hexdigest()
            store = self.store

            def kept() -> str:
                return store.meta_secret(CURSOR_KEY, candidate)

            self._seal = CursorSeal(await self.world.blocking.run(kept))
        return self._seal

    async def _activity(
        self, principal: Principal, method: str, query: dict[str, Any] | None
    ) -> Any:
        """The activity log of a board, newest first: the last entries from
        the board room's memory, older ones from the store."""
        q = parse_activity(method, query)
        if await self.gate.board_level(principal, q.board_id) < Level.READ:
            raise self.gate.refuse(f"no board {q.board_id} that this user may see")
        board, user, actions, before, limit = (
            q.board_id,
            q.user_id,
            q.actions,
            q.before_seq,
            q.limit,
        )
        room = f"board:{board}"
        if before is None:
            ref = self.system.registry.lookup(f"room:{room}")
            if ref is not None:
                recent = await ref.call(ActivityQuery(user, actions, limit))
                if recent is not None:
                    return recent
        store = self.store
        try:
            page = await self.world.blocking.run(
                lambda: store.events_page(
                    room, events=actions, user_id=user, before_seq=before, limit=limit
                )
            )
        except StoreError as exc:
            raise store_error(exc) from None
        return {
            "data": [activity_entry(e) for e in page.items],
            "next_cursor": None if page.next_before_seq is None else str(page.next_before_seq),
        }

    async def _write(self, request: WriteRequest) -> WriteResult:
        """Write ``request``; raises its :class:`ServiceError`, or
        :class:`StoreRepeated` for one whose idempotency key was taken."""
        try:
            result = await self.system.registry.call(WRITER_NAME, Write(request), timeout_s=30.0)
        except StoreRepeated:
            raise
        except StoreError as exc:
            raise store_error(exc) from None
        assert isinstance(result, WriteResult)
        return result

    async def _board_write(self, board_id: str, request: WriteRequest) -> None:
        """Write; a stale revision is a ``conflict`` with the current board."""
        try:
            await self._write(request)
        except ServiceError as exc:
            if exc.code != "conflict":
                raise
            current = await self._read_row("boards", board_id)
            if current is None:
                raise ServiceError("not_found", f"no board {board_id}") from None
            raise ServiceError(
                "conflict",
                f"stale base_rev; the board is at rev {current.get('rev')}",
                {"current": current, "rev": current.get("rev")},
            ) from None

    async def authentication(self, method: str, data: Any) -> Any:
        """The ``authentication`` service (sign in, refresh, sign out):
        needs no principal (see :mod:`agor_actors.identity`)."""
        identity = self.identity
        if identity is None or not identity.tokens.keys.can_sign:
            raise ServiceError("unavailable", "this daemon does not sign people in")
        if method == "create":
            return await identity.create(data)
        if method == "remove":
            return await identity.remove(data)
        raise ServiceError("unknown_method", f"authentication.{method} is not supported")

    async def _users(
        self,
        principal: Principal,
        method: str,
        id: str | None,
        data: Any,
        now_ms: int,
        new_id: str,
    ) -> Any:
        if method == "patch" and id is not None:
            return await self._set_password(principal, id, data)
        if method == "remove" and id is not None:
            return await self._remove_user(id, now_ms)
        given = data.get("current_password") if isinstance(data, dict) else None
        if method == "rotate_token" and id is not None:
            await self.confirm_own(principal, given, to="renew a token")
            return await self._rotate_token(id)
        if method == "create":
            # a user whose token never expires: a sign-in's access token or
            # a cookie alone does not make one (the owner's password too)
            await self.confirm_own(principal, given, to="create a user")
        plan = plan_user(method, data, now_ms, new_id, self.world.entropy.token())
        request = plan.request
        if isinstance(data, dict) and "password" in data:
            password = await self._identity().password_mutation(
                new_id, str(data["name"]), data["password"]
            )
            request = WriteRequest(mutations=(*request.mutations, password))
        await self._write(request)
        return plan.answer

    async def _set_password(self, principal: Principal, user_id: str, data: Any) -> Any:
        """``users.patch`` ``{password}``: the user signs in with its name
        and this password from now on; its refresh tokens are revoked, the
        access tokens and browser sign-ins it had are refused, and the
        connections they opened are closed (``unauthorized``; the caller's
        after its answer).  The user itself names its current password
        (``current_password``) once it has one.  A caller signed in by
        password or a browser, the owner too, names its own password
        (:meth:`confirm_own`): an access token or a cookie alone must not
        buy a password sign-in, which outlives them."""
        if (
            not isinstance(data, dict)
            or "password" not in data
            or not set(data) <= {"password", "current_password"}
        ):
            raise ServiceError(
                "invalid_field", "users.patch takes only data.password (and current_password)"
            )
        user = await self._read_row("users", user_id)
        if user is None:
            raise ServiceError("not_found", "no such record")
        if user.get("removed_at") is not None:
            raise ServiceError("invalid_field", f"user {user_id} was removed")
        identity = self._identity()
        given = data.get("current_password")
        if principal.is_owner or principal.expires_ms is not None or principal.session is not None:
            await self.confirm_own(principal, given, to="change a password")
        else:  # the user's own token: its current password, once it has one
            await identity.check_current_password(user_id, given)
        mutation = await identity.password_mutation(
            user_id, str(user["name"]), data["password"], replace=True
        )
        await self._write(WriteRequest(mutations=(mutation,)))
        await identity.password_changed(user_id)
        await self._close_web_sessions_of(user_id)  # its browsers sign in again
        known = await identity.known_user(user_id)
        generation = None if known is None else known[1]  # None: removed meanwhile
        self._sign_out(SignOut(user_id, _PASSWORD_CHANGED, generation=generation, cookies=True))
        return user

    async def _remove_user(self, user_id: str, now_ms: int) -> Any:
        """``users.remove``: the user signs in no more (its token, password,
        refresh tokens, access tokens and browser cookies are refused from
        now on) and its open connections are closed (``unauthorized``,
        4001).  Its row stays, marked ``removed_at`` (records and history
        name it); removing it again answers the same."""
        user = await self._read_row("users", user_id)
        if user is None:
            raise ServiceError("not_found", "no such record")
        if user.get("is_owner"):
            raise ServiceError("forbidden", "the owner cannot be removed")
        if user.get("removed_at") is None:
            password = await self._stored(partial(self.store.credential, user_id=user_id))
            token = self.world.entropy.token()
            await self._write(plan_user_removal(user_id, now_ms, token, password is not None))
            if self.identity is not None:
                await self.identity.password_changed(user_id)  # its refresh tokens revoked
            await self._close_web_sessions_of(user_id)
            _security_log.warning("user removed", extra={"user_id": user_id})
            user = {**user, "removed_at": now_ms}
        self._user_removed(user_id)
        return user

    async def check_cluster_key(
        self, name: str, check: str, *, path: pathlib.Path, signed: str, replace: bool = False
    ) -> None:
        """On a cluster, raise :class:`NotClusterKeys` unless ``check``, the
        check value of this node's key ``name`` (``web``: the browser
        cookie's) in the file ``path``, is the one the database keeps for
        the cluster (kept if none was, or with ``replace``); ``signed``:
        what the key signs (for the message)."""
        if self.feed is None:
            return
        if not await _agree_on_key(self.world, self.store, name, check, replace=replace):
            raise NotClusterKeys(
                _not_the_clusters(
                    f"{path} is not",
                    signed,
                    f"Copy {path.name} from a node of the cluster into this data dir",
                )
            )

    async def confirm_own(self, principal: Principal, given: Any, *, to: str) -> None:
        """Before a credential that outlives the caller's is made for it (a
        token that never expires, a week-long browser sign-in): a token that
        does not expire (the owner's, a user's own, a program's that embeds
        the daemon) goes on; a caller signed in by password or a browser
        (the owner too) names its password (``given``), since an access
        token or a cookie alone (stolen, or an open tab) must not buy a
        longer one."""
        if principal.expires_ms is None and principal.session is None:
            return
        identity = self.identity
        try:  # (False: the user has no password to name)
            named = identity is not None and await identity.check_current_password(
                principal.user_id, given, to=to
            )
        except StoreError as exc:
            raise store_error(exc) from None
        if not named:
            raise ServiceError(
                "forbidden",
                f"to {to}, use the user's own token, its password"
                " (current_password), or the owner's",
            )

    async def _rotate_token(self, user_id: str) -> Any:
        """``users.rotate_token``: a new token for the user, answered once
        (``{id, name, token}``); the old one is refused from now on here,
        and on the other daemons of a cluster within their access sweep.
        The connections the old token opened are closed (the caller's after
        its answer), here at once and on the other daemons in their sweep.
        The owner's new token is also written to ``<data-dir>/token`` (the
        other nodes of a cluster need a copy of the file to start again);
        the token of a daemon embedded in a program is that program's."""
        user = await self._read_row("users", user_id)
        if user is None:
            raise ServiceError("not_found", "no such record")
        if user.get("removed_at") is not None:
            raise ServiceError("invalid_field", f"user {user_id} was removed")
        token_file = self.owner_token_file
        owner = bool(user.get("is_owner"))
        if owner and token_file is None:
            raise ServiceError(
                "invalid_field",
                "the owner's token was given by the program that embeds the daemon;"
                " that program renews it",
            )
        token = self.world.entropy.token()
        staged = None
        if owner and token_file is not None:  # the file first: a full disk changes nothing
            try:
                staged = await self.world.blocking.run(partial(stage_secret, token_file, token))
            except OSError as exc:
                raise ServiceError(
                    "unavailable", f"cannot write the new token beside {token_file}: {exc}"
                ) from None
        try:
            await self._write(plan_token_rotation(user_id, token))
        except BaseException:
            if staged is not None:
                staged.unlink(missing_ok=True)
            raise
        self._forget_tokens_of(user_id)
        _security_log.warning("user token renewed", extra={"user_id": user_id})
        # the connections the old token opened close (the caller's after its answer)
        self._sign_out(SignOut(user_id, _TOKEN_RENEWED, token_id=own_token_id(hash_token(token))))
        if staged is not None and token_file is not None:
            self.owner_token = token
            try:
                os.replace(staged, token_file)
            except OSError as exc:  # the new token is in force: the file must follow
                log.error("the owner's new token is in %s, not in %s: %s", staged, token_file, exc)
        return {"id": user_id, "name": user["name"], "token": token}

    def _identity(self) -> Authentication:
        if self.identity is None:
            raise ServiceError("unavailable", "this daemon does not sign people in")
        return self.identity

    async def _boards(self, call: BoardCall, keyed: KeyedWrite | None = None) -> Any:
        """A board's write; under an idempotency key (``keyed``), taken in
        its store request (a write sent again answers as the first: with the
        answer it stored, else the board as it is now)."""
        current = None
        if call.method != "create" and call.id is not None:
            current = await self._read_row("boards", call.id)
        plan = plan_board(call, current)
        board_id = call.id or call.new_id
        if call.method == "remove":
            await self._refuse_a_board_with_sessions(board_id)
        added = plan.revoked if call.method == "add_member" else None
        if added is not None and call.method == "add_member":
            await self._refuse_unknown_users([("user_id", added)])
        if keyed is not None:
            once = Once(
                call.principal.user_id,
                keyed.key,
                keyed.call,
                keyed.digest,
                plan.answer,
                call.now_ms,
            )
            plan = attrs.evolve(plan, request=attrs.evolve(plan.request, once=once))
        try:
            if plan.revoked is None:
                await self._board_write(board_id, plan.request)
                self.gate.forget_board(board_id)
            else:
                await self._membership_write(board_id, plan)
        except ServiceError as exc:
            if call.method == "remove" and exc.code == "invalid_data":
                # a session put on the board meanwhile (the key refused it)
                await self._refuse_a_board_with_sessions(board_id)
            raise
        except StoreRepeated as exc:  # only a request with ``once``
            assert keyed is not None
            answer = repeated_answer(keyed.call, keyed.digest, exc)
            if answer is not None:
                return answer
            return replayed(await self._read(call.principal, "boards", "get", board_id, None))
        if plan.answer is not None:
            return plan.answer
        return await self._read(call.principal, "boards", "get", board_id, None)

    async def _check_users_named(
        self, principal: Principal, data: Any, fields: tuple[str, ...]
    ) -> None:
        """``invalid_field`` if a field of ``data``, or a session's
        ``permissions`` (its ``collaborators`` and ``viewers``), names a
        user that does not exist or was removed (the store's key would
        refuse the first with no word of which field, and take the second; a
        mistyped id in a permission granted nothing, and said nothing); the
        caller itself (a lock taken for oneself) is not read again."""
        if not isinstance(data, dict):
            return
        named = [
            (field, user_id)
            for field in fields
            if isinstance(user_id := data.get(field), str) and user_id  # (none: unset)
        ]
        permissions = data.get("permissions")
        if isinstance(permissions, dict):
            for key in ("collaborators", "viewers"):
                users = permissions.get(key)
                if isinstance(users, list):  # (of strings: the gate checked)
                    named += [(f"permissions.{key}", user_id) for user_id in users]
        await self._refuse_unknown_users(
            [(field, user_id) for field, user_id in named if user_id != principal.user_id]
        )

    async def _refuse_unknown_users(self, named: list[tuple[str, str]]) -> None:
        """``invalid_field`` for the first ``(field, user_id)`` of ``named``
        whose user does not exist or was removed (named here: the store's
        refusal says only that the data does not fit); the users are read by
        the page, not one by one."""
        wanted = sorted({user_id for _, user_id in named})
        store = self.store
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(wanted), MAX_LIMIT):
            part = wanted[start : start + MAX_LIMIT]
            query = {"id": {"$in": part}, "$select": ["id", "removed_at"], "$limit": len(part)}
            page = await self._stored(lambda q=query: store.find("users", q))  # type: ignore[misc]
            found.update((str(row["id"]), row) for row in page.items)
        for field, user_id in named:
            row = found.get(user_id)
            if row is None:
                raise ServiceError("invalid_field", f"data.{field}: no user {user_id}")
            if row.get("removed_at") is not None:
                raise ServiceError("invalid_field", f"data.{field}: user {user_id} was removed")

    async def _refuse_a_board_with_sessions(self, board_id: str) -> None:
        """``conflict`` if sessions are on the board: removing it would
        leave them on none (the store refuses it), and they are work too
        valuable to remove with it."""
        store = self.store
        query = {"board_id": board_id, "$limit": 0, "$total": True}
        page = await self._stored(lambda: store.find("sessions", query))
        if page.total:
            raise ServiceError(
                "conflict",
                f"board {board_id} still holds {page.total} session(s): move them to "
                "another board (sessions.patch board_id) or remove them first",
                {"sessions": page.total},
            )

    async def _membership_write(self, board_id: str, plan: BoardPlan) -> None:
        """A member added, narrowed or removed.  Until the write is durable
        the gate holds the narrower of the two memberships, and who loses
        sight of a room is sent ``left`` at once; once it is durable (or
        failed) the gate reads the board again and checks once more (a join
        that raced the write)."""
        user = plan.revoked
        assert user is not None
        board = await self.gate.board(board_id)
        if board is not None and board.members.get(user) is not None:
            self.gate.assume_board(
                board.with_role(user, narrower_role(board.members[user], plan.role))
            )
            await self._recheck(users={user})
        try:
            await self._board_write(board_id, plan.request)
        finally:
            self.gate.forget_board(board_id)
            await self._recheck(users={user})

    # ------------------------------------------------------------------ rooms

    def connect(self, principal: Principal, connection_id: str) -> None:
        """A connection of ``principal`` was welcomed: ``too_many_connections``
        past the user's cap (the local owner has none)."""
        self._principals[connection_id] = principal
        if principal.is_owner:
            return
        mine = self._connections_of.setdefault(principal.user_id, set())
        if len(mine) >= self.limits.connections:
            if not mine:
                del self._connections_of[principal.user_id]
            del self._principals[connection_id]
            raise ServiceError(
                "too_many_connections",
                f"this user has {len(mine)} connections open (at most {self.limits.connections})",
            )
        mine.add(connection_id)

    async def join(
        self,
        principal: Principal,
        connection_id: str,
        outbox: Outbox,
        room: str,
        since: Since | None,
    ) -> None:
        """Subscribe a connection to ``room``.  Queues ``joined`` and any
        replay into ``outbox`` in order; live events follow.  A gap older
        than the room's memory is replayed from the log here, at the pace the
        client reads.  The room must exist and the principal see it now (a
        resume is checked again); a room that does not exist and one it may
        not see get the same ``forbidden``, and nothing is spawned for
        either."""
        kind, _, ident = room.partition(":")
        if kind not in ("session", "board", "activity") or not ident:
            raise ServiceError(
                "bad_request",
                f"no room {room!r}: rooms are session:<id>, board:<id> and activity:<board id>",
            )
        refused = ServiceError("forbidden", f"no room {room!r} that this user may see")
        rechecks = self._rechecks
        # a cluster node reads access from the store for a join: another
        # daemon may have changed it in a room this one was not told about
        from_store = self.feed is not None
        try:
            if not await self.gate.may_see_room(principal, room, fresh=from_store):
                raise refused
            await self.authorizer.authorize(principal, "join", room)
        except ServiceError as exc:
            if exc.code == "unavailable":
                # the store could not say (whether the room exists, or who
                # may see it): the same answer for every room it would read
                raise
            # the same answer for a room that does not exist
            self.gate.denials += 1
            _security_log.info(
                "join refused",
                extra={"connection_id": connection_id, "user_id": principal.user_id, "room": room},
            )
            raise refused from None
        self._principals.setdefault(connection_id, principal)
        subs = self._subs.setdefault(connection_id, {})
        if room not in subs and not principal.is_owner:
            joined = sum(
                len(self._subs.get(c, ()))
                for c in self._connections_of.get(principal.user_id, (connection_id,))
            )
            if joined >= self.limits.rooms:
                raise ServiceError(
                    "too_many_subscriptions",
                    f"this user is in {joined} rooms (at most {self.limits.rooms})",
                )
        activity = kind == "activity"
        if activity:
            mark("hub.activity_join")
        sub = Subscription(
            connection_id, room, outbox, user_id=principal.user_id, activity=activity
        )
        self._keep_sub(sub)
        self._joining.add(sub.key)
        if self._rechecks != rechecks and not await self.gate.may_see_room(
            principal, room, fresh=from_store
        ):
            # access changed while the join was being checked, before the
            # recheck could see it: asked again, now that a recheck would
            self._joining.discard(sub.key)
            if subs.get(room) is sub:
                self._forget_sub(connection_id, room)
            self.gate.denials += 1
            raise refused
        try:
            fresh = False
            if self.feed is not None:
                fresh = await self.feed.watch(_room_actor(room)[1], connection_id, sub.key)
            try:
                turned_away = await self._subscribe(sub, since)
            except BaseException as exc:
                self._unwatch(sub)
                unavailable = _store_away(exc)
                if unavailable is None:
                    raise
                # the room's head or log is in the store, which is away: the
                # join is answered ``left`` ``unavailable`` (the client may
                # join again), and nothing of it stays
                log.warning(
                    "a join could not read the store: %s",
                    exc,
                    extra={"connection_id": connection_id, "room": room},
                )
                if subs.get(room) is sub:
                    self._forget_sub(connection_id, room)
                with contextlib.suppress(OutboxClosed):
                    outbox.drop_room(room)
                raise unavailable from None
            if kind == "board" and self._forgotten_boards.pop(ident, False) is None:
                self._republish(ident)
            if fresh:
                # the room may have missed what was published before its
                # channel was subscribed (or started meanwhile): it reads its log
                ref = self.system.registry.lookup(_room_actor(room)[0])
                if ref is not None and not ref.try_send(Resync()):
                    await ref.send(Resync())
        finally:
            self._joining.discard(sub.key)
            self._lost_joins.discard(sub.key)
            reason = self._revoked.pop(sub.key, None)
        if reason is not None and not turned_away:
            # revoked while joining: the room may have taken it meanwhile
            await self._drop(sub, reason)

    async def _subscribe(self, sub: Subscription, since: Since | None) -> bool:
        """Join ``sub`` to its room (from the log first if the room's memory
        does not reach back to ``since``).  True: the room refused it, its
        user having lost sight of the room meanwhile (``left`` is queued)."""
        room, outbox = sub.room, sub.outbox
        subs = self._subs[sub.connection_id]
        actor, log_room = _room_actor(room)
        registry = self.system.registry

        async def still_wanted() -> None:
            # the room had to start (or start again): what the join's check
            # saw may be old by now (another daemon's revocation this one
            # has not heard of yet): asked again, as fresh as the join's
            principal = self._principals.get(sub.connection_id)
            if sub.key in self._revoked or (
                principal is not None
                and not await self.gate.may_see_room(principal, room, fresh=self.feed is not None)
            ):
                self._revoked.setdefault(sub.key, "forbidden")
                raise _JoinRevoked()

        try:
            result = await registry.call(
                actor, Subscribe(sub, since), timeout_s=30.0, guard=still_wanted
            )
        except _JoinRevoked:
            # revoked while the room was being reached (restarting, with its
            # memory of revoked joins): nothing of the room, not even
            # ``joined``, follows the revocation (simulator, cluster seed 261)
            if subs.get(room) is sub:
                self._forget_sub(sub.connection_id, room)
                self._unwatch(sub)
            with contextlib.suppress(OutboxClosed, OutboxOverflow):
                outbox.drop_room(room)
                outbox.offer_control(Left(room=room, reason=self._revoked[sub.key]))
            return True
        if not isinstance(result, CatchUp):
            if sub.key in self._lost_joins and result != "revoked":
                await self._join_lost(sub)
            return bool(result == "revoked")
        assert since is not None
        after = since.seq
        store = self.store
        page_size = max(1, min(500, outbox.max_messages // 2))
        # the first page before ``joined``: a store that is away makes the
        # join's answer ``left`` alone
        first: list[StoredEvent] | None = await self.world.blocking.run(
            lambda: store.events_since(log_room, after, page_size)
        )
        outbox.offer_control(Joined(room=room, epoch=result.epoch, seq=result.head, recovered=True))
        outbox.open_room(room, since.seq)
        if sub.key in self._lost_joins:
            await self._join_lost(sub)
            return False
        try:
            while True:
                if first is not None:
                    page, first = first, None
                else:
                    page = await self.world.blocking.run(
                        lambda a=after: store.events_since(log_room, a, page_size)  # type: ignore[misc]
                    )
                change = False
                if self.feed is not None:
                    # a cluster node replays the log as its rooms deliver:
                    # nothing past an event that changes access before its check
                    page, change = _until_access_change(page)
                items = [(e.seq, encode(outbox.codec, to_event(e, room))) for e in page]
                ends = {e.seq: e.end_seq for e in page}
                for chunk in _within(items, page_size, outbox.max_bytes // 2):
                    await outbox.wait_room(len(chunk), sum(len(item) for _, item in chunk))
                    if subs.get(room) is not sub:
                        return False  # left or revoked meanwhile
                    if not outbox.offer_events(room, chunk, upto=ends[chunk[-1][0]]):
                        return False  # lagged: the client resumes later
                if page:
                    after = page[-1].end_seq
                if change and not await self._checked_in_join(sub):
                    return False
                if subs.get(room) is not sub:
                    return False
                result = await registry.call(
                    actor,
                    Subscribe(sub, Since(result.epoch, after), quiet=True),
                    timeout_s=30.0,
                )
                if not isinstance(result, CatchUp):
                    return bool(result == "revoked")
        except OutboxClosed:
            return False

    async def _checked_in_join(self, sub: Subscription) -> bool:
        """A cluster node's join replayed an event of the log that changes
        access: its user's sight of the room is read again from the store
        before anything past it is offered (the room checks its own
        subscribers when it takes the event).  False: the join ends, with
        ``left`` ``forbidden`` if its user lost sight, or ``lagged`` (it
        joins again later) if the store could not say."""
        principal = self._principals.get(sub.connection_id)
        subs = self._subs.get(sub.connection_id, {})
        try:
            visible = principal is not None and await self.gate.may_see_room(
                principal, sub.room, fresh=True
            )
        except ServiceError as exc:
            log.warning("a join's access check failed: %s", exc)
            if subs.get(sub.room) is sub:
                self._forget_sub(sub.connection_id, sub.room)
                self._unwatch(sub)
                with contextlib.suppress(OutboxClosed, OutboxOverflow):
                    sub.outbox.room_lost(sub.room)
            return False
        if visible:
            return True
        if subs.get(sub.room) is sub:
            self._forget_sub(sub.connection_id, sub.room)
            self._unwatch(sub)
            self.revocations += 1
            self._revoked[sub.key] = "forbidden"  # the join ends it
            _security_log.info(
                "subscription revoked",
                extra={
                    "connection_id": sub.connection_id,
                    "user_id": sub.user_id,
                    "room": sub.room,
                },
            )
        return False

    async def _join_lost(self, sub: Subscription) -> None:
        """``sub``'s room actor ended while its Subscribe was on its way, and
        the hub forgot it (its ``lagged`` could not be queued: nothing was
        offered yet).  Whichever incarnation answered, the client has its
        ``joined`` by now: it is told ``lagged`` from where the join started,
        so that it joins again, and a new incarnation that took the
        subscription lets it go (the hub no longer knows it)."""
        self._lost_joins.discard(sub.key)
        ref = self.system.registry.lookup(_room_actor(sub.room)[0])
        if ref is not None:
            with contextlib.suppress(ActorDead):
                await ref.send(Unsubscribe(sub.key))
        with contextlib.suppress(OutboxClosed, OutboxOverflow):
            sub.outbox.room_lost(sub.room)

    # ------------------------------------------------------------ revocation

    def _recheck_soon(
        self,
        *,
        users: set[str] | None = None,
        rooms: set[str] | None = None,
        everyone: bool = False,
    ) -> None:
        """:meth:`_recheck` in the hub's own task (from a synchronous
        answer).  Requests coalesce: at most one set of users and rooms
        waits (overflow policy: merge; ``everyone`` covers them all)."""
        self._recheck_users |= users or set()
        self._recheck_rooms |= rooms or set()
        self._recheck_everyone |= everyone
        self._recheck_wanted.set()

    async def _key_sweeper(self) -> None:
        """Drop the idempotency keys older than :attr:`keys_kept_s`, and the
        refresh tokens and browser sign-ins that have expired, every
        :attr:`keys_sweep_s` (in passes of a bounded size; a failure is
        logged and tried again next time)."""
        store, world = self.store, self.world
        while True:
            await trio.sleep(self.keys_sweep_s)
            now_ms = world.wall.now_ms()
            before_ms = now_ms - int(self.keys_kept_s * 1000)
            try:
                while await world.blocking.run(partial(store.forget_keys, before_ms)) >= 10_000:
                    pass
                for forget in (store.forget_refresh_tokens, store.forget_web_sessions):
                    while await world.blocking.run(partial(forget, now_ms)) >= 10_000:
                        pass
            except StoreError as exc:
                log.warning("dropping old keys, refresh tokens or sign-ins failed: %s", exc)

    async def _rechecker(self) -> None:
        while True:
            await self._recheck_wanted.wait()
            self._recheck_wanted = trio.Event()
            users, self._recheck_users = self._recheck_users, set()
            rooms, self._recheck_rooms = self._recheck_rooms, set()
            everyone, self._recheck_everyone = self._recheck_everyone, False
            try:
                if everyone:
                    await self._recheck()
                else:
                    await self._recheck(users=users or None, rooms=rooms or None)
            except Exception:
                log.exception("checking the subscriptions again failed")

    def access_check(self, event: StoredEvent) -> Callable[[], Awaitable[None]] | None:
        """A cluster node's rooms show it every event they take (another
        daemon's through the broker, their own writer's, or read from the
        log): for one that changes access, the check its room runs before
        it delivers anything past it.  As the daemon that wrote it did: the
        gate forgets the session or board, and the subscriptions of the
        users or rooms it concerns are checked again (who lost sight is sent
        ``left`` ``forbidden`` by the room, in its order).

        The room pauses its deliveries at the event until the check ended
        (a failed check runs again), so none is lost while the room lives;
        a room that crashed makes the hub forget what it read and recheck
        everything (:meth:`_on_actor_exit`); what no room of this daemon is
        shown (a member removed from a board whose room nobody here joined,
        who watches a session on it) is caught by the sweep every
        :attr:`access_sweep_s`, and joins read access from the store."""
        change = access_change(event.event, event.data)
        return None if change is None else partial(self._access_changed, change, event.room)

    async def _access_changed(self, change: AccessChange, room: str | None = None) -> None:
        # the record is read again now, so that a join while the store is
        # away is refused from what it became, not answered unavailable (a
        # write of this daemon in flight rechecks once it is answered)
        if change.session_id is not None:
            self.gate.forget_session(change.session_id)
            await self.gate.session(change.session_id)
        if change.board_id is not None:
            self.gate.forget_board(change.board_id)
            await self.gate.board(change.board_id)
        if change.users or change.rooms:
            await self._recheck(users=set(change.users) or None, rooms=set(change.rooms) or None)
        if room is not None:
            # another recheck may be dropping a subscription of the paused
            # room (it found it first: this one passed it by): the room goes
            # on only once it was told (the simulator's cluster seed 9465:
            # an event delivered to a revoked guest ahead of its ``left``)
            while self._drops.get(room):
                await self._drops_done.park()

    async def _gap_check(self) -> None:
        """The feed's subscription connection is back: what the other
        daemons published meanwhile never arrived, access changes of any
        room included, and the rooms are about to read it from their logs,
        each on its own (a session room could deliver past a board's
        member removal its board room has not read yet).  So first the gate
        forgets what it read and every subscription is checked against the
        store (raises while the store is away: the feed holds everything
        and tries again)."""
        self.gate.forget_loaded()
        await self._recheck()

    async def _sweeper(self) -> None:
        """A cluster node's fallback: every :attr:`access_sweep_s` the gate
        forgets what it read, and every subscription is checked again; every
        :attr:`access_sweep_cut_s` while the broker's subscription is down.
        (A member removed through another daemon while this one is cut off
        from the broker went on getting what this daemon's own writer wrote
        to the session until the broker was back, or the 30 s sweep.)  Users
        removed through another daemon are looked for then too."""
        waited_s = 0.0
        while True:
            await trio.sleep(self.access_sweep_cut_s)
            waited_s += self.access_sweep_cut_s
            feed = self.feed
            cut = feed is not None and not feed.connected.is_set()
            if not cut and waited_s < self.access_sweep_s:
                continue
            waited_s = 0.0
            self.gate.forget_loaded()
            self._recheck_soon(everyone=True)
            await self._find_removed()

    async def _recheck(
        self, *, users: set[str] | None = None, rooms: set[str] | None = None
    ) -> None:
        """Check again the subscriptions of ``users`` (or to ``rooms``)
        against the permissions as the gate knows them now, and drop each
        one that fails, with ``left`` ``forbidden``."""
        self._rechecks += 1
        for connection_id, subs in list(self._subs.items()):
            principal = self._principals.get(connection_id)
            if principal is None or (users is not None and principal.user_id not in users):
                continue
            for room, sub in list(subs.items()):
                if rooms is not None and _room_actor(room)[1] not in rooms and room not in rooms:
                    continue
                if await self.gate.may_see_room(principal, room):
                    continue
                if subs.get(room) is not sub:
                    continue  # left meanwhile
                self._forget_sub(connection_id, room)
                self._drops[room] = self._drops.get(room, 0) + 1
                try:
                    await self._revoke(connection_id, principal, room, sub)
                finally:
                    left = self._drops[room] - 1
                    if left:
                        self._drops[room] = left
                    else:
                        del self._drops[room]
                    self._drops_done.unpark_all()

    async def _revoke(
        self, connection_id: str, principal: Principal, room: str, sub: Subscription
    ) -> None:
        """Tell ``sub``'s room (forgotten here) that it is revoked."""
        self._unwatch(sub)
        _security_log.info(
            "subscription revoked",
            extra={
                "connection_id": connection_id,
                "user_id": principal.user_id,
                "room": room,
            },
        )
        self.revocations += 1
        if sub.key in self._joining:
            self._revoked[sub.key] = "forbidden"  # the join ends it
            # and the room refuses it if its join is still on the
            # way: nothing of the room, not even ``joined``, follows
            # the revocation.  A room that is not there now (not
            # started yet, or restarting) is neither started nor
            # waited for: the join's guard sees the revocation
            ref = self.system.registry.lookup(_room_actor(room)[0])
            if ref is not None:
                with contextlib.suppress(ActorDead):
                    await ref.call(Revoke(sub.key, "forbidden", ahead=True), timeout_s=30.0)
        else:
            await self._drop(sub, "forbidden")

    async def _drop(self, sub: Subscription, reason: str) -> None:
        """Take ``sub`` out of its room and tell its connection ``left``
        ``reason``: from the room itself, so that nothing of the room
        follows it; or from here if the room did not have it."""
        ref = self.system.registry.lookup(_room_actor(sub.room)[0])
        dropped = False
        if ref is not None:
            dropped = bool(await ref.call(Revoke(sub.key, reason), timeout_s=30.0))
        if not dropped:
            with contextlib.suppress(OutboxClosed, OutboxOverflow):
                sub.outbox.drop_room(sub.room)
                sub.outbox.offer_control(Left(room=sub.room, reason=reason))

    async def leave(self, connection_id: str, room: str) -> None:
        sub = self._forget_sub(connection_id, room)
        if sub is None:
            return
        self._unwatch(sub)
        sub.outbox.drop_room(room)
        ref = self.system.registry.lookup(_room_actor(room)[0])
        if ref is not None:
            await ref.send(Unsubscribe(sub.key))
        present = self._presence_of.get(connection_id)
        if present is not None and room.startswith("board:"):
            # leaving the board's room takes the connection off its facepile
            gone = PresenceTouch(
                connection_id, present.user_id, present.name, PresenceUpdate(board="")
            )
            presence_ref = self.system.registry.lookup(f"presence:user:{present.user_id}")
            if presence_ref is not None and not presence_ref.try_send(gone):
                await presence_ref.send(gone)

    async def disconnect(self, connection_id: str) -> None:
        for room in list(self._subs.get(connection_id, {})):
            await self.leave(connection_id, room)
        for room in list(self._subs.get(connection_id, {})):
            self._forget_sub(connection_id, room)  # joined while leaving the others
        self._subs.pop(connection_id, None)
        if self.feed is not None:
            self.feed.forget(connection_id)
        principal = self._principals.pop(connection_id, None)
        if principal is not None:
            mine = self._connections_of.get(principal.user_id)
            if mine is not None:
                mine.discard(connection_id)
                if not mine:
                    del self._connections_of[principal.user_id]
        self._presence_last.pop(connection_id, None)
        self._presence_unchecked.pop(connection_id, None)
        present = self._presence_of.pop(connection_id, None)
        if present is not None:
            await self.system.registry.send(
                f"presence:user:{present.user_id}", PresenceGone(connection_id)
            )

    async def presence(
        self, principal: Principal, connection_id: str, update: PresenceUpdate
    ) -> None:
        """A connection's presence update.  Lossy: dropped (and counted) when
        the user's presence actor is busy, since the next one replaces it.

        One whose board cannot be checked now (the store away, the board
        not in the gate's memory) is kept, not refused: a client sends its
        presence once (after each welcome, then its changes), so refused it
        was lost until the user's next change, and the user missing from
        every facepile of the board for good (cluster seed 7243).  It is
        checked again every second, and applied once the check passes;
        updates of the same board that follow it are merged into it
        meanwhile (one kept per connection: latest wins)."""
        unchecked = self._presence_unchecked.get(connection_id)
        if unchecked is not None:
            if update.board in (None, unchecked[1].board):
                self._presence_unchecked[connection_id] = (principal, _merged(unchecked[1], update))
                return
            del self._presence_unchecked[connection_id]  # another board (or none) now
        if update.board is not None and update.board:
            await self.authorizer.authorize(principal, "presence", f"board:{update.board}")
            try:  # (the owner's too: a board that is not would start a room actor)
                visible = await self.gate.may_see_room(principal, f"board:{update.board}")
            except ServiceError as exc:
                if exc.code != "unavailable":
                    raise
                self._presence_unchecked[connection_id] = (principal, update)
                if not self._presence_checking:
                    self._presence_checking = True
                    self._tasks.start_soon(self._check_presence_again)
                return
            if not visible:
                raise self.gate.refuse(f"no board {update.board} that this user may see")
        self._presence_of[connection_id] = principal
        last = self._presence_last.get(connection_id)
        if last is not None and update.board in (None, last.board):
            self._presence_last[connection_id] = _merged(last, update)
        else:
            self._presence_last[connection_id] = update
        ref = await self.system.registry.get(f"presence:user:{principal.user_id}")
        if not ref.try_send(
            PresenceTouch(connection_id, principal.user_id, principal.name, update)
        ):
            self.presence_dropped += 1

    async def _check_presence_again(self) -> None:
        """Every second, the presence updates kept unchecked: applied once
        their board can be checked, dropped if the user may not see it."""
        try:
            while self._presence_unchecked:
                await trio.sleep(1.0)
                for connection_id, (principal, update) in list(self._presence_unchecked.items()):
                    if self._presence_unchecked.get(connection_id) != (principal, update):
                        continue  # replaced or gone meanwhile
                    assert update.board
                    try:
                        await self.gate.may_see_room(principal, f"board:{update.board}")
                    except ServiceError as exc:
                        if exc.code == "unavailable":
                            continue  # still away
                    if self._presence_unchecked.get(connection_id) != (principal, update):
                        continue
                    del self._presence_unchecked[connection_id]
                    try:
                        await self.presence(principal, connection_id, update)
                    except ServiceError as exc:
                        log.info(
                            "a presence update kept unchecked was refused: %s",
                            exc,
                            extra={"connection_id": connection_id},
                        )
        finally:
            self._presence_checking = False

    def _keep_sub(self, sub: Subscription) -> None:
        """Record ``sub`` as its connection's subscription to its room."""
        self._subs.setdefault(sub.connection_id, {})[sub.room] = sub
        actor = _room_actor(sub.room)[0]
        self._by_actor.setdefault(actor, {})[(sub.connection_id, sub.room)] = None

    def _forget_sub(self, connection_id: str, room: str) -> Subscription | None:
        """Take the connection's subscription to ``room`` out of the
        records; the subscription, or None if there was none."""
        subs = self._subs.get(connection_id)
        sub = subs.pop(room, None) if subs else None
        if sub is not None:
            actor = _room_actor(room)[0]
            served = self._by_actor.get(actor)
            if served is not None:
                served.pop((connection_id, room), None)
                if not served:
                    del self._by_actor[actor]
        return sub

    def _unwatch(self, sub: Subscription) -> None:
        if self.feed is not None:
            self.feed.unwatch(_room_actor(sub.room)[1], sub.connection_id, sub.key)

    def rooms_of(self, connection_id: str) -> list[str]:
        return list(self._subs.get(connection_id, {}))

    # ------------------------------------------------------------------ admin

    def snapshot(self) -> dict[str, Any]:
        return self.system.snapshot().to_json()

    def _scraped(self) -> Iterator[Metric]:
        """What the metrics read at each scrape: actors by kind, rooms and
        their subscribers, mailbox depths (the fullest ones by name)."""
        actors = GaugeMetricFamily("agor_actors", "Live actors by kind", labels=["kind"])
        depth = GaugeMetricFamily(
            "agor_mailbox_depth_max", "The fullest mailbox of each kind", labels=["kind"]
        )
        fullest = GaugeMetricFamily(
            "agor_mailbox_fullest",
            "Depth of the 5 fullest mailboxes, by actor",
            labels=["actor"],
        )
        subscribers = GaugeMetricFamily(
            "agor_room_subscribers", "Subscribers of every live room, summed"
        )
        kinds: dict[str, int] = {}
        deepest: dict[str, int] = {}
        stats = []
        for st in self.system.registry.statistics():
            if not st.alive:
                continue
            kind = st.name.partition(":")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
            deepest[kind] = max(deepest.get(kind, 0), st.mailbox_depth)
            stats.append((st.mailbox_depth, st.name))
        for kind, count in sorted(kinds.items()):
            actors.add_metric([kind], count)
            depth.add_metric([kind], deepest[kind])
        for count, name in sorted(stats, reverse=True)[:5]:
            fullest.add_metric([name], count)
        subscribers.add_metric([], sum(len(subs) for subs in self._subs.values()))
        dropped = CounterMetricFamily(
            "agor_presence_dropped", "Presence updates dropped (a full presence mailbox)"
        )
        dropped.add_metric([], self.presence_dropped)
        denied = CounterMetricFamily(
            "agor_permission_denials", "Calls, joins and presence refused with forbidden"
        )
        denied.add_metric([], self.gate.denials)
        revoked = CounterMetricFamily(
            "agor_revocations", "Subscriptions dropped because their user lost sight of the room"
        )
        revoked.add_metric([], self.revocations)
        yield from (actors, depth, fullest, subscribers, dropped, denied, revoked)

    async def drain(self) -> None:
        """Wait until every write queued so far is durable."""
        mark("hub.drain")
        await self.system.registry.call(WRITER_NAME, Write(WriteRequest()), timeout_s=60.0)


def _nothing() -> None:
    return None


def _within(
    items: list[tuple[int, Any]], max_count: int, max_bytes: int
) -> list[list[tuple[int, Any]]]:
    """``items`` cut into runs of at most ``max_count`` items and
    ``max_bytes`` bytes (a run holds at least one item)."""
    runs: list[list[tuple[int, Any]]] = []
    run: list[tuple[int, Any]] = []
    size = 0
    for item in items:
        if run and (len(run) >= max_count or size + len(item[1]) > max_bytes):
            runs.append(run)
            run, size = [], 0
        run.append(item)
        size += len(item[1])
    if run:
        runs.append(run)
    return runs


def _until_access_change(page: list[StoredEvent]) -> tuple[list[StoredEvent], bool]:
    """``page`` up to and with its first event that changes access, and
    whether it has one."""
    for i, event in enumerate(page):
        if access_change(event.event, event.data) is not None:
            return page[: i + 1], True
    return page, False


def _room_actor(room: str) -> tuple[str, str]:
    """The room actor serving ``room`` and the log it reads: an
    ``activity:<board>`` stream is a projection of the board room."""
    kind, _, ident = room.partition(":")
    if kind == "activity":
        return f"room:board:{ident}", f"board:{ident}"
    return f"room:{room}", room


@asynccontextmanager
async def open_hub(
    world: World,
    *,
    db_url: str | None = None,
    data_dir: pathlib.Path | None = None,
    authorizer: Authorizer | None = None,
    owner_token: str | None = None,
    store: SqlStore | None = None,
    presence: PresenceConfig | None = None,
    identity: IdentityConfig | None = None,
    ring_size: int | None = None,
    idle_s: float | None = None,
    limits: UserLimits | None = None,
    broker_url: str | None = None,
    commit_linger_s: float = 0.0,
    broker: BrokerLink | None = None,
    restart_intensity: Intensity | None = None,
    new_keys: bool = False,
) -> AsyncIterator[Hub]:
    """Open the store (SQLite at ``<data_dir>/agor.db`` unless ``db_url``),
    make sure the owner exists with the token in ``<data_dir>/token``, and
    run the actors until the block exits (then drain and stop in order).
    A ``store`` passed in is used as is and left open (the simulator keeps
    one in-memory database across daemon crashes).  A ``data_dir`` is made
    private (0700, files 0600) and locked for the block:
    :class:`DataDirLocked` if another runtime holds it.  ``ring_size`` (a
    room's events in memory) and ``idle_s`` (how long a room or session
    actor idles before it passivates) replace the behaviours' own (the
    simulator makes them small so that runs of seconds reach those paths).

    ``broker_url`` (``redis://...``; ``postgresql://...``: LISTEN/NOTIFY)
    makes this daemon a cluster node: its store is shared with the other
    daemons on the same database (seqs are
    taken under the rooms' row locks), it publishes what it commits, and
    its rooms take the other daemons' commits for the rooms its clients
    joined; its board rooms show the other daemons' users there too
    (``presence`` sets the heartbeat and the liveness timeout).  A
    ``broker`` link passed in (the simulator's) is used instead of one to
    ``broker_url``, and makes a cluster node the same way.

    ``commit_linger_s``: how long a busy store writer waits for more writes
    before committing a group (see :class:`~agor_actors.store.StoreWriter`;
    0, the default here, commits at once; ``serve`` waits 2 ms).

    ``restart_intensity``: how many actor restarts in how long the
    registry's supervisor allows before it gives up and every actor starts
    over (the simulator makes it small so that runs reach that path).

    A cluster node whose access-token keys are kept (``<data_dir>/jwt-secret``
    or a key pair) raises :class:`NotClusterKeys` unless they are the other
    nodes' (the database keeps their check value); ``new_keys``: this
    node's keys become the cluster's (after changing every node's on purpose)."""
    with contextlib.ExitStack() as held:
        if data_dir is not None:
            held.enter_context(hold_data_dir(data_dir))
        async with _open_hub(
            world,
            db_url=db_url,
            data_dir=data_dir,
            authorizer=authorizer,
            owner_token=owner_token,
            store=store,
            presence=presence,
            identity=identity,
            ring_size=ring_size,
            idle_s=idle_s,
            limits=limits,
            broker_url=broker_url,
            commit_linger_s=commit_linger_s,
            broker=broker,
            restart_intensity=restart_intensity,
            new_keys=new_keys,
        ) as hub:
            yield hub


@asynccontextmanager
async def _open_hub(
    world: World,
    *,
    db_url: str | None,
    data_dir: pathlib.Path | None,
    authorizer: Authorizer | None,
    owner_token: str | None,
    store: SqlStore | None,
    presence: PresenceConfig | None,
    identity: IdentityConfig | None = None,
    ring_size: int | None = None,
    idle_s: float | None = None,
    limits: UserLimits | None = None,
    broker_url: str | None = None,
    commit_linger_s: float = 0.0,
    broker: BrokerLink | None = None,
    restart_intensity: Intensity | None = None,
    new_keys: bool = False,
) -> AsyncIterator[Hub]:
    own_store = store is None
    cluster = broker_url is not None or broker is not None
    if broker is None and broker_url is not None:
        broker_kind(broker_url)  # an unknown scheme: ValueError before anything opens
    if store is None:
        if db_url is None:
            if data_dir is None:
                raise ValueError("give db_url, data_dir or store")
            data_dir.mkdir(parents=True, exist_ok=True)
            db_url = f"sqlite:///{data_dir / 'agor.db'}"
        url = db_url

        def new_epoch() -> str:
            return world.entropy.new_id(world.wall.now_ms())

        store = await world.blocking.run(
            lambda: open_store(url, new_epoch=new_epoch, shared=cluster)
        )
    token_file = None
    try:
        if owner_token is None:
            if data_dir is None:
                token = world.entropy.token()
            else:
                directory = data_dir
                token = await world.blocking.run(
                    lambda: read_or_create_token(directory, world.entropy)
                )
                token_file = data_dir / TOKEN_FILE
        else:
            token = owner_token
        owner_row = {
            "name": "owner",
            "token_hash": hash_token(token),
            "is_owner": True,
            "created_at": world.wall.now_ms(),
        }
        existing = await world.blocking.run(lambda: store.get("users", OWNER_ID))
        op: Literal["insert", "update"] = "update" if existing is not None else "insert"
        token_hash = str(owner_row["token_hash"])
        current = await world.blocking.run(lambda: store.user_by_token_hash(token_hash))
        # (rows never show token_hash: look the owner up by the hash instead)
        if cluster and existing is not None and (current is None or current["id"] != OWNER_ID):
            where = f"{data_dir / 'token'}" if data_dir is not None else "the owner token"
            raise NotClusterOwner(
                f"{where} is not the owner token of the cluster's database: copy the"
                " token file (and jwt-secret, web-secret) of a node of the cluster into this"
                " data dir"
            )
        if current is None or current["id"] != OWNER_ID:
            values = owner_row if op == "insert" else {"token_hash": owner_row["token_hash"]}
            results = await world.blocking.run(
                lambda: store.commit(
                    [WriteRequest(mutations=(Mutation(op, "users", {"id": OWNER_ID}, values),))]
                )
            )
            if isinstance(results[0], StoreError):
                # a cluster node started with another on an empty database:
                # that one inserted the owner first (the same token)
                again = await world.blocking.run(lambda: store.user_by_token_hash(token_hash))
                if not (cluster and again is not None and again["id"] == OWNER_ID):
                    raise results[0]

        metrics = Metrics()
        node = world.entropy.new_id(world.wall.now_ms())
        """This daemon among the cluster's (it skips its own broadcasts)."""
        opened = contextlib.AsyncExitStack()
        link = broker
        if link is None and broker_url is not None:
            link = await opened.enter_async_context(open_broker_link(broker_url))

        def writer(name: str) -> Behaviour[Any]:
            announce = PUBLISHER_NAME if link is not None else None
            return StoreWriter(
                store, world, metrics=metrics, announce=announce, linger_s=commit_linger_s
            )

        def publisher(name: str) -> Behaviour[Any]:
            assert link is not None
            return BrokerPublisher(link, node)

        hubs: list[Hub] = []

        def access(event: StoredEvent) -> Callable[[], Awaitable[None]] | None:
            # no hub yet: no connection, nobody to check
            return hubs[0].access_check(event) if hubs else None

        def room(name: str) -> Behaviour[Any]:
            behaviour = RoomBehaviour(
                name.removeprefix("room:"),
                store,
                presence=presence,
                metrics=metrics,
                announce=PUBLISHER_NAME if link is not None else None,
                access=access if link is not None else None,
            )
            if ring_size is not None:
                behaviour.ring_size = ring_size
            if idle_s is not None:
                behaviour.idle_s = idle_s
            return behaviour

        def user_presence(name: str) -> Behaviour[Any]:
            return UserPresenceBehaviour(name.removeprefix("presence:user:"), presence)

        def session(name: str) -> Behaviour[Any]:
            behaviour = SessionBehaviour(name.removeprefix("session:"), store)
            if idle_s is not None:
                behaviour.idle_s = idle_s
            return behaviour

        async with (
            opened,
            open_system(world, registry_intensity=restart_intensity) as system,
        ):
            system.define(Kind("store:", writer))
            system.define(Kind("broker:", publisher))
            system.define(Kind("room:", room))
            system.define(Kind("session:", session))
            system.define(Kind("presence:user:", user_presence))
            await system.registry.get(WRITER_NAME)
            if link is not None:
                await system.registry.get(PUBLISHER_NAME)
            tokens = await _access_tokens(world, identity or IdentityConfig(), data_dir)
            key_pair = (identity or IdentityConfig()).uses_key_pair
            if cluster and (data_dir is not None or key_pair):
                check = tokens.check_value()
                if not await _agree_on_key(world, store, "jwt", check, replace=new_keys):
                    raise NotClusterKeys(
                        _not_the_clusters(
                            "the --jwt-* keys (or --jwt-issuer, --jwt-audience) are not",
                            "access tokens",
                            "Give this node the other nodes' --jwt-* options",
                        )
                        if key_pair
                        else _not_the_clusters(
                            f"{data_dir}/{JWT_SECRET_FILE} (or --jwt-issuer, --jwt-audience)"
                            " is not",
                            "access tokens",
                            f"Copy {JWT_SECRET_FILE} from a node of the cluster into this"
                            " data dir, and give every node the same --jwt-* options",
                        )
                    )
            registry = system.registry

            async def write(request: WriteRequest) -> object:
                return await registry.call(WRITER_NAME, Write(request), timeout_s=30.0)

            config = identity or IdentityConfig()
            authentication = Authentication(
                world,
                store,
                write,
                tokens,
                passwords=Passwords(PasswordHasher.from_parameters(config.password_params)),
                refresh_ttl_s=config.refresh_ttl_s,
            )
            async with trio.open_nursery() as tasks:
                feed = None
                if link is not None:
                    feed = RoomFeed(link, registry, node)
                    await tasks.start(feed.run)
                hub = Hub(
                    world,
                    store,
                    system,
                    token,
                    authorizer or AllowAll(),
                    metrics,
                    identity=authentication,
                    tasks=tasks,
                    limits=limits,
                    feed=feed,
                    owner_token_file=token_file,
                )
                hubs.append(hub)
                tasks.start_soon(hub._rechecker)
                tasks.start_soon(hub._key_sweeper)
                if feed is not None:
                    tasks.start_soon(hub._sweeper)
                try:
                    yield hub
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(10):
                        await hub.drain()
                    tasks.cancel_scope.cancel()
    finally:
        if own_store:
            store.close()


async def _agree_on_key(
    world: World, store: SqlStore, name: str, check: str, *, replace: bool
) -> bool:
    """Whether ``check`` (a key's check value) is the one the database
    keeps for the cluster's key ``name``: kept if none was, or with
    ``replace``."""
    kept = await world.blocking.run(
        lambda: store.meta_secret(KEY_CHECK_PREFIX + name, check, replace=replace)
    )
    return kept == check


def _not_the_clusters(what_is_not: str, signed: str, fix: str) -> str:
    """Why a node whose key ``what_is_not`` the cluster's must not start,
    and what to do."""
    return (
        f"{what_is_not} the cluster's: the other nodes of this database would refuse"
        f" the {signed} this node signs, and it theirs. {fix}; or, after changing every"
        " node's keys on purpose, start one node with --new-keys"
    )


async def _access_tokens(
    world: World, config: IdentityConfig, data_dir: pathlib.Path | None
) -> AccessTokens:
    """The access-token issuer of ``config``; HS256's key is made on first
    start in ``<data_dir>/jwt-secret`` (0600), or in memory without a data
    dir (then without a task switch: nothing is read)."""
    # a stream of its own: the key draws nothing from the hub's entropy
    entropy = world.entropy.fork("jwt-secret")
    if config.uses_key_pair:
        return await world.blocking.run(lambda: config.access_tokens(None))
    if data_dir is None:
        return config.access_tokens(entropy.token(48))
    path = data_dir / JWT_SECRET_FILE
    secret = await world.blocking.run(
        lambda: read_or_create_secret(path, lambda: entropy.token(48))
    )
    return config.access_tokens(secret)


def _store_away(exc: BaseException) -> ServiceError | None:
    """``unavailable`` if ``exc`` is the store failing (read directly, or
    by a room actor whose start reads its head); None for anything else."""
    cause: BaseException | None = exc
    if isinstance(exc, ChildStartError):
        cause = exc.__cause__
    if isinstance(cause, StoreUnavailable):
        return ServiceError("unavailable", cause.told)
    return None
