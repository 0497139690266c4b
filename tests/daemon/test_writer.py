"""The store writer's pure parts: coalescing streamed chunks, and the
offsets of chunks planned past a refused one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import outcome
import pytest

from agor_actors.runtime import Await, AwaitInline, Reply, Request, StartTimer
from agor_actors.store import (
    Append,
    EventDraft,
    Flush,
    Mutation,
    SqlStore,
    StoreError,
    StoreIntegrityError,
    StoreUnavailable,
    StoreWriter,
    Write,
    WriteRequest,
    WriteResult,
    open_store,
)
from agor_actors.store._writer import CHECKPOINT_GROUPS, WriterState, coalesce, runs
from agor_actors.world import simulated_world


def chunk(
    text: str,
    ts: int,
    offset: int = 0,
    *,
    m: str = "m",
    s: str = "s",
    expect: int | None = None,
) -> Write:
    return Write(
        WriteRequest(
            mutations=(
                Mutation(
                    "update",
                    "messages",
                    {"id": m},
                    {"content": Append(text, expect=expect), "updated_at": ts},
                ),
            ),
            events=(
                EventDraft(
                    f"session:{s}",
                    "task:message",
                    {"message_id": m, "chunk": text, "offset": offset},
                    ts,
                ),
            ),
        ),
        coalesce_key=f"message:{m}",
    )


def other(room: str | None, row: str | None = None) -> Write:
    return Write(
        WriteRequest(
            mutations=(Mutation("update", "messages", {"id": row}, {"streaming": False}),)
            if row
            else (),
            events=(EventDraft(room, "task:updated", {}, 1),) if room else (),
        )
    )


def grouped(*writes: Write) -> list[tuple[int, ...]]:
    return runs(writes, list(range(len(writes))))


def test_runs_merge_chunks_of_one_message_across_other_sessions_writes() -> None:
    # 3 sessions streaming at once: each message's chunks become one run
    assert grouped(
        chunk("a", 1, m="m1", s="s1"),
        chunk("b", 1, m="m2", s="s2"),
        chunk("c", 1, m="m3", s="s3"),
        chunk("d", 2, m="m1", s="s1"),
        chunk("e", 2, m="m2", s="s2"),
        other("board:b"),  # touches none of them
        chunk("f", 3, m="m1", s="s1"),
    ) == [(0, 3, 6), (1, 4), (2,), (5,)]


def test_runs_keep_the_order_of_what_a_room_or_a_row_sees() -> None:
    # another write to the same room (a task update in session s1) comes
    # between: the chunk after it starts a new run, after it
    assert grouped(
        chunk("a", 1, m="m1", s="s1"),
        other("session:s1"),
        chunk("b", 2, m="m1", s="s1"),
    ) == [(0,), (1,), (2,)]
    # two messages of one session interleaved: no chunk jumps the other's
    assert grouped(
        chunk("a", 1, m="m1", s="s1"),
        chunk("x", 1, m="m2", s="s1"),
        chunk("b", 2, m="m1", s="s1"),
        chunk("y", 2, m="m2", s="s1"),
    ) == [(0,), (1,), (2,), (3,)]
    # a write to the message's row without an event in its room
    assert grouped(
        chunk("a", 1, m="m1", s="s1"),
        other(None, row="m1"),
        chunk("b", 2, m="m1", s="s1"),
        chunk("c", 3, m="m1", s="s1"),
    ) == [(0,), (1,), (2, 3)]
    # a write that touches nothing ends every run
    assert grouped(
        chunk("a", 1, m="m1", s="s1"),
        other(None),
        chunk("b", 2, m="m1", s="s1"),
    ) == [(0,), (1,), (2,)]


def test_runs_merge_chunks_that_name_their_offsets_only_where_they_follow() -> None:
    # each merged request lands at its first chunk's offset: a chunk that
    # names another offset (a resend, one past a gap) starts a run of its own
    assert grouped(
        chunk("ab", 1, expect=0),
        chunk("cd", 2, expect=2),
        chunk("ab", 3, expect=0),  # sent again
        chunk("ef", 4, expect=4),  # follows "cd", but the run now ends at 2
        chunk("gh", 5, expect=6),
        chunk("ij", 6),  # names none: joins any run
    ) == [(0, 1), (2,), (3, 4, 5)]
    # a run whose end is not known (a chunk without one) takes no offset
    assert grouped(chunk("ab", 1), chunk("cd", 2, expect=2)) == [(0,), (1,)]
    merged = coalesce([chunk("ef", 4, expect=4), chunk("gh", 5, expect=6)])
    assert merged.mutations[0].values["content"] == Append("efgh", expect=4)


def test_coalesce_concatenates_appends_and_merges_events() -> None:
    merged = coalesce([chunk("Hel", 1, 7), chunk("lo ", 2, 10), chunk("you", 3, 13)])
    (mutation,) = merged.mutations
    assert mutation.values["content"] == Append("Hello you")
    assert mutation.values["updated_at"] == 3  # other values: last wins
    (event,) = merged.events
    assert event.data == {"message_id": "m", "chunk": "Hello you", "offset": 7}
    assert event.merge_count == 3 and event.ts == 3


class _Refusing:
    """A store that refuses the chunks whose text is in ``refuse`` (as the
    database refuses a row that breaks a constraint) and records what it
    was asked to commit."""

    local = True  # as SqlStore.local: in this process, no network

    def __init__(self, refuse: set[str]) -> None:
        self.refuse = refuse
        self.committed: list[WriteRequest] = []

    def commit(self, requests: list[WriteRequest]) -> list[WriteResult | StoreError]:
        out: list[WriteResult | StoreError] = []
        for request in requests:
            if any(e.data.get("chunk") in self.refuse for e in request.events):
                out.append(StoreIntegrityError("refused"))
            else:
                self.committed.append(request)
                out.append(WriteResult(()))
        return out


async def test_chunks_planned_past_a_refused_one_have_their_offsets_moved_back() -> None:
    """A session plans its chunks' offsets before the store answers: when
    one is refused, the ones already on their way count it.  The writer
    moves their offsets back by what was refused, for that key only (the
    session plans later chunks under a new key once it knows)."""
    store = _Refusing({"BAD"})
    writer = StoreWriter(store, simulated_world(1))  # type: ignore[arg-type]
    state = WriterState()

    async def group(*writes: Write) -> None:
        for write in writes:
            writer.handle(state, Request(write, None), 0.0)  # type: ignore[arg-type]
        (effect,) = writer.caught_up(state, 0.0)
        assert isinstance(effect, AwaitInline)
        writer.handle(state, effect.then(await outcome.acapture(effect.fn)), 0.0)

    await group(chunk("ab", 1, 0))
    await group(chunk("BAD", 2, 2), other("board:b", row="m"))  # refused alone
    await group(chunk("cd", 3, 5), chunk("ef", 4, 7))  # planned counting "BAD"
    await group(
        Write(chunk("gh", 5, 4).request, coalesce_key="message:m:1")  # planned after: as it is
    )
    offsets = [e.data["offset"] for r in store.committed for e in r.events if "chunk" in e.data]
    assert offsets == [0, 2, 4]
    assert state.shifts == {"message:m": 3}
    # a chunk that names its offset is not moved: the store lands it and
    # checks the offset there (refused: "BAD" took no place)
    await group(chunk("ij", 6, 9, expect=9))
    last = store.committed[-1]
    assert last.land and last.events[0].data["offset"] == 9


class _AnswerLost:
    """A real SQLite store whose commit ``lose_at`` (counted from 1) fails
    as a whole with :class:`StoreUnavailable`: after committing (the
    answer lost) or instead of it."""

    local = True

    def __init__(self, store: SqlStore, lose_at: int, *, committed: bool) -> None:
        self.store = store
        self.lose_at = lose_at
        self.committed = committed
        self.commits = 0
        self.checkpoints = False

    def commit(self, requests: list[WriteRequest]) -> list[WriteResult | StoreError]:
        self.commits += 1
        if self.commits != self.lose_at:
            return self.store.commit(requests)
        if self.committed:
            self.store.commit(requests)
        raise StoreUnavailable("the connection dropped during COMMIT")


@pytest.mark.parametrize("committed", [False, True], ids=["not_committed", "answer_lost"])
async def test_chunks_planned_past_one_of_unknown_outcome_land_where_the_row_ends(
    committed: bool,
) -> None:
    """A group fails as a whole (the connection dropped during its
    COMMIT): its chunk may be in the store or not.  Chunks of the same
    message already on their way were planned counting it, and no shift
    can be right in both cases: they land where the message's content
    ends when they commit, so each event's offset is where its text is."""
    store = open_store("sqlite://", new_epoch=lambda: "e1")
    lossy = _AnswerLost(store, lose_at=3, committed=committed)
    writer = StoreWriter(lossy, simulated_world(1))  # type: ignore[arg-type]
    state = WriterState()
    errors: list[BaseException] = []

    async def group(*writes: Write) -> None:
        for write in writes:
            writer.handle(state, Request(write, None), 0.0)  # type: ignore[arg-type]
        (effect,) = writer.caught_up(state, 0.0)
        assert isinstance(effect, AwaitInline)
        for out in writer.handle(state, effect.then(await outcome.acapture(effect.fn)), 0.0):
            if isinstance(out, Reply) and out.error is not None:
                errors.append(out.error)

    def stamped(text: str, ts: int, offset: int, key: str = "message:m") -> Write:
        write = chunk(text, ts, offset)
        (mutation,) = write.request.mutations
        values = {**mutation.values, "content": Append(text, at="offset")}
        request = attrs.evolve(write.request, mutations=(attrs.evolve(mutation, values=values),))
        return Write(request, coalesce_key=key)

    new_message = Mutation(
        "insert",
        "messages",
        {"id": "m"},
        {"session_id": "s", "role": "assistant", "content": "", "created_at": 1, "updated_at": 1},
    )
    new_session = Mutation("insert", "sessions", {"id": "s"}, {"created_at": 1, "updated_at": 1})
    await group(Write(WriteRequest(mutations=(new_session, new_message))))
    await group(stamped("ab", 2, 0))
    await group(stamped("cd", 3, 2))  # the group of unknown outcome
    assert len(errors) == 1 and isinstance(errors[0], StoreUnavailable)
    await group(stamped("ef", 4, 4), stamped("gh", 5, 6))  # planned counting "cd"
    content = store.get("messages", "m")["content"]  # type: ignore[index]
    assert content == ("abcdefgh" if committed else "abefgh")
    for event in store.events_since("session:s", 0, limit=100):
        text = event.data["chunk"]
        assert content[event.data["offset"] :].startswith(text), (event.data, content)
    assert "message:m" in state.uncertain and "message:m" not in state.shifts
    store.close()


