"""Supervision for trio tasks with Erlang/OTP semantics: child specs as data,
one_for_one / one_for_all / rest_for_one, restart types, restart intensity
with escalation, restart backoff, ordered shutdown, tree snapshots."""

from ._policy import Backoff as Backoff
from ._policy import Intensity as Intensity
from ._policy import Restart as Restart
from ._policy import Strategy as Strategy
from ._policy import add_restart as add_restart
from ._policy import children_to_restart as children_to_restart
from ._policy import restart_delay_s as restart_delay_s
from ._policy import should_restart as should_restart
from ._supervisor import Child as Child
from ._supervisor import ChildSnapshot as ChildSnapshot
from ._supervisor import ChildSpec as ChildSpec
from ._supervisor import ChildStartError as ChildStartError
from ._supervisor import DuplicateChild as DuplicateChild
from ._supervisor import Exit as Exit
from ._supervisor import Supervisor as Supervisor
from ._supervisor import SupervisorGaveUp as SupervisorGaveUp
from ._supervisor import SupervisorSnapshot as SupervisorSnapshot
from ._supervisor import TooManyChildren as TooManyChildren
