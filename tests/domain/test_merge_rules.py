"""The per-field merge rule (``agor_actors.domain.hlc``) and the strict
fields of a session patch, as pure functions: until now only the
simulator's sweep guarded them.

* the later stamp wins, field by field; a tie on wall time and counter is
  broken by the writer id, the same way everywhere;
* a writer whose clock runs ahead wins over one that wrote later by the
  wall clock (last writer wins *by stamp*), and the loser is told;
* the outcome does not depend on the order the writes arrive in: any
  order of the same stamped patches converges to the same values;
* strict fields (owner, lock, permissions) need ``base_rev`` equal to the
  session's rev, or the write is refused whole.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agor_actors.daemon import Principal, ServiceError
from agor_actors.domain.hlc import Hlc, HlcClock, merge_fields
from agor_actors.domain.session import (
    STRICT_FIELDS,
    Command,
    SessionBehaviour,
    SessionState,
)
from agor_actors.store import Expect, SqlStore


def _apply(
    row: dict[str, Any], clocks: dict[str, str], patch: dict[str, Any], stamp: Hlc
) -> tuple[list[str], list[str]]:
    """Merge and apply as the session actor does; (applied, lost) fields."""
    outcome = merge_fields(row, clocks, patch, stamp)
    for field, value in outcome.applied.items():
        row[field] = value
        clocks[field] = stamp.encode()
    return sorted(outcome.applied), [lost[0] for lost in outcome.lost]


# --------------------------------------------------------------------------- stamps


def test_stamps_order_by_wall_time_then_counter_then_writer() -> None:
    stamps = [
        Hlc(1_000, 0, "b"),
        Hlc(999, 7, "z"),
        Hlc(1_000, 1, "a"),
        Hlc(1_000, 0, "a"),
        Hlc(1_001, 0, "a"),
    ]
    assert sorted(stamps) == [
        Hlc(999, 7, "z"),
        Hlc(1_000, 0, "a"),
        Hlc(1_000, 0, "b"),
        Hlc(1_000, 1, "a"),
        Hlc(1_001, 0, "a"),
    ]


@given(
    a=st.tuples(st.integers(0, 10**13 - 1), st.integers(0, 999_999), st.text(max_size=8)),
    b=st.tuples(st.integers(0, 10**13 - 1), st.integers(0, 999_999), st.text(max_size=8)),
)
def test_the_encoding_round_trips_and_sorts_as_the_stamps_do(
    a: tuple[int, int, str], b: tuple[int, int, str]
) -> None:
    x, y = Hlc(*a), Hlc(*b)
    assert Hlc.decode(x.encode()) == x
    if x.wall_ms != y.wall_ms or x.counter != y.counter:
        # the stored text sorts like the stamp (zero-padded wall time and counter)
        assert (x.encode() < y.encode()) == (x < y)


def test_client_stamps_parse_or_are_refused() -> None:
    assert Hlc.parse_client([5, 2], "w") == Hlc(5, 2, "w")
    assert Hlc.parse_client({"wall_ms": 5}, "w") == Hlc(5, 0, "w")
    for bad in ([5], [5, -1], [-5, 0], ["5", 0], [5.0, 0], "5:0", None, {"counter": 1}):
        assert Hlc.parse_client(bad, "w") is None, bad


# --------------------------------------------------------------------------- merge_fields


def test_a_later_stamp_wins_and_the_overwritten_value_is_kept() -> None:
    row: dict[str, Any] = {"title": "old"}
    clocks = {"title": Hlc(100, 0, "a").encode()}
    outcome = merge_fields(row, clocks, {"title": "new"}, Hlc(101, 0, "b"))
    assert outcome.applied == {"title": "new"}
    assert outcome.overwritten == [("title", "old", clocks["title"])]
    assert outcome.lost == []


def test_an_older_stamp_loses_and_its_writer_is_told() -> None:
    row: dict[str, Any] = {"title": "current"}
    clocks = {"title": Hlc(200, 3, "a").encode()}
    outcome = merge_fields(row, clocks, {"title": "stale"}, Hlc(200, 2, "z"))
    assert outcome.applied == {}
    assert outcome.overwritten == []
    assert outcome.lost == [("title", "stale", "current", clocks["title"])]


def test_a_tie_on_time_and_counter_is_broken_by_the_writer_id() -> None:
    """Both orders of arrival give the same winner: the greater writer id."""
    for first, second in (("u1:c1", "u2:c9"), ("u2:c9", "u1:c1")):
        row: dict[str, Any] = {}
        clocks: dict[str, str] = {}
        _apply(row, clocks, {"title": first}, Hlc(5_000, 0, first))
        applied, lost = _apply(row, clocks, {"title": second}, Hlc(5_000, 0, second))
        assert row["title"] == "u2:c9"
        assert Hlc.decode(clocks["title"]).writer == "u2:c9"
        if second == "u2:c9":
            assert applied == ["title"] and lost == []
        else:
            assert applied == [] and lost == ["title"]


def test_the_very_same_stamp_again_does_not_overwrite() -> None:
    row: dict[str, Any] = {}
    clocks: dict[str, str] = {}
    stamp = Hlc(7, 0, "w")
    assert _apply(row, clocks, {"title": "a"}, stamp) == (["title"], [])
    assert _apply(row, clocks, {"title": "b"}, stamp) == ([], ["title"])
    assert row["title"] == "a"


def test_a_clock_that_runs_ahead_wins_over_a_later_write() -> None:
    """Skew: a writer 30 s ahead wrote first (by real time); the writer
    with a correct clock writes after it and still loses, field by field:
    fields the fast writer did not touch are taken."""
    row: dict[str, Any] = {"title": "t0", "agent": "a0"}
    clocks: dict[str, str] = {}
    ahead = Hlc(1_000_000 + 30_000, 0, "fast")
    _apply(row, clocks, {"title": "from the future"}, ahead)
    applied, lost = _apply(
        row, clocks, {"title": "now", "agent": "mine"}, Hlc(1_000_000 + 10, 0, "slow")
    )
    assert applied == ["agent"] and lost == ["title"]
    assert row == {"title": "from the future", "agent": "mine"}


def test_a_field_without_a_stamp_takes_any_write_and_fields_merge_independently() -> None:
    row: dict[str, Any] = {"title": "x", "status": "idle", "agent": "a"}
    clocks = {"title": Hlc(10, 0, "a").encode(), "status": Hlc(30, 0, "a").encode()}
    outcome = merge_fields(
        row, clocks, {"agent": "b", "status": "running", "title": "y"}, Hlc(20, 0, "b")
    )
    assert outcome.applied == {"agent": "b", "title": "y"}  # agent had no stamp
    assert [lost[0] for lost in outcome.lost] == ["status"]
    # a write of the same value overwrites nothing worth keeping
    same = merge_fields({"title": "y"}, {}, {"title": "y"}, Hlc(1, 0, "c"))
    assert same.applied == {"title": "y"} and same.overwritten == []


_writers = st.sampled_from(["u1:c1", "u1:c2", "u2:c1", "u3:c7"])
_writes = st.lists(
    st.tuples(
        st.integers(0, 3),  # wall ms: few values, so ties are common
        st.integers(0, 2),  # counter
        _writers,
        st.dictionaries(st.sampled_from(["title", "status", "agent"]), st.integers(0, 9)),
    ),
    min_size=1,
    max_size=8,
    unique_by=lambda write: write[:3],  # a writer never stamps twice the same
)


@settings(max_examples=200, deadline=None)
@given(writes=_writes, data=st.data())
def test_any_order_of_arrival_converges_to_the_greatest_stamp_per_field(
    writes: list[tuple[int, int, str, dict[str, int]]], data: st.DataObject
) -> None:
    order = data.draw(st.permutations(range(len(writes))))
    results = []
    for indices in (range(len(writes)), order):
        row: dict[str, Any] = {}
        clocks: dict[str, str] = {}
        for i in indices:
            wall, counter, writer, patch = writes[i]
            _apply(row, clocks, patch, Hlc(wall, counter, writer))
        results.append((row, clocks))
    assert results[0] == results[1]
    row, clocks = results[0]
    # and the winner of each field is the write with the greatest stamp for it
    for field in ("title", "status", "agent"):
        stamped = [
            (Hlc(wall, counter, writer), patch[field])
            for wall, counter, writer, patch in writes
            if field in patch
        ]
        if not stamped:
            assert field not in row
            continue
        best = max(stamped, key=lambda item: item[0])
        assert Hlc.decode(clocks[field]) == best[0]
        assert row[field] == best[1]


# --------------------------------------------------------------------------- HlcClock


@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("tick"), st.integers(0, 50)),
            st.tuples(st.just("observe"), st.integers(0, 80), st.integers(0, 3)),
        ),
        max_size=30,
    )
)
def test_a_clock_ticks_after_everything_it_saw_even_when_the_wall_goes_back(
    steps: list[tuple[Any, ...]],
) -> None:
    clock = HlcClock(node="session:s")
    seen: list[Hlc] = []
    for step in steps:
        if step[0] == "tick":
            stamp = clock.tick(step[1], "w")
            assert all((stamp.wall_ms, stamp.counter) > (s.wall_ms, s.counter) for s in seen)
            seen.append(stamp)
        else:
            remote = Hlc(step[1], step[2], "remote")
            clock.observe(remote, 0)
            seen.append(remote)


# --------------------------------------------------------------------------- strict fields


def _session(rev: int = 3) -> SessionState:
    row = {
        "id": "s1",
        "title": "t",
        "status": "idle",
        "agent": None,
        "git_state": None,
        "board_id": None,
        "owner_id": "u1",
        "locked_by": None,
        "permissions": None,
        "created_at": 1,
        "updated_at": 1,
        "rev": rev,
        "clocks": {},
    }
    return SessionState(session_id="s1", row=row, clock=HlcClock(node="session:s1"))


def _patch(data: dict[str, Any], base_rev: int | None, *, now_ms: int = 50) -> Command:
    return Command(
        principal=Principal("u2", "two"),
        connection_id="c2",
        service="sessions",
        method="patch",
        id="s1",
        data=data,
        query=None,
        temp_id=None,
        base_rev=base_rev,
        now_ms=now_ms,
        new_id="unused",
    )


@pytest.mark.parametrize("field", sorted(STRICT_FIELDS))
def test_a_strict_field_needs_the_current_base_rev(store: SqlStore, field: str) -> None:
    behaviour = SessionBehaviour("s1", store)
    value: Any = {"edit": ["u2"]} if field == "permissions" else "u2"
    for base_rev, why in ((None, "need base_rev"), (2, "stale base_rev 2"), (4, "stale")):
        state = _session(rev=3)
        with pytest.raises(ServiceError) as refused:
            patch = {field: value, "title": "x"}
            behaviour._patch_session(state, _patch(patch, base_rev), patch)
        assert refused.value.code == "conflict"
        assert why in str(refused.value)
        assert refused.value.data["rev"] == 3
        assert state.row is not None and state.row["rev"] == 3 and state.row["title"] == "t"
    state = _session(rev=3)
    request, answer = behaviour._patch_session(
        state, _patch({field: value, "title": "x"}, 3), {field: value, "title": "x"}
    )
    # the store checks the rev again at commit time (another writer may
    # have moved it): the request carries the precondition
    assert request.expect == (Expect("sessions", {"id": "s1"}, "rev", 3),)
    assert answer[field] == value and answer["rev"] == 4


def test_plain_fields_need_no_base_rev_and_carry_no_precondition(store: SqlStore) -> None:
    behaviour = SessionBehaviour("s1", store)
    state = _session(rev=3)
    request, answer = behaviour._patch_session(state, _patch({"title": "x"}, None), {"title": "x"})
    assert request.expect == ()
    assert answer["title"] == "x" and answer["rev"] == 4


def test_a_losing_patch_is_answered_with_what_it_lost(store: SqlStore) -> None:
    behaviour = SessionBehaviour("s1", store)
    state = _session()
    assert state.row is not None
    state.row["clocks"] = {"title": Hlc(10_000, 0, "u9:c9").encode()}
    command = Command(
        principal=Principal("u2", "two"),
        connection_id="c2",
        service="sessions",
        method="patch",
        id="s1",
        data={"title": "mine", "agent": "bot"},
        query={"hlc": [9_999, 5]},
        temp_id=None,
        base_rev=None,
        now_ms=50,
        new_id="unused",
    )
    request, answer = behaviour._patch_session(state, command, {"title": "mine", "agent": "bot"})
    assert answer["_lost"] == [{"field": "title", "value": "mine", "current": "t"}]
    assert answer["title"] == "t" and answer["agent"] == "bot"
    # the lost value is kept in history, stamped with the writer that lost
    (history,) = [h for h in request.history if h.field == "title"]
    assert history.value == "mine" and history.writer == "u2:c2"