def test_a_busy_writer_lingers_and_an_idle_one_commits_at_once() -> None:
    """With ``linger_s``, a writer that committed a group within ``BUSY_S``
    waits that long after its mailbox drained (what arrives meanwhile joins
    the group); one idle for longer commits at once."""
    world = simulated_world(seed=1)
    writer = StoreWriter(store=None, world=world, linger_s=0.002)  # type: ignore[arg-type]
    state = WriterState()

    def write(text: str) -> Request:
        return Request(chunk(text, 1, m=text), None)  # type: ignore[arg-type]

    writer.handle(state, write("a"), 10.0)
    (first,) = writer.caught_up(state, 10.0)  # idle: at once
    assert isinstance(first, AwaitInline)
    writer.handle(state, write("b"), 10.01)
    (timer,) = writer.caught_up(state, 10.01)  # busy: a group started 10 ms ago
    assert isinstance(timer, StartTimer) and timer.delay_s == 0.002
    writer.handle(state, write("c"), 10.011)
    assert writer.caught_up(state, 10.011) == ()  # already lingering
    (group,) = writer.handle(state, timer.msg, 10.012)
    assert isinstance(group, AwaitInline) and state.writes == 3 and not state.pending
    writer.handle(state, write("d"), 10.2)
    (late,) = writer.caught_up(state, 10.2)  # 188 ms after the last group: idle again
    assert isinstance(late, AwaitInline)
    assert StoreWriter(store=None, world=world).linger_s == 0  # type: ignore[arg-type]


