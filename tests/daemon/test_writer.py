"""The store writer's pure parts: coalescing streamed chunks."""

from __future__ import annotations

from agor_actors.daemon._writer import Write, coalesce
from agor_actors.store import Append, EventDraft, Mutation, WriteRequest


def chunk(text: str, ts: int, offset: int = 0) -> Write:
    return Write(
        WriteRequest(
            mutations=(
                Mutation(
                    "update", "messages", {"id": "m"}, {"content": Append(text), "updated_at": ts}
                ),
            ),
            events=(
                EventDraft(
                    "session:s",
                    "task:message",
                    {"message_id": "m", "chunk": text, "offset": offset},
                    ts,
                ),
            ),
        ),
        coalesce_key="message:m",
    )


def test_coalesce_concatenates_appends_and_merges_events() -> None:
    merged = coalesce([chunk("Hel", 1, 7), chunk("lo ", 2, 10), chunk("you", 3, 13)])
    (mutation,) = merged.mutations
    assert mutation.values["content"] == Append("Hello you")
    assert mutation.values["updated_at"] == 3  # other values: last wins
    (event,) = merged.events
    assert event.data == {"message_id": "m", "chunk": "Hello you", "offset": 7}
    assert event.merge_count == 3 and event.ts == 3
