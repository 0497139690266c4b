"""The session actor: orders one session's writes (the session, its tasks,
messages and tool calls), merges session fields by hybrid logical clock,
refuses stale writes to strict fields, and answers only once the write is
durable."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
from collections import OrderedDict
from typing import Any, Final

import attrs
import cbor2
import outcome

from ..marks import mark
from ..runtime import (
    ActorContext,
    ActorDead,
    ActorExited,
    Ask,
    Await,
    Behaviour,
    Effect,
    Effects,
    Registry,
    Reply,
    ReplyTo,
    Request,
    Stop,
)
from ..store import (
    WRITER_NAME,
    Append,
    Compact,
    EventDraft,
    Expect,
    Flush,
    History,
    Mutation,
    Once,
    SqlStore,
    StoreConflict,
    StoreError,
    StoreIntegrityError,
    StoreNotFound,
    StoreQueryError,
    StoreRepeated,
    Write,
    WriteRequest,
    WriteResult,
)
from ._api import Principal, ServiceError
from .fields import (
    CHUNK_CHARS_MAX,
    CONTENT_CHARS_MAX,
    ID_CHARS_MAX,
    MESSAGE_CHARS_MAX,
    NAME_CHARS_MAX,
    PROMPT_CHARS_MAX,
    check_json,
    check_text,
)
from .hlc import Hlc, HlcClock, merge_fields

log = logging.getLogger("agor_actors.domain")

__all__ = ["SESSION_FIELDS", "STRICT_FIELDS", "Command", "SessionBehaviour", "SessionState"]

SESSION_STATUSES = ("idle", "running", "awaiting_permission", "completed", "failed")
TASK_STATUSES = ("created", "running", "completed", "failed", "stopped")
SESSION_FIELDS = (
    "title",
    "status",
    "agent",
    "git_state",
    "board_id",
    "owner_id",
    "locked_by",
    "permissions",
)
STRICT_FIELDS = frozenset({"owner_id", "locked_by", "permissions"})
BOARD_VISIBLE = frozenset({"title", "status", "agent", "board_id", "owner_id"})
TASK_FIELDS = ("prompt", "status", "result", "error")
MESSAGE_FIELDS = ("task_id", "role", "content", "streaming")
ROLES = ("user", "assistant", "system", "tool")


@attrs.frozen
class Command:
    """A write for the session actor, stamped by the hub with the wall time."""

    principal: Principal
    connection_id: str | None
    service: str
    method: str
    id: str | None
    data: Any
    query: dict[str, Any] | None
    temp_id: str | None
    base_rev: int | None
    now_ms: int
    new_id: str  # an id the hub drew, for creates
    again: bool = False
    """Set by the session actor on a write it runs again after loading the
    record anew (a shared store said its view was stale): not a third time."""
    idempotency: tuple[str, str, str] | None = None
    """The caller's key for this write, with its call and digest (see
    :func:`idempotency_of`), as the hub worked them out."""
    if_match: bool = False
    """``base_rev`` came as HTTP's ``If-Match``: it holds the whole write of
    the session's row (RFC 9110: a stale one changes nothing), not only of
    its strict fields, whose other fields merge."""


def idempotency_of(
    service: str, method: str, id: str | None, data: Any, base_rev: int | None
) -> tuple[str, str]:
    """``(call, digest)`` of a write sent under an idempotency key: what it
    was ("service.method id") and a digest of what it carried, so that the
    key sent again with another call is refused rather than answered with
    the first one's result."""
    call = f"{service}.{method}" if id is None else f"{service}.{method} {id}"
    carried = cbor2.dumps([data, base_rev], canonical=True)
    return call, hashlib.sha256(carried).hexdigest()


def key_reused(key: str, call: str) -> ServiceError:
    """The error of a write sent under a key that names another ``call``."""
    return ServiceError(
        "invalid_field", f"idempotency_key {key!r} was used for another call ({call})"
    )


def repeated_answer(call: str, digest: str, exc: StoreRepeated) -> Any:
    """What a write sent again under a key the store holds is answered: the
    first write's answer, marked ``_replayed``; raises ``invalid_field`` if
    the key was taken by another call."""
    if (exc.call, exc.digest) != (call, digest):
        raise key_reused(exc.key, exc.call)
    answer = exc.answer
    return {**answer, "_replayed": True} if isinstance(answer, dict) else answer


CLIENT_LEAD_MS_MAX: Final = 300_000
"""How far ahead of the daemon's clock a caller's ``hlc`` stamp may be (a
skewed clock), in milliseconds; further is ``invalid_field``."""

FLUSH_TIMEOUT_S: Final = 30.0
"""How long a session's first load waits for the writer to answer the
writes before its :class:`~agor_actors.store.Flush` (a write's own ask
waits as long); past it the load fails as the store's unreachable would."""

_INCARNATIONS = itertools.count()
"""Session actor incarnations in this process: a restarted session plans
its chunks under keys of its own (only their equality matters)."""


@attrs.define
class SessionState:
    session_id: str
    row: dict[str, Any] | None
    clock: HlcClock
    inflight: int = 0
    poisoned: bool = False
    messages: OrderedDict[str, _Msg | None] = attrs.field(factory=OrderedDict)
    """Messages this incarnation knows: task, content length (the offset
    of the next chunk) and rev; None: no such message.  Bounded (LRU)."""
    tasks: OrderedDict[str, dict[str, Any] | None] = attrs.field(factory=OrderedDict)
    """Tasks this incarnation knows, as stored (so a change's answer is the
    record and its rev the next one); None: no such task in this session.
    Bounded (LRU) in count and in prompt characters."""
    task_chars: int = 0
    loading: bool = False
    deferred: list[Request] = attrs.field(factory=list)
    retried: int = 0
    """How many of ``deferred``, at its front, are writes to run again
    (``Command.again``): older than the rest, in the order they were planned."""
    load_wanted: tuple[str, str] | None = None
    """A record to load once every write in flight is answered (so that
    what the store says of it counts them all)."""
    row_stale: bool = False
    """Shared store: a write of the session's own row was refused (another
    daemon changed or removed it), so ``row`` may not be the store's: it is
    loaded again before the next write is planned."""
    writes: int = 0
    knowledge: int = 0
    """Bumped each time ``messages`` is forgotten after a failed write: a
    chunk's coalesce key names it (with the incarnation), so the writer can
    tell the chunks planned on lengths that counted a refused chunk from
    those planned after."""
    incarnation: int = attrs.field(factory=lambda: next(_INCARNATIONS))
    flushed: bool = True
    """Whether a load of this incarnation waited for the writer's answers
    to the writes it held (see :meth:`SessionBehaviour._flush`); ``init``
    starts an incarnation with False, so that its first write reads the
    session's row again after one (a state made otherwise, as by the
    behaviour's unit tests, needs none)."""


