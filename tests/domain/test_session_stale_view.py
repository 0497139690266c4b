"""A session actor on a shared store (several daemons, each with its own
actor for the session) as a pure behaviour: when the store refuses the rev
it believed, it loads the record again and plans the writes once more, in
the order it first planned them; a base_rev it does not know makes it look
again before answering."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import outcome
import pytest

from agor_actors.domain import Principal
from agor_actors.domain.hlc import HlcClock
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