def test_a_messages_chunks_in_two_runs_are_cut_into_two_groups() -> None:
    """Offsets are moved back by what a group's refused chunks held only
    from the next group on, so one group never holds two runs of one
    message: the write that would start the second run waits."""
    world = simulated_world(seed=1)
    writer = StoreWriter(store=None, world=world)  # type: ignore[arg-type]
    state = WriterState()
    for write in (
        chunk("a", 1, m="m1", s="s1"),
        other("session:s1"),  # the room in between: a's run is closed
        chunk("b", 2, m="m1", s="s1"),
        chunk("c", 2, m="m2", s="s2"),
    ):
        writer.handle(state, Request(write, None), 1.0)  # type: ignore[arg-type]
    (group,) = writer.caught_up(state, 1.0)
    assert isinstance(group, AwaitInline)
    assert state.writes == 2 and [r.body for r in state.pending] == [
        chunk("b", 2, m="m1", s="s1"),
        chunk("c", 2, m="m2", s="s2"),
    ]


async def test_a_sqlite_files_log_is_checkpointed_beside_the_commits(tmp_path: Path) -> None:
    """Every ``CHECKPOINT_GROUPS`` groups the writer copies the file's
    write-ahead log back into the database (an awaited effect, in a worker
    thread for the daemon: no commit pays for it), one at a time; an
    in-memory store has no log and is never asked."""
    epochs = iter(range(1_000_000))

    def new_epoch() -> str:
        return f"e{next(epochs)}"

    for url, expected in ((f"sqlite:///{tmp_path / 'a.db'}", 2), ("sqlite://", 0)):
        store = open_store(url, new_epoch=new_epoch)
        writer = StoreWriter(store, simulated_world(1))
        state = WriterState()
        started: list[int] = []  # the groups after which a checkpoint began
        running: Await | None = None
        restarted = -1
        for n in range(2 * CHECKPOINT_GROUPS + 1):
            write = Write(WriteRequest(events=(EventDraft("r", "x", {"n": n}, n),)))
            writer.handle(state, Request(write, None), 0.0)  # type: ignore[arg-type]
            (commit,) = writer.caught_up(state, 0.0)
            assert isinstance(commit, AwaitInline)
            effects = writer.handle(state, commit.then(await outcome.acapture(commit.fn)), 0.0)
            for effect in effects:
                if isinstance(effect, Await):
                    assert running is None, "a checkpoint began while another ran"
                    running = effect
                    started.append(n)
            if running is not None and n == started[-1] + 5:
                # it ends five groups later: the log as it stood was copied
                result = await outcome.acapture(running.fn)
                assert isinstance(result, outcome.Value)
                frames, copied = result.value
                assert frames > 0 and copied == frames
                # a group committed beside it (the copy ran in a thread)
                extra = WriteRequest(events=(EventDraft("r", "y", {}, n),))
                assert isinstance(store.commit([extra])[0], WriteResult)
                # then, between two groups, what came meanwhile: all of it
                (tail,) = writer.handle(state, running.then(result), 0.0)
                assert isinstance(tail, AwaitInline) and writer.describe(state)["checkpoints"] == 0
                grown = await outcome.acapture(tail.fn)
                assert isinstance(grown, outcome.Value)
                assert grown.value[0] == grown.value[1]  # all of it copied
                assert writer.handle(state, tail.then(grown), 0.0) == ()
                assert writer.describe(state)["checkpoints"] == 1
                running = None
                restarted = n + 1
            if n == restarted:
                # and the next group started the log over
                log_frames = store.checkpoint()
                assert log_frames is not None and log_frames[0] < frames
        expected_at = [CHECKPOINT_GROUPS - 1, 2 * CHECKPOINT_GROUPS - 1]
        assert started == (expected_at if expected else [])
        assert writer.describe(state)["checkpoints"] == (1 if expected else 0)
        store.close()


