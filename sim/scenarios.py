"""The scenarios of the seed document, written with :mod:`sim`'s scenario
API (``python -m sim --scenario NAME --trace`` runs one; the tests in
``tests/sim/test_sim_scenarios.py`` run each)."""

from __future__ import annotations

from typing import Final

from ._scenario import (
    CreateTask,
    Join,
    Leave,
    Look,
    Patch,
    Rename,
    Scenario,
    SetStatus,
    Stream,
    agent,
    at,
    fault,
    window,
)

__all__ = ["DAEMON_KILLED_MID_STREAM", "EXAMPLES", "FLAKY_TEAMMATE", "TWO_WINDOWS_AND_AN_AGENT"]

TWO_WINDOWS_AND_AN_AGENT: Final = Scenario(
    "two-windows-and-an-agent",
    clients=(
        window("w0", rooms=("board:0", "session:0"), latency_ms=1.0),
        window("w1", rooms=("session:0", "activity:0"), latency_ms=3.0, jitter_ms=1.0, cbor=True),
        agent("a0", rooms=("session:0",), latency_ms=0.5),
    ),
    steps=(
        at(1.0, "a0", Stream(session=0, chunks=30, per_s=10)),
        at(2.0, "w0", Rename(session=0, title="from the first window")),
        at(2.0, "w1", Rename(session=0, title="from the second window")),
        at(2.5, "w1", SetStatus(session=0, status="running")),
        at(3.0, "w0", Patch(session=0, data={"git_state": {"branch": "main", "dirty": True}})),
        at(4.5, "w1", Leave("session:0")),
        at(5.5, "w1", Join("session:0")),
        at(6.0, "a0", Stream(session=0, chunks=20, per_s=10)),
        at(7.0, "w0", CreateTask(session=0, prompt="next")),
        at(8.0, "w0", Look(None)),
        at(9.0, "w0", Look(0)),
    ),
    duration_s=12,
)
"""One user with two windows on a session while an agent streams into it:
both windows see every chunk, in order, the same renames (the later stamp
wins), a window that leaves and rejoins the session catches up."""

FLAKY_TEAMMATE: Final = Scenario(
    "flaky-teammate",
    users=2,
    clients=(
        window("w0", rooms=("board:0", "session:0"), latency_ms=2.0),
        window(
            "t1",
            user=1,
            rooms=("board:0", "session:0"),
            latency_ms=40.0,
            jitter_ms=30.0,
            skew_ms=1_500,
        ),
        agent("a0", rooms=("session:0",)),
    ),
    steps=(
        at(0.8, "a0", Stream(session=0, chunks=60, per_s=8)),
        at(1.2, "t1", Rename(session=0, title="teammate's title")),
        at(1.2, "w0", Rename(session=0, title="my title")),
        at(3.0, "t1", CreateTask(session=0, prompt="flaky task")),
        at(5.0, "w0", SetStatus(session=0, status="awaiting_permission")),
        at(6.5, "t1", Rename(session=0, title="teammate again")),
        at(9.0, "t1", SetStatus(session=0, status="running")),
        at(11.0, "w0", Rename(session=0, title="settled")),
    ),
    faults=(
        fault(1.0, "partition", client="t1", for_s=1.5),
        fault(4.0, "one_way", client="t1", direction="up", for_s=1.5),
        fault(6.0, "reset", client="t1"),
        fault(7.0, "one_way", client="t1", direction="down", for_s=2.0),
        fault(8.5, "partition", client="t1", for_s=4.0),  # past dead_after: it reconnects
    ),
    duration_s=14,
)
"""A teammate on a bad network (40 ms, jitter, a skewed clock) edits the
session I edit while an agent streams into it; their link drops both ways,
one way, resets, and goes away long enough to be declared dead.  Both of us
end with the same session, the same presence, every chunk."""

DAEMON_KILLED_MID_STREAM: Final = Scenario(
    "daemon-killed-mid-stream",
    clients=(
        window("w0", rooms=("board:0", "session:0")),
        window("w1", rooms=("session:0",), cbor=True),
        agent("a0", rooms=("session:0",)),
    ),
    steps=(
        at(1.0, "a0", Stream(session=0, chunks=60, per_s=10)),
        at(5.0, "w0", Rename(session=0, title="after the crash")),
    ),
    faults=(
        fault(3.0, "daemon_crash", for_s=1.5),
        fault(7.25, "daemon_crash", for_s=0.3),
    ),
    duration_s=12,
)
"""The daemon is killed (kill -9: memory gone, the database kept) twice
while an agent streams: every acknowledged chunk is in the message, none
twice, in order; the windows reconnect, and their mirrors end equal to the
store."""

EXAMPLES: Final = {
    s.name: s for s in (TWO_WINDOWS_AND_AN_AGENT, FLAKY_TEAMMATE, DAEMON_KILLED_MID_STREAM)
}
