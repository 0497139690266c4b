"""The store writer's pure parts: coalescing streamed chunks."""

from __future__ import annotations

from agor_actors.store import Append, EventDraft, Mutation, Write, WriteRequest
from agor_actors.store._writer import coalesce, runs


def chunk(text: str, ts: int, offset: int = 0, *, m: str = "m", s: str = "s") -> Write:
    return Write(
        WriteRequest(
            mutations=(
                Mutation(
                    "update", "messages", {"id": m}, {"content": Append(text), "updated_at": ts}
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


def test_coalesce_concatenates_appends_and_merges_events() -> None:
    merged = coalesce([chunk("Hel", 1, 7), chunk("lo ", 2, 10), chunk("you", 3, 13)])
    (mutation,) = merged.mutations
    assert mutation.values["content"] == Append("Hello you")
    assert mutation.values["updated_at"] == 3  # other values: last wins
    (event,) = merged.events
    assert event.data == {"message_id": "m", "chunk": "Hello you", "offset": 7}
    assert event.merge_count == 3 and event.ts == 3
