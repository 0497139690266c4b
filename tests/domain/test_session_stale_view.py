"""A session actor on a shared store (several daemons, each with its own
actor for the session) as a pure behaviour: when the store refuses the rev
it believed, it loads the record again and plans the writes once more, in
the order it first planned them; a base_rev it does not know makes it look
again before answering.  The same for the session's own row, whose fields
merge against the clocks the store holds."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import outcome
import pytest

from agor_actors.domain import Principal
from agor_actors.domain.hlc import Hlc, HlcClock
from agor_actors.domain.session import (
    Command,
    SessionBehaviour,
    SessionState,
    _Loaded,
)
from agor_actors.runtime import Ask, Await, Reply, Request
from agor_actors.store import SqlStore, StoreConflict, WriteResult, open_store
from agor_actors.world import real_world

OWNER = Principal("owner", "owner", True)


@pytest.fixture
def shared(tmp_path: pathlib.Path) -> Iterator[SqlStore]:
    store = open_store(f"sqlite:///{tmp_path / 'agor.db'}", new_epoch=lambda: "e", shared=True)
    try:
        yield store
    finally:
        store.close()


def task(rev: int, status: str = "created") -> dict[str, Any]:
    return {
        "id": "t",
        "session_id": "s",
        "prompt": "p",
        "status": status,
        "result": None,
        "error": None,
        "created_at": 1,
        "updated_at": 1,
        "rev": rev,
    }


def actor(store: SqlStore) -> tuple[SessionBehaviour, SessionState]:
    behaviour = SessionBehaviour("s", store)
    behaviour._blocking = real_world().blocking  # what init sets
    row = {"id": "s", "title": "", "status": "idle", "rev": 1, "clocks": {}}
    state = SessionState(session_id="s", row=row, clock=HlcClock(node="session:s"))
    state.tasks["t"] = task(1)  # what this daemon last knew
    return behaviour, state


def command(method: str, base_rev: int | None = None, **data: Any) -> Command:
    return Command(OWNER, "c", "tasks", method, "t", data, None, None, base_rev, 5, "new")


def asks(effects: Any) -> list[Ask]:
    return [e for e in effects if isinstance(e, Ask)]


def planned(ask: Ask) -> tuple[Any, int, int]:
    """The status a task write sets, the rev it expects, the rev it writes."""
    request = ask.body.request
    (mutation,) = request.mutations
    (expect,) = request.expect
    return mutation.values["status"], expect.expected, mutation.values["rev"]


def test_writes_refused_on_a_stale_rev_run_again_in_their_order(shared: SqlStore) -> None:
    behaviour, state = actor(shared)
    start, complete = object(), object()
    (first,) = asks(behaviour.handle(state, Request(command("start"), start), 0.0))
    (second,) = asks(behaviour.handle(state, Request(command("complete", result="r"), complete), 0))
    assert [planned(a) for a in (first, second)] == [("running", 1, 2), ("completed", 2, 3)]
    # another daemon moved the task to rev 3: both are refused, neither answered
    stale = StoreConflict("tasks", {"id": "t"}, "rev", 1, 3)
    assert behaviour.handle(state, first.then(outcome.Error(stale)), 0.1) == []
    stale = StoreConflict("tasks", {"id": "t"}, "rev", 2, 3)
    effects = behaviour.handle(state, second.then(outcome.Error(stale)), 0.1)
    assert [type(e) for e in effects] == [Await]  # the task is loaded again
    again = asks(behaviour.handle(state, _Loaded("tasks", "t", outcome.Value(task(3))), 0.2))
    assert [planned(a) for a in again] == [("running", 3, 4), ("completed", 4, 5)]
    replies = [
        e
        for a in again
        for e in behaviour.handle(state, a.then(outcome.Value(WriteResult(()))), 0.3)
        if isinstance(e, Reply)
    ]
    assert [(r.to, r.value["rev"]) for r in replies] == [(start, 4), (complete, 5)]


def test_a_base_rev_it_does_not_know_makes_it_look_again(shared: SqlStore) -> None:
    behaviour, state = actor(shared)
    caller = object()
    effects = behaviour.handle(state, Request(command("stop", base_rev=3), caller), 0.0)
    assert [type(e) for e in effects] == [Await]  # not "stale" from memory
    (ask,) = asks(behaviour.handle(state, _Loaded("tasks", "t", outcome.Value(task(3))), 0.1))
    assert planned(ask) == ("stopped", 3, 4)
    (done,) = behaviour.handle(state, ask.then(outcome.Value(WriteResult(()))), 0.1)
    assert isinstance(done, Reply) and done.value["rev"] == 4
    # a base_rev older than what the store says is stale, as on one daemon
    effects = behaviour.handle(state, Request(command("stop", base_rev=2), caller), 0.2)
    assert [type(e) for e in effects] == [Await]
    (refused,) = behaviour.handle(state, _Loaded("tasks", "t", outcome.Value(task(4))), 0.3)
    assert isinstance(refused, Reply) and refused.error is not None
    assert refused.error.code == "conflict"


# ---------------------------------------------------------------- the session's own row


def session_row(rev: int, title: str, clocks: dict[str, str]) -> dict[str, Any]:
    return {
        "id": "s",
        "title": title,
        "status": "idle",
        "agent": None,
        "git_state": None,
        "board_id": None,
        "owner_id": "owner",
        "locked_by": None,
        "permissions": None,
        "created_at": 1,
        "updated_at": 1,
        "rev": rev,
        "clocks": clocks,
    }


def session_command(
    method: str,
    data: dict[str, Any],
    *,
    base_rev: int | None = None,
    hlc: tuple[int, int] | None = None,
) -> Command:
    query = {"hlc": list(hlc)} if hlc is not None else None
    return Command(OWNER, "c", "sessions", method, "s", data, query, None, base_rev, 5, "new")


def stamp(wall_ms: int, writer: str = "owner:c") -> str:
    return Hlc(wall_ms, 0, writer).encode()


def held_by(ask: Ask) -> dict[str, Any]:
    """What a write of the session's row expects of it: column -> value."""
    request = ask.body.request
    assert all(e.table == "sessions" and e.key == {"id": "s"} for e in request.expect)
    return {e.column: e.expected for e in request.expect}


