"""The protocol's planted-bug switch, for the simulator's test suite only.

``agor_actors._planted.plant()`` turns it on in the simulator's own worker
processes, to prove the simulator catches a client that applies an event
twice.  Off everywhere else; production code reads one attribute.
"""

from __future__ import annotations

import attrs

__all__ = ["FLAGS", "Flags", "plant"]


@attrs.frozen
class Flags:
    dedupe_off: bool = False
    """``ClientConnection._on_event`` applies an event it already applied."""


FLAGS = Flags()


def plant(*, dedupe_off: bool = False) -> Flags:
    global FLAGS
    FLAGS = Flags(dedupe_off=dedupe_off)
    return FLAGS