@attrs.define
class _Msg:
    task_id: str | None
    length: int
    rev: int = 1
    unanswered: int = 0
    """Chunks planned and not answered yet: ``length`` counts them."""


@attrs.frozen
class _Loaded:
    table: str  # "messages" or "tasks"
    record_id: str
    result: outcome.Outcome[dict[str, Any] | None]


@attrs.frozen
class _Written:
    reply_to: ReplyTo
    result: outcome.Outcome[Any]
    answer: Any
    touched_session: bool
    again: Request | None = None
    """A shared store's write whose precondition is this actor's belief of a
    rev: on a conflict it is run again (``Command.again``) once the record is
    loaded anew, instead of answered."""
    idempotency: tuple[str, str] | None = None
    """``(call, digest)`` of a write sent under an idempotency key."""


_NOUNS: Final = {"tool_calls": "tool call", "tasks": "task", "messages": "message"}


def _missing(exc: StoreNotFound) -> str:
    """What a client is told of a row a write named that is not there, in
    the service's words (not the table's)."""
    key = exc.key
    what = f"no {_NOUNS.get(exc.table, exc.table.removesuffix('s'))} {key.get('id', '')}".rstrip()
    if "task_id" in key:
        what += f" in task {key['task_id']}"
    return what


def _bad(message: str, data: Any = None) -> ServiceError:
    return ServiceError("invalid_field", message, data)


def _as_dict(data: Any) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _bad("data must be an object")
    return data


def _pick(data: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise _bad(f"unknown field(s): {', '.join(unknown)}", {"allowed": list(allowed)})
    return {k: data[k] for k in allowed if k in data}


def _check_session_values(values: dict[str, Any]) -> None:
    for name in ("title", "agent", "board_id", "owner_id", "locked_by"):
        if name in values and values[name] is not None and not isinstance(values[name], str):
            raise _bad(f"{name} must be a string")
        bound = NAME_CHARS_MAX if name in ("title", "agent") else ID_CHARS_MAX
        check_text(name, values.get(name), bound)
    if "title" in values and values["title"] is None:
        raise _bad("title must be a string")
    if "status" in values and values["status"] not in SESSION_STATUSES:
        raise _bad(f"status must be one of {', '.join(SESSION_STATUSES)}")
    if (
        "git_state" in values
        and values["git_state"] is not None
        and not isinstance(values["git_state"], dict)
    ):
        raise _bad("git_state must be an object")
    if (
        "permissions" in values
        and values["permissions"] is not None
        and not isinstance(values["permissions"], dict)
    ):
        raise _bad("permissions must be an object")
    for name in ("git_state", "permissions"):
        check_json(name, values.get(name))


def _if_rev(
    cmd: Command, table: str, request: WriteRequest, answer: Any
) -> tuple[WriteRequest, Any]:
    """With a ``base_rev`` (``If-Match``), the write holds only if the
    record is still at that revision (else ``conflict``)."""
    if cmd.base_rev is None or not isinstance(cmd.id, str):
        return request, answer
    expect = Expect(table, {"id": cmd.id}, "rev", cmd.base_rev)
    return attrs.evolve(request, expect=(*request.expect, expect)), answer


_TASK_TRANSITIONS: Final = {
    "start": ("running", "task:started", None),
    "complete": ("completed", "task:completed", "result"),
    "fail": ("failed", "task:failed", "error"),
    "stop": ("stopped", "task:stopped", None),
}
_TASK_CHANGES: Final = frozenset({*_TASK_TRANSITIONS, "patch", "update"})
_SESSION_CHANGES: Final = frozenset({"patch", "update", "set_status", "set_git_state"})


def _stale(base_rev: int, known: dict[str, Any], what: str) -> ServiceError:
    rev = int(known["rev"])
    return ServiceError(
        "conflict",
        f"stale base_rev {base_rev}; the {what} is at rev {rev}",
        {"current": _public(known), "rev": rev},
    )


def _prompt_chars(row: dict[str, Any]) -> int:
    prompt = row.get("prompt")
    return len(prompt) if isinstance(prompt, str) else 0


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "clocks"}


def _observe_clocks(state: SessionState) -> None:
    """The actor's clock orders its next stamps after every field clock of
    the row it loaded: a write planned on what it read is later than what
    it read (another daemon's clock ahead of this one, an earlier
    incarnation's, a client's stamp from the future), so the merge lets it
    win rather than record it as lost."""
    clocks = (state.row or {}).get("clocks")
    if not isinstance(clocks, dict):
        return
    stamps = []
    for text in clocks.values():
        try:
            stamps.append(Hlc.decode(text))
        except (AttributeError, ValueError):
            continue  # not a stamp: nothing to order after
    if stamps:
        state.clock.observe(max(stamps), 0)