def sets(ask: Ask) -> dict[str, Any]:
    (mutation,) = ask.body.request.mutations
    return {k: v for k, v in mutation.values.items() if k not in ("clocks", "updated_at")}


def test_a_session_write_refused_on_a_stale_row_merges_again_against_the_stores(
    shared: SqlStore,
) -> None:
    behaviour, state = actor(shared)
    state.row = session_row(1, "first", {"title": stamp(1000)})
    rename, status = object(), object()
    patch = session_command("patch", {"title": "mine"}, hlc=(3000, 0))
    (first,) = asks(behaviour.handle(state, Request(patch, rename), 0.0))
    running = session_command("set_status", {"status": "running"})
    (second,) = asks(behaviour.handle(state, Request(running, status), 0.0))
    # each held by the row it was merged against: rev and fields' clocks
    assert held_by(first) == {"rev": 1, "clocks": {"title": stamp(1000)}}
    assert sets(first) == {"title": "mine", "rev": 2}
    assert held_by(second) == {"rev": 2, "clocks": {"title": stamp(3000)}}
    # another daemon wrote rev 2 meanwhile, a newer title: the first is
    # refused on the rev, the second on the clocks (the rev it counted on
    # is the other daemon's); neither is answered, the row is loaded again
    key = {"id": "s"}
    refused = StoreConflict("sessions", key, "rev", 1, 2)
    assert behaviour.handle(state, first.then(outcome.Error(refused)), 0.1) == []
    theirs = {"title": stamp(4000, "other:d")}
    refused = StoreConflict("sessions", key, "clocks", {"title": stamp(3000)}, theirs)
    effects = behaviour.handle(state, second.then(outcome.Error(refused)), 0.1)
    assert [type(e) for e in effects] == [Await]
    fresh = session_row(2, "theirs", theirs)
    again = asks(behaviour.handle(state, _Loaded("sessions", "s", outcome.Value(fresh)), 0.2))
    # planned again in their order, merged against the store's clocks: the
    # older rename loses to the other daemon's
    assert [held_by(a) for a in again] == [
        {"rev": 2, "clocks": theirs},
        {"rev": 3, "clocks": theirs},
    ]
    assert [sets(a) for a in again] == [{"rev": 3}, {"status": "running", "rev": 4}]
    effects = [
        e for a in again for e in behaviour.handle(state, a.then(outcome.Value(WriteResult(()))), 1)
    ]
    assert all(isinstance(e, Reply) for e in effects)  # no Stop: the actor goes on
    assert [e.to for e in effects] == [rename, status]
    lost, done = (e.value for e in effects)
    assert lost["title"] == "theirs" and lost["rev"] == 3
    assert lost["_lost"] == [{"field": "title", "value": "mine", "current": "theirs"}]
    assert done["status"] == "running" and done["title"] == "theirs" and done["rev"] == 4


