"""The deterministic simulator: the daemon's own hub, actors, rooms and
connection code, and the protocol's client machine, on virtual time with a
simulated network and faults, all from one seed.

``python -m sim --seeds 1000`` sweeps seeds; ``python -m sim --seed N
--trace`` replays one; :class:`Scenario` and :func:`run_scenario` run a
run written by hand (``python -m sim --scenario NAME`` one of
:mod:`sim.scenarios`).  See ``SIMULATION.md`` (in the shared notes) for the
recipe that makes trio runs deterministic.
"""

from ._cli import KNOWN_BUGS as KNOWN_BUGS
from ._cli import KNOWN_CLUSTER_BUGS as KNOWN_CLUSTER_BUGS
from ._cli import main as main
from ._config import EXCLUDABLE as EXCLUDABLE
from ._config import FAULT_KINDS as FAULT_KINDS
from ._config import PROFILES as PROFILES
from ._config import WORKLOADS as WORKLOADS
from ._config import Fault as Fault
from ._config import SimConfig as SimConfig
from ._config import draw_config as draw_config
from ._config import draw_faults as draw_faults
from ._record import Violation as Violation
from ._runner import RunResult as RunResult
from ._runner import run_seed as run_seed
from ._scenario import CreateTask as CreateTask
from ._scenario import Join as Join
from ._scenario import Leave as Leave
from ._scenario import Look as Look
from ._scenario import Patch as Patch
from ._scenario import Rename as Rename
from ._scenario import Scenario as Scenario
from ._scenario import SetStatus as SetStatus
from ._scenario import Stream as Stream
from ._scenario import agent as agent
from ._scenario import at as at
from ._scenario import fault as fault
from ._scenario import run_scenario as run_scenario
from ._scenario import window as window
from ._sweep import SweepOptions as SweepOptions
from ._sweep import SweepSummary as SweepSummary
from ._sweep import sweep as sweep