def slot() -> Any:
    """A reply slot as the writer sees one: only its identity matters."""
    return object()


def test_a_flush_is_answered_once_the_writes_before_it_are() -> None:
    """``Flush``: at once when nothing waits; else once every write the
    writer received before it has been answered (committed or refused),
    not waiting for the writes after it."""
    writer = StoreWriter(store=None, world=simulated_world(1))  # type: ignore[arg-type]
    state = WriterState()
    first = slot()
    (reply,) = writer.handle(state, Request(Flush(), first), 0.0)
    assert isinstance(reply, Reply) and reply.to is first and reply.error is None

    before = [Request(chunk("a", 1, 0), slot()) for _ in range(2)]
    for req in before:
        assert writer.handle(state, req, 0.0) == ()
    flush = slot()
    assert writer.handle(state, Request(Flush(), flush), 0.0) == ()
    after = Request(other("session:s"), slot())
    assert writer.handle(state, after, 0.0) == ()

    # the group takes the two writes before the flush only
    writer.max_group = 2
    (effect,) = writer.caught_up(state, 0.0)
    assert isinstance(effect, AwaitInline)
    results: list[WriteResult | StoreError] = [StoreUnavailable("refused")]  # one run: merged
    done = writer.handle(state, effect.then(outcome.Value(results)), 0.0)
    flushed = [e for e in done if isinstance(e, Reply) and e.to is flush]
    assert len(flushed) == 1 and flushed[0].error is None
    # the flush comes after the answers of the writes before it
    assert done.index(flushed[0]) > max(
        i for i, e in enumerate(done) if isinstance(e, Reply) and e.to is not flush
    )
    assert state.flushes == [] and state.pending == [after]