class SessionBehaviour(Behaviour[SessionState]):
    """One per session.  ``writer`` is the store writer's registry name."""

    mailbox_size = 256
    idle_s = 600.0
    max_inflight = 64
    max_deferred = 256
    max_messages = 4096
    max_tasks = 1024
    max_task_chars = 4 * 1024 * 1024
    """Prompt characters of the tasks kept in memory (a prompt takes at most
    ``PROMPT_CHARS_MAX``)."""

    def __init__(self, session_id: str, store: SqlStore, *, writer: str = WRITER_NAME) -> None:
        self.session_id = session_id
        self.store = store
        self.writer = writer
        self._registry: Registry | None = None  # init sets it

    async def init(self, ctx: ActorContext) -> SessionState:
        store, sid = self.store, self.session_id
        self._blocking = ctx.world.blocking
        self._registry = ctx.registry
        row = await ctx.world.blocking.run(lambda: store.get("sessions", sid))
        state = SessionState(
            session_id=sid, row=row, clock=HlcClock(node=f"session:{sid}"), flushed=False
        )
        _observe_clocks(state)
        return state

    def can_passivate(self, state: SessionState) -> bool:
        return state.inflight == 0

    def handle(self, state: SessionState, msg: Any, now: float) -> Effects:
        if isinstance(msg, _Written):
            return self._written(state, msg)
        if isinstance(msg, _Loaded):
            return self._loaded(state, msg)
        if not isinstance(msg, Request) or not isinstance(msg.body, Command):
            raise TypeError(f"session: unexpected {msg!r}")
        if state.loading:
            # keep the order of this session's writes while a message loads
            if len(state.deferred) >= self.max_deferred:
                error = ServiceError("unavailable", "session is busy; retry")
                return [Reply(msg.reply_to, error=error)]
            state.deferred.append(msg)
            return ()
        return self._command(state, msg)

    def _command(self, state: SessionState, msg: Request, *, retry: bool = False) -> list[Effect]:
        cmd = msg.body
        assert isinstance(cmd, Command)
        if state.poisoned:
            error = ServiceError("unavailable", "session is reloading; retry")
            return [Reply(msg.reply_to, error=error)]
        shared = self.store.shared
        if shared and not cmd.again and self._behind(state, cmd):
            # another daemon may have moved the record: load it before
            # telling the caller its base_rev is stale
            msg = Request(attrs.evolve(cmd, again=True), msg.reply_to)
            cmd = msg.body
        unknown = self._unknown(state, cmd)
        if unknown is not None:
            state.loading = True
            state.deferred.insert(0, msg)
            if retry:
                state.retried += 1
            if state.inflight:
                # writes of this session still on their way to the store
                # (chunks of this message, a change of this task): read it
                # once they are answered, or its length or rev misses them
                state.load_wanted = unknown
                return []
            return [self._load(state, *unknown)]
        try:
            request, answer, coalesce_key, touched = self._plan(state, cmd)
        except ServiceError as exc:
            return [Reply(msg.reply_to, error=exc)]
        idempotency = None
        if cmd.idempotency is not None:
            key, what, digest = cmd.idempotency
            once = Once(cmd.principal.user_id, key, what, digest, answer, cmd.now_ms)
            request = attrs.evolve(request, once=once)
            idempotency = (what, digest)
        state.inflight += 1
        state.writes += 1
        body = Write(request, coalesce_key)
        again = None
        if shared and not cmd.again and request.expect and _believed(cmd):
            again = Request(attrs.evolve(cmd, again=True), msg.reply_to)
        return [_ask(self.writer, body, msg.reply_to, answer, touched, again, idempotency)]

    def _behind(self, state: SessionState, cmd: Command) -> bool:
        """Shared store: whether ``cmd``'s base_rev differs from the rev this
        actor knows of its message, task or session (which is then
        forgotten, to be loaded)."""
        if cmd.base_rev is None or not isinstance(cmd.id, str):
            return False
        if cmd.service == "sessions":
            row = None if state.row_stale else state.row  # stale: loaded anyway
            if _held_by_base_rev(cmd) and row is not None and int(row["rev"]) != cmd.base_rev:
                state.row_stale = True
                return True
            return False
        if cmd.service == "messages" and cmd.method == "finish":
            message = state.messages.get(cmd.id)
            if message is not None and message.rev != cmd.base_rev:
                del state.messages[cmd.id]
                return True
        elif cmd.service == "tasks" and (cmd.method in _TASK_CHANGES or cmd.method == "remove"):
            task = state.tasks.get(cmd.id)
            if task is not None and task["rev"] != cmd.base_rev:
                self._forget_task(state, cmd.id)
                return True
        return False

    def _load(self, state: SessionState, table: str, record_id: str) -> Effect:
        store = self.store
        blocking = self._blocking
        flush = None if state.flushed else self._flush

        async def load() -> dict[str, Any] | None:
            if flush is not None:
                await flush()
            return await blocking.run(lambda: store.get(table, record_id))

        return Await(load, lambda result: _Loaded(table, record_id, result))

    async def _flush(self) -> None:
        """Wait until the writer has answered every write it holds: an
        earlier incarnation of this session (crashed, restarted at once) may
        have sent chunks that are still on their way, and a message's length
        read before they commit would plan the next chunk at an offset one of
        them takes.  Once per incarnation, before its first load (not in
        ``init``, which runs under the supervisor's lock: a flush waits for a
        commit).  A writer that is not running holds nothing: what the last
        one held was answered when it stopped, and never committed."""
        writer = self._registry.lookup(self.writer) if self._registry is not None else None
        if writer is None:
            return
        # stopped meanwhile: what it held was answered, never committed
        with contextlib.suppress(ActorExited, ActorDead):
            await writer.call(Flush(), timeout_s=FLUSH_TIMEOUT_S)

    def _unknown(self, state: SessionState, cmd: Command) -> tuple[str, str] | None:
        """``(table, id)`` of a record this write needs to know and that is
        not in memory: a message (its content length, the offset of a
        chunk; its rev) or a task (its rev, the record a change answers);
        first of all the session's own row, after a shared store refused a
        write of it (every write reads it: whether the session exists, its
        board, its fields' clocks), and before this incarnation's first write
        (the row read in ``init`` may miss a write of its crashed predecessor
        still at the writer: it is read again after the writer's flush).
        A new message's task, too: whether it is one of this session's."""
        if state.row_stale or not state.flushed:
            return ("sessions", state.session_id)
        if cmd.service == "messages" and cmd.method == "create":
            task_id = cmd.data.get("task_id") if isinstance(cmd.data, dict) else None
            if isinstance(task_id, str) and 0 < len(task_id) <= ID_CHARS_MAX:
                return None if task_id in state.tasks else ("tasks", task_id)
            return None  # (the plan refuses a task_id that is no id)
        if not isinstance(cmd.id, str):
            return None
        if cmd.service == "messages" and cmd.method in ("stream", "finish", "remove"):
            return None if cmd.id in state.messages else ("messages", cmd.id)
        if cmd.service == "tasks" and cmd.method in _TASK_CHANGES:
            return None if cmd.id in state.tasks else ("tasks", cmd.id)
        return None

    def _loaded(self, state: SessionState, done: _Loaded) -> list[Effect]:
        state.loading = False
        try:
            row = done.result.unwrap()
            state.flushed = True
        except Exception as exc:
            # the store is unreachable: fail what waits, in order
            waiting, state.deferred, state.retried = state.deferred, [], 0
            error = ServiceError("unavailable", f"store: {exc}")
            return [Reply(req.reply_to, error=error) for req in waiting]
        if (
            row is not None
            and done.table != "sessions"
            and row.get("session_id") != state.session_id
        ):
            row = None
        if done.table == "sessions":
            # the row as the store has it now (None: another daemon removed
            # the session): the writes planned next merge against its clocks
            state.row, state.row_stale = row, False
            _observe_clocks(state)
        elif done.table == "tasks":
            self._remember_task(state, done.record_id, row)
        elif row is None:
            self._remember(state, done.record_id, None)
        else:
            known = _Msg(row["task_id"], len(row["content"]), int(row["rev"]))
            self._remember(state, done.record_id, known)
        effects: list[Effect] = []
        while state.deferred and not state.loading:
            retry = state.retried > 0
            if retry:
                state.retried -= 1
            effects.extend(self._command(state, state.deferred.pop(0), retry=retry))
        return effects

    def _remember(self, state: SessionState, message_id: str, known: _Msg | None) -> None:
        state.messages[message_id] = known
        state.messages.move_to_end(message_id)
        while len(state.messages) > self.max_messages:
            state.messages.popitem(last=False)

    def _forget_task(self, state: SessionState, task_id: str) -> None:
        old = state.tasks.pop(task_id, None)
        if old is not None:
            state.task_chars -= _prompt_chars(old)

    def _remember_task(self, state: SessionState, task_id: str, row: dict[str, Any] | None) -> None:
        old = state.tasks.pop(task_id, None)
        if old is not None:
            state.task_chars -= _prompt_chars(old)
        state.tasks[task_id] = row
        if row is not None:
            state.task_chars += _prompt_chars(row)
        while len(state.tasks) > 1 and (
            len(state.tasks) > self.max_tasks or state.task_chars > self.max_task_chars
        ):
            _, evicted = state.tasks.popitem(last=False)
            if evicted is not None:
                state.task_chars -= _prompt_chars(evicted)

    def _written(self, state: SessionState, done: _Written) -> list[Effect]:
        state.inflight -= 1
        effects: list[Effect] = []
        touched = done.touched_session
        if isinstance(done.result, outcome.Error):
            # what this incarnation believes of messages may be off now:
            # forget it; it is loaded again from the store when needed
            state.messages.clear()
            state.tasks.clear()
            state.task_chars = 0
            state.knowledge += 1
            if (
                touched
                and self.store.shared
                and isinstance(done.result.error, StoreConflict | StoreNotFound)
            ):
                # another daemon changed (or removed) the session's row:
                # load it again before the next write, rather than stop
                state.row_stale = True
                touched = False
        try:
            result = done.result.unwrap()
            assert isinstance(result, WriteResult)
            answer = dict(done.answer) if isinstance(done.answer, dict) else done.answer
            if isinstance(answer, dict) and "appended" in answer:
                known = state.messages.get(answer["id"])
                if known is not None:
                    known.unanswered -= 1
            if isinstance(answer, dict) and result.events:
                answer["_seq"] = result.events[0].seq
                if "appended" in answer and self.store.shared:
                    self._landed(state, result.events[0].data)
            effects.append(Reply(done.reply_to, answer))
        except StoreConflict as exc:
            if done.again is not None and not _refused_base_rev(done.again.body, exc):
                # the rev this actor believed is not the store's (another
                # daemon changed the record): load it and plan the write again
                effects.extend(self._again(state, done.again))
            elif isinstance(done.answer, dict) and "appended" in done.answer:
                if type(exc.expected) is int:
                    # a chunk that named its offset (``at``) did not land
                    # there: the message is ``current`` characters long
                    error = _misplaced(done.answer["id"], exc.expected, int(exc.current))
                else:
                    # a shared store's landing of a chunk past the longest message
                    error = _too_long()
                effects.append(Reply(done.reply_to, error=error))
            elif exc.table == "tool_calls":
                # another task's tool call: not found here (its task unsaid)
                missing = StoreNotFound("tool_calls", {**exc.key, "task_id": exc.expected})
                effects.append(
                    Reply(done.reply_to, error=ServiceError("not_found", _missing(missing)))
                )
            elif exc.column == "clocks":
                # a session's write refused twice on its fields' clocks (not
                # shown: they name other users' connections)
                mark("session.conflict")
                message = f"session {state.session_id} changed meanwhile; retry"
                effects.append(Reply(done.reply_to, error=ServiceError("conflict", message)))
            else:
                mark("session.conflict")
                effects.append(
                    Reply(
                        done.reply_to,
                        error=ServiceError("conflict", str(exc), {"current": exc.current}),
                    )
                )
            state.poisoned = state.poisoned or touched
        except StoreRepeated as exc:
            # sent again under its idempotency key: nothing of it was
            # written, but this actor planned it on its copy of the session's
            # row, which is read again before the next write is planned (as a
            # shared store's refusal does; the writes already on their way
            # were planned on a rev that counted it: a strict one is refused
            # by its precondition, another leaves a rev unused)
            call, digest = done.idempotency or ("", "")
            try:
                effects.append(Reply(done.reply_to, repeated_answer(call, digest, exc)))
            except ServiceError as refused:
                effects.append(Reply(done.reply_to, error=refused))
            state.row_stale = state.row_stale or touched
        except StoreNotFound as exc:
            effects.append(Reply(done.reply_to, error=ServiceError("not_found", _missing(exc))))
            state.poisoned = state.poisoned or touched
        except StoreIntegrityError as exc:
            log.info("the store refused a write: %s", exc)  # the detail stays here
            effects.append(
                Reply(
                    done.reply_to,
                    error=ServiceError("invalid_data", "the data does not fit the records"),
                )
            )
            state.poisoned = state.poisoned or touched
        except StoreQueryError as exc:
            # a value the plan let through that the store's types refuse
            log.warning("the store refused a write: %s", exc)
            error = ServiceError("invalid_field", "a field of the data is of the wrong type")
            effects.append(Reply(done.reply_to, error=error))
            state.poisoned = state.poisoned or touched
        except StoreError as exc:
            log.warning("the store failed a write: %s", exc)
            effects.append(Reply(done.reply_to, error=ServiceError("unavailable", exc.told)))
            state.poisoned = state.poisoned or touched
        except Exception as exc:
            effects.append(
                Reply(
                    done.reply_to, error=ServiceError("unavailable", f"{type(exc).__name__}: {exc}")
                )
            )
            state.poisoned = True
        if state.poisoned and state.inflight == 0:
            # the in-memory session may differ from the store: stop once the
            # replies are out; the next use spawns us again from the store
            waiting, state.deferred, state.retried = state.deferred, [], 0
            error = ServiceError("unavailable", "session is reloading; retry")
            effects.extend(Reply(req.reply_to, error=error) for req in waiting)
            state.loading, state.load_wanted = False, None
            effects.append(Stop())
        elif state.load_wanted is not None and state.inflight == 0:
            effects.append(self._load(state, *state.load_wanted))
            state.load_wanted = None
        return effects

    def _again(self, state: SessionState, again: Request) -> list[Effect]:
        """Run ``again`` (a write planned before any deferred one) now, or,
        while a record loads, ahead of the deferred writes and after the
        writes to run again that were planned before it."""
        if state.loading:
            state.deferred.insert(state.retried, again)
            state.retried += 1
            return []
        return self._command(state, again, retry=True)

    def _landed(self, state: SessionState, data: Any) -> None:
        """Shared store: a chunk landed where the store said (other daemons
        may have appended before it): the message is at least that long."""
        mid = data.get("message_id") if isinstance(data, dict) else None
        known = state.messages.get(mid) if isinstance(mid, str) else None
        if known is not None:
            end = int(data["offset"]) + len(data["chunk"])
            known.length = max(known.length, end)

    # ------------------------------------------------------------------ planning

    def _plan(
        self, state: SessionState, cmd: Command
    ) -> tuple[WriteRequest, Any, str | None, bool]:
        key = (cmd.service, cmd.method)
        if cmd.service == "sessions":
            if cmd.method == "create":
                return (*self._create_session(state, cmd), None, True)
            if state.row is None:
                raise ServiceError("not_found", f"no session {state.session_id}")
            if cmd.method in ("patch", "update"):
                return (*self._patch_session(state, cmd, _as_dict(cmd.data)), None, True)
            if cmd.method == "set_status":
                data = _as_dict(cmd.data)
                return (
                    *self._patch_session(state, cmd, {"status": data.get("status")}),
                    None,
                    True,
                )
            if cmd.method == "set_git_state":
                return (*self._patch_session(state, cmd, {"git_state": cmd.data}), None, True)
            if cmd.method == "remove":
                return (*self._remove_session(state, cmd), None, True)
        if state.row is None:
            raise ServiceError("not_found", f"no session {state.session_id}")
        if cmd.service == "tasks":
            return (*self._task(state, cmd), None, False)
        if cmd.service == "messages":
            request, answer = self._message(state, cmd)
            coalesce = (
                f"message:{cmd.id}:{state.incarnation}.{state.knowledge}"
                if cmd.method == "stream"
                else None
            )
            if cmd.method == "remove":
                request, answer = _if_rev(cmd, "messages", request, answer)
            return request, answer, coalesce, False
        raise ServiceError("unknown_method", f"{key[0]}.{key[1]} is not a session method")

    def _rooms(self, state: SessionState, board_visible: bool) -> list[str]:
        rooms = [f"session:{state.session_id}"]
        board = state.row.get("board_id") if state.row else None
        if board_visible and board:
            rooms.append(f"board:{board}")
        return rooms

    def _events(
        self, state: SessionState, cmd: Command, event: str, data: Any, *, board: bool
    ) -> list[EventDraft]:
        return [
            EventDraft(
                room=room,
                event=event,
                data=data,
                ts=cmd.now_ms,
                user_id=cmd.principal.user_id,
                origin=cmd.connection_id,
                temp_id=cmd.temp_id,
            )
            for room in self._rooms(state, board)
        ]

    def _stamp(self, state: SessionState, cmd: Command) -> Hlc:
        """The write's stamp: the caller's ``query.hlc`` (an edit made
        offline merges by when it was made), or the session's clock."""
        writer = f"{cmd.principal.user_id}:{cmd.connection_id or 'http'}"
        given = (cmd.query or {}).get("hlc")
        if given is None:
            return state.clock.tick(cmd.now_ms, writer)
        client = Hlc.parse_client(given, writer)
        if client is None:
            raise _bad("hlc must be [wall_ms, counter], two non-negative integers")
        lead = client.wall_ms - cmd.now_ms
        if lead > CLIENT_LEAD_MS_MAX:
            # a stamp from the far future would win every later edit of its
            # fields (and drag the session's clock along)
            raise _bad(
                f"hlc is {lead} ms ahead of the daemon's clock; at most {CLIENT_LEAD_MS_MAX}"
            )
        state.clock.observe(client, cmd.now_ms)
        return client

    def _create_session(self, state: SessionState, cmd: Command) -> tuple[WriteRequest, Any]:
        if state.row is not None:
            raise ServiceError(
                "conflict", f"session {state.session_id} exists", {"current": _public(state.row)}
            )
        values = _pick(_as_dict(cmd.data), SESSION_FIELDS)
        values.setdefault("title", "")
        values.setdefault("status", "idle")
        values.setdefault("owner_id", cmd.principal.user_id)
        _check_session_values(values)
        stamp = self._stamp(state, cmd)
        clocks = {f: stamp.encode() for f in values}
        row = {
            "id": state.session_id,
            "agent": None,
            "git_state": None,
            "board_id": None,
            "locked_by": None,
            "permissions": None,
            **values,
            "created_at": cmd.now_ms,
            "updated_at": cmd.now_ms,
            "rev": 1,
        }
        mutation = Mutation(
            "insert",
            "sessions",
            {"id": state.session_id},
            {**{k: v for k, v in row.items() if k != "id"}, "clocks": clocks},
        )
        state.row = {**row, "clocks": clocks}
        public = _public(row)
        events = self._events(
            state,
            cmd,
            "session:created",
            {"session_id": state.session_id, "session": public},
            board=True,
        )
        return WriteRequest(mutations=(mutation,), events=tuple(events)), public

    def _patch_session(
        self, state: SessionState, cmd: Command, data: dict[str, Any]
    ) -> tuple[WriteRequest, Any]:
        assert state.row is not None
        patch = _pick(data, SESSION_FIELDS)
        if not patch:
            raise _bad("nothing to change")
        _check_session_values(patch)
        rev = int(state.row["rev"])
        expect: list[Expect] = []
        strict = sorted(STRICT_FIELDS & set(patch))
        held = _held_by_base_rev(cmd)
        if strict or held:
            shown = strict or sorted(patch)  # If-Match holds every field
            if cmd.base_rev != rev:
                mark("session.conflict")
            if cmd.base_rev is None:
                raise ServiceError(
                    "conflict",
                    f"{', '.join(strict)} need base_rev",
                    {"current": {f: state.row.get(f) for f in shown}, "rev": rev},
                )
            if cmd.base_rev != rev:
                raise ServiceError(
                    "conflict",
                    f"stale base_rev {cmd.base_rev}; the session is at rev {rev}",
                    {"current": {f: state.row.get(f) for f in shown}, "rev": rev},
                )
            expect.append(Expect("sessions", {"id": state.session_id}, "rev", rev))
        if self.store.shared:
            # other daemons write this row too: the write holds only if the
            # row is still the one merged against (its rev, and its fields'
            # clocks: a write of this actor refused before this one leaves
            # the rev it counted on to another daemon's write); else the
            # actor loads the row and plans the write again
            if not (strict or held):
                expect.append(Expect("sessions", {"id": state.session_id}, "rev", rev))
            believed = state.row.get("clocks")
            expect.append(Expect("sessions", {"id": state.session_id}, "clocks", believed))
        stamp = self._stamp(state, cmd)
        clocks: dict[str, str] = dict(state.row.get("clocks") or {})
        outcome_ = merge_fields(state.row, clocks, patch, stamp)
        history = [
            History(
                "sessions",
                state.session_id,
                f,
                old,
                old_stamp or "",
                "",
                cmd.now_ms,
                stamp.encode(),
                stamp.writer,
            )
            for f, old, old_stamp in outcome_.overwritten
        ] + [
            History(
                "sessions",
                state.session_id,
                f,
                value,
                stamp.encode(),
                stamp.writer,
                cmd.now_ms,
                cur_stamp,
                Hlc.decode(cur_stamp).writer if cur_stamp else None,
            )
            for f, value, _current, cur_stamp in outcome_.lost
        ]
        applied = outcome_.applied
        lost = [{"field": f, "value": v, "current": c} for f, v, c, _ in outcome_.lost]
        new_rev = rev + 1
        for f in applied:
            clocks[f] = stamp.encode()
        values = {**applied, "clocks": clocks, "updated_at": cmd.now_ms, "rev": new_rev}
        mutation = Mutation("update", "sessions", {"id": state.session_id}, values)
        old_board = state.row.get("board_id")
        state.row.update(values)
        public = _public(state.row)
        events: list[EventDraft] = []
        if applied:
            board_visible = bool(BOARD_VISIBLE & set(applied))
            updates = {
                "session_id": state.session_id,
                "updates": {**applied, "updated_at": cmd.now_ms},
                "rev": new_rev,
            }
            events += self._events(state, cmd, "session:updated", updates, board=board_visible)
            if old_board and old_board != state.row.get("board_id"):
                events.append(
                    EventDraft(
                        f"board:{old_board}",
                        "session:deleted",
                        {"session_id": state.session_id},
                        cmd.now_ms,
                        cmd.principal.user_id,
                        cmd.connection_id,
                    )
                )
            if "status" in applied:
                events += self._events(
                    state,
                    cmd,
                    "session:status_changed",
                    {"session_id": state.session_id, "status": applied["status"]},
                    board=True,
                )
            if "git_state" in applied:
                events += self._events(
                    state,
                    cmd,
                    "git:state_changed",
                    {"session_id": state.session_id, "git_state": applied["git_state"]},
                    board=False,
                )
        answer = {**public, "_lost": lost} if lost else public
        return WriteRequest(
            mutations=(mutation,),
            events=tuple(events),
            history=tuple(history),
            expect=tuple(expect),
        ), answer

    def _remove_session(self, state: SessionState, cmd: Command) -> tuple[WriteRequest, Any]:
        assert state.row is not None
        expect: tuple[Expect, ...] = ()
        if cmd.base_rev is not None:  # as a task's or a message's remove
            if cmd.base_rev != int(state.row["rev"]):
                mark("session.conflict")
                raise _stale(cmd.base_rev, state.row, "session")
            expect = (Expect("sessions", {"id": state.session_id}, "rev", cmd.base_rev),)
        events = self._events(
            state, cmd, "session:deleted", {"session_id": state.session_id}, board=True
        )
        public = _public(state.row)
        sid = state.session_id
        mutations = (Mutation("delete", "sessions", {"id": sid}),)
        state.row = None
        return WriteRequest(mutations=mutations, events=tuple(events), expect=expect), public

    def _task(self, state: SessionState, cmd: Command) -> tuple[WriteRequest, Any]:
        data = _as_dict(cmd.data)
        sid = state.session_id
        if cmd.method == "create":
            values: dict[str, Any] = _pick(data, ("session_id", *TASK_FIELDS))
            values.pop("session_id", None)
            if not isinstance(values.get("prompt", ""), str):
                raise _bad("prompt must be a string")
            check_text("prompt", values.get("prompt"), PROMPT_CHARS_MAX)
            values.setdefault("prompt", "")
            values.setdefault("status", "created")
            if values["status"] not in TASK_STATUSES:
                raise _bad(f"status must be one of {', '.join(TASK_STATUSES)}")
            row = {
                "id": cmd.new_id,
                "session_id": sid,
                "result": None,
                "error": None,
                **values,
                "created_at": cmd.now_ms,
                "updated_at": cmd.now_ms,
                "rev": 1,
            }
            mutation = Mutation(
                "insert", "tasks", {"id": cmd.new_id}, {k: v for k, v in row.items() if k != "id"}
            )
            events = self._events(
                state, cmd, "task:created", {"task_id": cmd.new_id, "task": row}, board=True
            )
            self._remember_task(state, cmd.new_id, dict(row))
            return WriteRequest(mutations=(mutation,), events=tuple(events)), row
        if not isinstance(cmd.id, str):
            raise _bad("id is required")
        tid = cmd.id
        if cmd.method in _TASK_CHANGES:
            return self._change_task(state, cmd, tid, data)
        if cmd.method == "remove":
            if cmd.base_rev is not None:
                known = state.tasks.get(tid)
                if known is not None and known["rev"] != cmd.base_rev:
                    raise _stale(cmd.base_rev, known, "task")
            request, answer = _if_rev(cmd, "tasks", *self._remove_task(state, cmd, tid))
            self._remember_task(state, tid, None)
            return request, answer
        if cmd.method == "tool_call":
            given = data.get("tool_call_id")
            if given is not None and (not isinstance(given, str) or not given):
                raise _bad("tool_call_id must be a non-empty string (or left out: one is made)")
            check_text("tool_call_id", given, ID_CHARS_MAX)
            new_call_id: str = given or cmd.new_id
            if not isinstance(data.get("name"), str):
                raise _bad("name must be a string")
            check_text("name", data["name"], NAME_CHARS_MAX)
            check_json("input", data.get("input"))
            tool = {
                "id": new_call_id,
                "session_id": sid,
                "task_id": tid,
                "name": data["name"],
                "input": data.get("input"),
                "output": None,
                "status": "started",
                "created_at": cmd.now_ms,
                "updated_at": cmd.now_ms,
            }
            mutation = Mutation(
                "insert",
                "tool_calls",
                {"id": new_call_id},
                {k: v for k, v in tool.items() if k != "id"},
            )
            events = self._events(
                state, cmd, "task:tool_call", {"task_id": tid, "tool_call": tool}, board=False
            )
            return WriteRequest(mutations=(mutation,), events=tuple(events)), tool
        if cmd.method == "tool_result":
            call_id = data.get("tool_call_id")
            if not isinstance(call_id, str):
                raise _bad("tool_call_id must be a string")
            status = data.get("status", "completed")
            if status not in ("completed", "failed"):
                raise _bad("status must be completed or failed")
            check_json("output", data.get("output"))
            values = {"output": data.get("output"), "status": status, "updated_at": cmd.now_ms}
            mutation = Mutation("update", "tool_calls", {"id": call_id}, values)
            # a tool call of another task (of a session the caller may not
            # even see) is not this task's to answer: refused as not found
            mine = Expect("tool_calls", {"id": call_id}, "task_id", tid)
            payload = {
                "task_id": tid,
                "tool_call": {"id": call_id, "output": values["output"], "status": status},
            }
            events = self._events(state, cmd, "task:tool_call", payload, board=False)
            request = WriteRequest(mutations=(mutation,), events=tuple(events), expect=(mine,))
            return request, payload
        raise ServiceError("unknown_method", f"tasks.{cmd.method} does not exist")

    def _remove_task(self, state: SessionState, cmd: Command, tid: str) -> tuple[WriteRequest, Any]:
        mutation = Mutation("delete", "tasks", {"id": tid})
        events = self._events(state, cmd, "task:deleted", {"task_id": tid}, board=False)
        return WriteRequest(mutations=(mutation,), events=tuple(events)), {"id": tid}

    def _change_task(
        self, state: SessionState, cmd: Command, tid: str, data: dict[str, Any]
    ) -> tuple[WriteRequest, Any]:
        """A status transition or a patch: the task's rev moves by one (the
        write holds only if the stored rev is the one this actor knows, and,
        with ``base_rev``, the caller's); a patch answers the record."""
        known = state.tasks.get(tid)
        if known is None:
            raise ServiceError("not_found", f"no task {tid} in session {state.session_id}")
        transition = _TASK_TRANSITIONS.get(cmd.method)
        if transition is not None:
            status, _, payload_field = transition
            values: dict[str, Any] = {"status": status}
            if payload_field is not None:
                check_json(payload_field, data.get(payload_field))
                values[payload_field] = data.get(payload_field)
        else:
            values = _pick(data, TASK_FIELDS)
            if "prompt" in values and not isinstance(values["prompt"], str):
                raise _bad("prompt must be a string")
            check_text("prompt", values.get("prompt"), PROMPT_CHARS_MAX)
            if "status" in values and values["status"] not in TASK_STATUSES:
                raise _bad(f"status must be one of {', '.join(TASK_STATUSES)}")
            if not values:
                raise _bad("nothing to change")
        rev = int(known["rev"])
        if cmd.base_rev is not None and cmd.base_rev != rev:
            raise _stale(cmd.base_rev, known, "task")
        new_rev = rev + 1
        mutation = Mutation(
            "update", "tasks", {"id": tid}, {**values, "updated_at": cmd.now_ms, "rev": new_rev}
        )
        expect = Expect("tasks", {"id": tid}, "rev", rev)
        if transition is not None:
            payload: dict[str, Any] = {"task_id": tid, **values, "rev": new_rev}
            events = self._events(state, cmd, transition[1], payload, board=True)
        else:
            payload = {"task_id": tid, "updates": values, "rev": new_rev}
            events = self._events(state, cmd, "task:updated", payload, board=False)
        row = {**known, **values, "updated_at": cmd.now_ms, "rev": new_rev}
        self._remember_task(state, tid, row)
        request = WriteRequest(mutations=(mutation,), events=tuple(events), expect=(expect,))
        return request, (payload if transition is not None else dict(row))

    def _message(self, state: SessionState, cmd: Command) -> tuple[WriteRequest, Any]:
        data = _as_dict(cmd.data)
        sid = state.session_id
        if cmd.method == "create":
            values = _pick(data, ("session_id", *MESSAGE_FIELDS))
            values.pop("session_id", None)
            role = values.get("role", "assistant")
            if role not in ROLES:
                raise _bad(f"role must be one of {', '.join(ROLES)}")
            content = values.get("content", "")
            if not isinstance(content, str):
                raise _bad("content must be a string")
            check_text("content", content, CONTENT_CHARS_MAX)
            task_id = values.get("task_id")
            if task_id is not None:
                if not isinstance(task_id, str):
                    raise _bad("task_id must be a string")
                check_text("task_id", task_id, ID_CHARS_MAX)
                if task_id in state.tasks and state.tasks[task_id] is None:  # read: none
                    raise _bad(f"task_id: there is no task {task_id} in this session")
            row = {
                "id": cmd.new_id,
                "session_id": sid,
                "task_id": task_id,
                "role": role,
                "content": content,
                "streaming": bool(values.get("streaming", False)),
                "created_at": cmd.now_ms,
                "updated_at": cmd.now_ms,
                "rev": 1,
            }
            self._remember(state, cmd.new_id, _Msg(task_id, len(content)))
            mutation = Mutation(
                "insert",
                "messages",
                {"id": cmd.new_id},
                {k: v for k, v in row.items() if k != "id"},
            )
            events = self._events(
                state, cmd, "task:message", {"task_id": task_id, "message": row}, board=False
            )
            return WriteRequest(mutations=(mutation,), events=tuple(events)), row
        if not isinstance(cmd.id, str):
            raise _bad("id is required")
        mid = cmd.id
        known = state.messages.get(mid)
        if known is None:
            raise ServiceError("not_found", f"no message {mid} in session {state.session_id}")
        task_id = known.task_id
        if cmd.method == "stream":
            chunk = data.get("chunk")
            if not isinstance(chunk, str) or not chunk:
                raise _bad("chunk must be a non-empty string")
            check_text("chunk", chunk, CHUNK_CHARS_MAX)
            at = _chunk_at(data)
            if at is not None and at != known.length and not self.store.shared:
                # this actor plans every append of a single writer: it knows,
                # once the message's chunks on their way are answered (a
                # length that counts a chunk not yet durable would tell the
                # caller that chunk is there)
                if known.unanswered:
                    raise ServiceError(
                        "unavailable", f"message {mid}: a chunk is still being written; retry"
                    )
                raise _misplaced(mid, at, known.length)
            if known.length + len(chunk) > MESSAGE_CHARS_MAX:
                raise _too_long()
            offset = known.length
            known.length += len(chunk)
            known.unanswered += 1
            mutation = Mutation(
                "update",
                "messages",
                {"id": mid},
                {
                    # a shared store takes the offset (and checks the length)
                    # under the message row's lock: other daemons append too
                    "content": Append(chunk, at="offset", limit=MESSAGE_CHARS_MAX, expect=at),
                    "streaming": True,
                    "updated_at": cmd.now_ms,
                },
            )
            payload: dict[str, Any] = {
                "task_id": task_id,
                "message_id": mid,
                "chunk": chunk,
                "offset": offset,
            }
            events = self._events(state, cmd, "task:message", payload, board=False)
            return WriteRequest(mutations=(mutation,), events=tuple(events)), {
                "id": mid,
                "appended": len(chunk),
            }
        if cmd.method == "finish":
            # a chunk appends at its offset and leaves rev alone; finishing
            # is a change of the record: its rev moves
            if cmd.base_rev is not None and cmd.base_rev != known.rev:
                raise ServiceError(
                    "conflict",
                    f"stale base_rev {cmd.base_rev}; the message is at rev {known.rev}",
                    {"rev": known.rev},
                )
            new_rev = known.rev + 1
            expect = Expect("messages", {"id": mid}, "rev", known.rev)
            known.rev = new_rev
            mutation = Mutation(
                "update",
                "messages",
                {"id": mid},
                # its streamed parts folded into the row, once: read whole
                {
                    "streaming": False,
                    "updated_at": cmd.now_ms,
                    "rev": new_rev,
                    "content": Compact(),
                },
            )
            payload = {"task_id": task_id, "message_id": mid, "streaming": False, "rev": new_rev}
            events = self._events(state, cmd, "task:message", payload, board=False)
            request = WriteRequest(mutations=(mutation,), events=tuple(events), expect=(expect,))
            return request, {"id": mid, "streaming": False, "rev": new_rev}
        if cmd.method == "remove":
            self._remember(state, mid, None)
            mutation = Mutation("delete", "messages", {"id": mid})
            events = self._events(
                state,
                cmd,
                "task:message",
                {"task_id": task_id, "message_id": mid, "deleted": True},
                board=False,
            )
            return WriteRequest(mutations=(mutation,), events=tuple(events)), {"id": mid}
        raise ServiceError("unknown_method", f"messages.{cmd.method} does not exist")

    def describe(self, state: SessionState) -> dict[str, Any]:
        return {
            "session_id": state.session_id,
            "inflight": state.inflight,
            "writes": state.writes,
            "exists": state.row is not None,
        }