def test_a_twice_refused_session_write_is_a_conflict(shared: SqlStore) -> None:
    behaviour, state = actor(shared)
    state.row = session_row(1, "first", {})
    caller = object()
    patch = session_command("patch", {"title": "mine"})
    (ask,) = asks(behaviour.handle(state, Request(patch, caller), 0.0))
    refused = StoreConflict("sessions", {"id": "s"}, "rev", 1, 2)
    (load,) = behaviour.handle(state, ask.then(outcome.Error(refused)), 0.1)
    assert isinstance(load, Await)
    fresh = outcome.Value(session_row(2, "theirs", {}))
    (again,) = asks(behaviour.handle(state, _Loaded("sessions", "s", fresh), 0.2))
    assert held_by(again) == {"rev": 2, "clocks": {}}
    refused = StoreConflict("sessions", {"id": "s"}, "rev", 2, 3)
    (answer,) = behaviour.handle(state, again.then(outcome.Error(refused)), 0.3)
    assert isinstance(answer, Reply) and answer.error is not None
    assert answer.error.code == "conflict"
    # not stopped: the next write loads the row first
    effects = behaviour.handle(state, Request(patch, caller), 0.4)
    assert [type(e) for e in effects] == [Await]


def test_a_strict_patch_with_a_base_rev_it_does_not_know_looks_again(shared: SqlStore) -> None:
    behaviour, state = actor(shared)
    state.row = session_row(1, "first", {})
    caller = object()
    lock = session_command("patch", {"locked_by": "u"}, base_rev=3)
    effects = behaviour.handle(state, Request(lock, caller), 0.0)
    assert [type(e) for e in effects] == [Await]  # not "stale" from memory
    fresh = outcome.Value(session_row(3, "theirs", {}))
    (ask,) = asks(behaviour.handle(state, _Loaded("sessions", "s", fresh), 0.1))
    assert held_by(ask) == {"rev": 3, "clocks": {}}
    assert sets(ask) == {"locked_by": "u", "rev": 4}
    (done,) = behaviour.handle(state, ask.then(outcome.Value(WriteResult(()))), 0.2)
    assert isinstance(done, Reply) and done.value["rev"] == 4
    # the caller's base_rev is this actor's, but the store moved on: that
    # is the caller's stale view, a conflict (not run again)
    unlock = session_command("patch", {"locked_by": None}, base_rev=4)
    (ask,) = asks(behaviour.handle(state, Request(unlock, caller), 0.3))
    refused = StoreConflict("sessions", {"id": "s"}, "rev", 4, 5)
    (answer,) = behaviour.handle(state, ask.then(outcome.Error(refused)), 0.4)
    assert isinstance(answer, Reply) and answer.error is not None
    assert answer.error.code == "conflict" and answer.error.data == {"current": 5}


def test_one_daemon_merges_against_its_memory_without_a_precondition(
    tmp_path: pathlib.Path,
) -> None:
    single = open_store(f"sqlite:///{tmp_path / 'one.db'}", new_epoch=lambda: "e")
    try:
        behaviour, state = actor(single)
        state.row = session_row(1, "first", {})
        rename = Request(session_command("patch", {"title": "t"}), object())
        (ask,) = asks(behaviour.handle(state, rename, 0.0))
        assert ask.body.request.expect == ()  # the hot path: no extra statement
    finally:
        single.close()


def test_a_write_planned_on_a_loaded_row_orders_after_its_clocks(shared: SqlStore) -> None:
    """Another daemon's clock runs ahead of this one's: its title carries a
    stamp from this daemon's future.  A rename planned after this actor
    loaded that row is the later write (the actor's clock observes the
    clocks it loads, as a hybrid logical clock does), so it wins the
    merge instead of being recorded as lost."""
    behaviour, state = actor(shared)
    state.row = session_row(1, "first", {})
    caller = object()
    rename = session_command("patch", {"title": "mine"})  # stamped here, at 5 ms
    (ask,) = asks(behaviour.handle(state, Request(rename, caller), 0.0))
    refused = StoreConflict("sessions", {"id": "s"}, "rev", 1, 2)
    (load,) = behaviour.handle(state, ask.then(outcome.Error(refused)), 0.1)
    assert isinstance(load, Await)
    theirs = {"title": stamp(4000, "other:d")}
    fresh = outcome.Value(session_row(2, "theirs", theirs))
    (again,) = asks(behaviour.handle(state, _Loaded("sessions", "s", fresh), 0.2))
    assert sets(again) == {"title": "mine", "rev": 3}
    (mutation,) = again.body.request.mutations
    assert Hlc.decode(mutation.values["clocks"]["title"]) > Hlc.decode(theirs["title"])
    (done,) = behaviour.handle(state, again.then(outcome.Value(WriteResult(()))), 0.3)
    assert isinstance(done, Reply) and done.value["title"] == "mine"
    assert "_lost" not in done.value
