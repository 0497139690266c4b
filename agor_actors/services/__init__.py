"""Every service's rules, between the domain's actors and the daemon's hub:
what a call may name, what it writes and the events it produces (boards,
users, activity), how a store error is told to a client.  Behaviours are
pure: a plan (the write and the answer) that the hub runs.  The rules of a
session's own writes (sessions, tasks, messages) are its actor's
(:mod:`agor_actors.domain.session`)."""

from ._access import ACCESS_FIELDS as ACCESS_FIELDS
from ._access import AccessChange as AccessChange
from ._access import BoardAccess as BoardAccess
from ._access import Level as Level
from ._access import SessionAccess as SessionAccess
from ._access import access_change as access_change
from ._access import board_level as board_level
from ._access import narrower_role as narrower_role
from ._access import session_level as session_level
from ._access import session_write_refusal as session_write_refusal
from ._activity import ActivityFilter as ActivityFilter
from ._activity import parse_activity as parse_activity
from ._boards import BOARD_FIELDS as BOARD_FIELDS
from ._boards import MEMBER_METHODS as MEMBER_METHODS
from ._boards import MEMBER_ROLES as MEMBER_ROLES
from ._boards import BoardCall as BoardCall
from ._boards import BoardPlan as BoardPlan
from ._boards import plan_board as plan_board
from ._catalog import METHODS as METHODS
from ._catalog import MINTS_ID as MINTS_ID
from ._catalog import READ_METHODS as READ_METHODS
from ._catalog import SERVICES as SERVICES
from ._catalog import SESSION_SCOPED as SESSION_SCOPED
from ._catalog import check_call as check_call
from ._catalog import public as public
from ._errors import store_error as store_error
from ._gate import Gate as Gate
from ._limits import UserLimits as UserLimits
from ._pages import CURSOR_KEY as CURSOR_KEY
from ._pages import SCAN_ROWS as SCAN_ROWS
from ._pages import CursorSeal as CursorSeal
from ._pages import visible_page as visible_page
from ._users import UserPlan as UserPlan
from ._users import plan_token_rotation as plan_token_rotation
from ._users import plan_user as plan_user
from ._users import plan_user_removal as plan_user_removal