def _ask(
    writer: str,
    body: Any,
    reply_to: ReplyTo,
    answer: Any,
    touched: bool,
    again: Request | None = None,
    idempotency: tuple[str, str] | None = None,
) -> Effect:
    return Ask(
        writer,
        body,
        lambda result: _Written(reply_to, result, answer, touched, again, idempotency),
    )


def _believed(cmd: Command) -> bool:
    """Whether ``cmd``'s write is held by a precondition on the rev its
    session actor believes (not on the caller's base_rev).  A change of the
    session's row always is, on its fields' clocks (and on the rev, which a
    base_rev names too: see :func:`_refused_base_rev`)."""
    if cmd.service == "sessions":
        return cmd.method in _SESSION_CHANGES
    if cmd.base_rev is not None:
        return False
    if cmd.service == "messages":
        return cmd.method == "finish"
    return cmd.service == "tasks" and cmd.method in _TASK_CHANGES


def _held_by_base_rev(cmd: Command) -> bool:
    """Whether ``cmd``'s base_rev holds its write of the session's row: a
    patch of a strict field, any change under HTTP's ``If-Match``, or a
    remove (the other fields of a patch merge)."""
    if cmd.service != "sessions" or cmd.base_rev is None:
        return False
    if cmd.method == "remove" or (cmd.if_match and cmd.method in _SESSION_CHANGES):
        return True
    return (
        cmd.method in ("patch", "update")
        and isinstance(cmd.data, dict)
        and bool(STRICT_FIELDS & cmd.data.keys())
    )


def _refused_base_rev(cmd: Command, exc: StoreConflict) -> bool:
    """Whether the store refused the session's rev that ``cmd``'s base_rev
    names (the caller's view is stale: ``conflict``, as on one daemon)
    rather than only what the actor believed (its fields' clocks)."""
    return _held_by_base_rev(cmd) and exc.column == "rev"


def _chunk_at(data: dict[str, Any]) -> int | None:
    """A chunk's ``at``: the message's length it must land at (None: where
    the message ends)."""
    at = data.get("at")
    if at is None:
        return None
    if type(at) is not int or at < 0:
        raise _bad("at must be a non-negative integer", {"field": "at"})
    return at


def _misplaced(message_id: str, at: int, length: int) -> ServiceError:
    """A chunk sent for offset ``at`` of a message ``length`` characters
    long: refused, with the length (a chunk the caller sent before landed,
    or did not)."""
    return ServiceError(
        "conflict",
        f"message {message_id} is {length} characters long, not {at}",
        {"length": length},
    )


def _too_long() -> ServiceError:
    return _bad(
        f"the message would be longer than {MESSAGE_CHARS_MAX} characters",
        {"field": "chunk", "chars_max": MESSAGE_CHARS_MAX},
    )
