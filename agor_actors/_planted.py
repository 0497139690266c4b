"""Planted bugs: switches that the simulator's test suite turns on, one at a
time, to prove that the simulator catches each kind of bug.

Every switch is off, and the flags object is frozen: production code only
ever reads ``FLAGS.<name>`` (one attribute lookup in a guarded line of the
real code).  Only :func:`plant`, called by the simulator in its own worker
process, replaces the object.  The guarded lines:

``resume_off_by_one``
    ``agor_actors/domain/room.py`` ``_subscribe``: a resume from memory
    starts one event late (the first event after ``since`` is skipped).
``dedupe_off``
    ``protocols/_client.py`` ``_on_event``: the client machine applies an
    event it has already applied instead of dropping it (the switch itself
    is ``protocols._planted``, set from here).
``ack_before_durable``
    ``agor_actors/store/_writer.py`` ``_start``: the writer answers the
    writers of a group before the group is committed.
``merge_tiebreak``
    ``agor_actors/domain/hlc.py`` ``merge_fields``: a tie between two stamps
    of the same wall time and counter is broken by an object's address
    instead of the writer id.
``fanout_reorder``
    ``agor_actors/domain/room.py`` ``_fan_out``: a fan-out of several events
    offers the first one last.
``presence_never_offline``
    ``agor_actors/domain/presence.py`` ``status_of``: a user who left a board
    never goes offline there (the grace period never ends).
"""

from __future__ import annotations

import attrs

from protocols import _planted as protocol_planted

__all__ = ["FLAGS", "PLANTED", "Flags", "plant"]


@attrs.frozen
class Flags:
    resume_off_by_one: bool = False
    dedupe_off: bool = False
    ack_before_durable: bool = False
    merge_tiebreak: bool = False
    fanout_reorder: bool = False
    presence_never_offline: bool = False


PLANTED: tuple[str, ...] = tuple(a.name for a in attrs.fields(Flags))
"""The names of the planted bugs."""

FLAGS = Flags()


def plant(*names: str) -> Flags:
    """Turn on exactly the bugs ``names`` (none: all off) in this process;
    returns the new flags.  For the simulator's own processes only."""
    global FLAGS
    unknown = sorted(set(names) - set(PLANTED))
    if unknown:
        raise ValueError(f"no planted bug {', '.join(unknown)}; known: {', '.join(PLANTED)}")
    FLAGS = Flags(**dict.fromkeys(names, True))
    # the protocol's own switch lives in protocols/ (which imports nothing of ours)
    protocol_planted.plant(dedupe_off=FLAGS.dedupe_off)
    return FLAGS
