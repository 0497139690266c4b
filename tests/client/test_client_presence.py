"""Presence in the Python client: the throttle and the sender on trio's
mock clock (no server), then a real daemon over real WebSockets: two
windows of one user and a teammate on one board, the cursor burst, hidden
cursors, follow mode, presence restored after a reconnect, and the
activity log."""

from __future__ import annotations

import itertools
import pathlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
from client_support import Daemon
from trio.testing import MockClock

from agor_actors.client import (
    BoardPresence,
    Client,
    PresenceSender,
    Throttle,
    connect,
)
from agor_actors.daemon import Principal, open_hub
from agor_actors.domain.presence import PresenceConfig, color_for
from agor_actors.server import serving
from agor_actors.world import real_world
from protocols import Cursor, PresenceUpdate, Viewport

RATE = 60.0
INTERVAL = 1.0 / RATE

# ------------------------------------------------------------ no server


def test_throttle_sends_at_once_after_a_quiet_interval_then_paces() -> None:
    throttle = Throttle(INTERVAL)
    assert throttle.delay_s(100.0) == 0.0  # nothing sent yet: at once
    throttle.sent(100.0)
    assert throttle.delay_s(100.0) == pytest.approx(INTERVAL)
    assert throttle.delay_s(100.0 + INTERVAL / 2) == pytest.approx(INTERVAL / 2)
    assert throttle.delay_s(100.0 + INTERVAL) == 0.0
    assert throttle.delay_s(105.0) == 0.0


class Recorder:
    """A fake connection: records what the sender sends and when."""

    def __init__(self, fail_first: int = 0) -> None:
        self.sent: list[tuple[float, PresenceUpdate]] = []
        self.fail_first = fail_first
        self.lost: list[PresenceUpdate] = []

    async def send(self, update: PresenceUpdate) -> bool:
        await trio.lowlevel.checkpoint()
        if self.fail_first > 0:
            self.fail_first -= 1
            self.lost.append(update)
            return False
        self.sent.append((trio.current_time(), update))
        return True


async def test_a_burst_on_the_mock_clock_sends_7_frames_ending_on_the_last_position(
    autojump_clock: MockClock,
) -> None:
    recorder = Recorder()
    sender = PresenceSender(recorder.send, rate_per_s=RATE)
    moved_at: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.run)
        start = trio.current_time()
        for i in range(1000):  # 1,000 moves within 0.1 s
            await trio.sleep_until(start + i * 0.0001)
            moved_at.append(trio.current_time())
            version = sender.move("b-1", float(i), float(-i))
        assert moved_at[-1] - start < 0.1
        with trio.fail_after(1):
            assert await sender.wait_sent("b-1", version)
        await trio.sleep(1)  # nothing more goes out
        nursery.cancel_scope.cancel()
    times = [t - start for t, _ in recorder.sent]
    cursors = [u.cursor for _, u in recorder.sent]
    assert len(recorder.sent) == 7 and sender.frames_sent == 7
    assert times[0] == 0.0  # the first move goes at once
    assert all(b - a >= INTERVAL - 1e-9 for a, b in itertools.pairwise(times))
    assert cursors[-1] == Cursor(x=999.0, y=-999.0)
    # each frame carries the newest position when it left: every later move
    # came at or after that instant
    for sent_at, cursor in zip(times, cursors, strict=True):
        assert cursor is not None and cursor.y == -cursor.x
        i = int(cursor.x)
        assert moved_at[i] - start <= sent_at
        assert all(t - start >= sent_at for t in moved_at[i + 1 :])
    assert all(u.board == "b-1" for _, u in recorder.sent)


async def test_a_send_lost_with_the_connection_is_sent_again_under_newer_fields(
    autojump_clock: MockClock,
) -> None:
    recorder = Recorder(fail_first=1)
    sender = PresenceSender(recorder.send, rate_per_s=RATE)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.run)
        sender.update("b-1", view="session:s-1", hide_cursors=True)
        sender.move("b-1", 1.0, 2.0)
        await trio.testing.wait_all_tasks_blocked()
        assert len(recorder.lost) == 1 and not recorder.sent
        last = sender.move("b-1", 3.0, 4.0)  # newer than the lost one
        with trio.fail_after(1):
            assert await sender.wait_sent("b-1", last)
        nursery.cancel_scope.cancel()
    assert sender.retries == 1
    [(_, update)] = recorder.sent  # the lost fields and the new position, in one
    assert update == PresenceUpdate(
        board="b-1", cursor=Cursor(x=3.0, y=4.0), view="session:s-1", hide_cursors=True
    )


async def test_updates_merge_and_the_remembered_state_is_restored(
    autojump_clock: MockClock,
) -> None:
    recorder = Recorder()
    sender = PresenceSender(recorder.send, rate_per_s=RATE)
    viewport = Viewport(x=0.0, y=0.0, w=800.0, h=600.0, zoom=1.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.run)
        sender.update("b-1", typing=True)
        await trio.testing.wait_all_tasks_blocked()  # it went at once (leading edge)
        assert len(recorder.sent) == 1
        sender.update("b-1", view="a", follow="u-2")
        sender.move("b-1", 1.0, 1.0)
        last = sender.update("b-1", view="b", viewport=viewport)
        with trio.fail_after(1):
            await sender.wait_sent("b-1", last)
        assert sender.current_board == "b-1"
        restored = sender.restore("b-1")
        with trio.fail_after(1):
            await sender.wait_sent("b-1", restored)
        nursery.cancel_scope.cancel()
    updates = [u for _, u in recorder.sent]
    assert updates == [
        PresenceUpdate(board="b-1", typing=True),
        PresenceUpdate(
            board="b-1", cursor=Cursor(x=1.0, y=1.0), viewport=viewport, view="b", follow="u-2"
        ),
        # after a reconnect: view, viewport, hidden cursors, follow; not the
        # cursor nor typing
        PresenceUpdate(board="b-1", viewport=viewport, view="b", hide_cursors=False, follow="u-2"),
    ]
    wrongs: list[dict[str, Any]] = [
        {"colour": "red"},
        {"cursor": (1.0,)},
        {"cursor": (1.0, float("nan"))},
        {"viewport": {"x": 0}},
        {"typing": "yes"},
        {"follow": 7},
    ]
    for wrong in wrongs:
        with pytest.raises(TypeError):
            sender.update("b-1", **wrong)
    assert sender.pending("b-1") is None and sender.changes == 5


async def test_an_update_for_another_board_supersedes_what_is_pending_for_the_last(
    autojump_clock: MockClock,
) -> None:
    recorder = Recorder()
    sender = PresenceSender(recorder.send, rate_per_s=RATE)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.run)
        sender.update("b-1", view="a")
        await trio.testing.wait_all_tasks_blocked()  # at once (leading edge)
        stale = sender.move("b-1", 5.0, 5.0)  # throttled: pending
        assert sender.pending("b-1") == {"cursor": Cursor(x=5.0, y=5.0)}
        moved = sender.update("b-2", view="c")
        assert sender.pending("b-1") is None and sender.superseded == 1
        with trio.fail_after(1):
            assert await sender.wait_sent("b-1", stale)  # settled, not sent
            assert await sender.wait_sent("b-2", moved)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    # b-1's cursor never follows b-2's update: the connection stays on b-2
    assert [u for _, u in recorder.sent] == [
        PresenceUpdate(board="b-1", view="a"),
        PresenceUpdate(board="b-2", view="c"),
    ]


async def test_a_lost_send_for_a_board_left_meanwhile_is_not_sent_again(
    autojump_clock: MockClock,
) -> None:
    sent: list[PresenceUpdate] = []
    in_flight = trio.Event()
    answer = trio.Event()
    lose = [True]

    async def send(update: PresenceUpdate) -> bool:
        if lose[0]:  # the connection is lost while this update is on its way
            lose[0] = False
            in_flight.set()
            await answer.wait()
            return False
        sent.append(update)
        return True

    sender = PresenceSender(send, rate_per_s=RATE)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.run)
        left = sender.update("b-1", view="a")
        with trio.fail_after(1):
            await in_flight.wait()
        moved = sender.update("b-2", view="c")
        answer.set()
        with trio.fail_after(1):
            assert await sender.wait_sent("b-1", left)
            assert await sender.wait_sent("b-2", moved)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert sent == [PresenceUpdate(board="b-2", view="c")]
    assert sender.retries == 0 and sender.superseded == 1


# ---------------------------------------------------------- real daemon


@asynccontextmanager
async def presence_daemon(
    data_dir: pathlib.Path, presence: PresenceConfig
) -> AsyncIterator[Daemon]:
    """A daemon core on a SQLite file served on 127.0.0.1, with ``presence``."""
    world = real_world()
    async with (
        open_hub(world, data_dir=data_dir, presence=presence) as hub,
        serving(hub, world) as port,
    ):
        yield Daemon(hub, port)


@pytest.fixture
async def running(tmp_path: pathlib.Path) -> AsyncIterator[Daemon]:
    async with presence_daemon(tmp_path / "agor", PresenceConfig()) as d:
        yield d


@pytest.fixture
async def short_grace(tmp_path: pathlib.Path) -> AsyncIterator[Daemon]:
    """Users go offline 0.5 s after their last connection (not 10 s)."""
    async with presence_daemon(tmp_path / "agor", PresenceConfig(offline_grace_s=0.5)) as d:
        yield d


async def _teammate(owner: Client, name: str) -> dict[str, Any]:
    made: dict[str, Any] = await owner.service("users").create({"name": name})
    return made


@asynccontextmanager
async def team(running: Daemon, windows: int = 2) -> AsyncIterator[tuple[list[Client], str]]:
    """``windows`` clients of the owner, then one of the teammate Bob, and a
    board."""
    async with AsyncExitStack() as stack:
        owner: list[Client] = []
        for n in range(windows):
            owner.append(
                await stack.enter_async_context(
                    connect(running.url, token=running.token, client_id=f"window-{n}", seed=n)
                )
            )
        mate = await _teammate(owner[0], "Bob")
        bob = await stack.enter_async_context(connect(running.url, token=mate["token"], seed=99))
        board = await owner[0].service("boards").create({"name": "Plans"})
        await (
            owner[0]
            .service("boards")
            .call("add_member", board["id"], {"user_id": mate["id"], "role": "editor"})
        )
        yield [*owner, bob], str(board["id"])


def _following(board: BoardPresence) -> tuple[str | None, Viewport | None]:
    return board.following, board.followed_viewport


async def _until(board: BoardPresence, predicate: Any, timeout_s: float = 10.0) -> None:
    with trio.fail_after(timeout_s):
        await board.wait_until(predicate)


async def test_two_windows_and_a_teammate_see_each_other(short_grace: Daemon) -> None:
    async with team(short_grace) as ([window1, window2, bob], board_id):
        owner, mate = window1.user_id, bob.user_id
        assert owner is not None and mate is not None and owner != mate
        seen1, seen_bob = await window1.board_presence(board_id), await bob.board_presence(board_id)
        for board in (seen1, seen_bob):
            await _until(board, lambda p: set(p.users) == {owner, mate})
        # a second window of a user already there changes nobody's facepile,
        # yet it gets the whole facepile at once
        seen2 = await window2.board_presence(board_id)
        boards = [seen1, seen2, seen_bob]
        for board in boards:  # one entry per user, whatever their windows
            await _until(board, lambda p: set(p.users) == {owner, mate})
        assert seen1.users == seen2.users == seen_bob.users
        bob_entry = seen1.users[mate]
        assert bob_entry.name == "Bob"
        assert bob_entry.color == color_for(mate) != ""
        assert seen_bob.users[owner].color == color_for(owner)

        # what one looks at and typing, across windows and users
        assert await window2.set_presence(board_id, view="session:s-1")
        assert await bob.set_presence(board_id, typing=True)
        await _until(seen_bob, lambda p: p.users[owner].view == "session:s-1")
        await _until(seen1, lambda p: p.users[mate].typing and p.users[owner].view == "session:s-1")
        await _until(seen2, lambda p: p.users[mate].typing)
        assert seen2.users[mate].status == seen_bob.users[owner].status == "active"

        # cursors: both windows see Bob's, Bob sees the owner's (the latest of
        # its windows); nobody gets their own user's cursor back
        window1.cursor_sender(board_id).move(10.0, 20.0)
        bob.cursor_sender(board_id).move(300.0, 400.0)
        await _until(seen_bob, lambda p: p.cursors.get(owner) == (10.0, 20.0))
        await _until(seen1, lambda p: p.cursors.get(mate) == (300.0, 400.0))
        await _until(seen2, lambda p: p.cursors.get(mate) == (300.0, 400.0))
        window2.cursor_sender(board_id).move(11.0, 21.0)
        await _until(seen_bob, lambda p: p.cursors.get(owner) == (11.0, 21.0))
        bob.cursor_sender(board_id).move(301.0, 401.0)
        await _until(seen1, lambda p: p.cursors.get(mate) == (301.0, 401.0))
        assert owner not in seen1.cursors and owner not in seen2.cursors
        assert mate not in seen_bob.cursors

        # an action of Bob's flashes on the owner's windows, in Bob's color
        session = await bob.service("sessions").create({"title": "Plan", "board_id": board_id})
        for board in (seen1, seen2):
            await _until(board, lambda p: any(h.user_id == mate for h in p.highlights))
            flash = next(h for h in board.highlights if h.user_id == mate)
            assert flash.color == bob_entry.color
            assert (flash.action, flash.target_type, flash.target_id) == (
                "session:created",
                "session",
                session["id"],
            )
            assert flash.action_id.startswith(f"board:{board_id}:")

        # Bob leaves: after the grace he is gone from the facepile, cursor too
        await bob.aclose()
        for board in (seen1, seen2):
            await _until(board, lambda p: set(p.users) == {owner})
            assert mate not in board.cursors


async def test_a_burst_of_moves_is_throttled_and_ends_on_the_last_position(
    running: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[tuple[str, PresenceUpdate]] = []
    forward = running.hub.presence

    async def recording(principal: Principal, connection_id: str, update: PresenceUpdate) -> None:
        received.append((connection_id, update))
        await forward(principal, connection_id, update)

    monkeypatch.setattr(running.hub, "presence", recording)
    async with team(running, windows=1) as ([mover, watcher], board_id):
        await mover.board_presence(board_id)
        seen = await watcher.board_presence(board_id)
        await _until(seen, lambda p: mover.user_id in p.users)
        sender = mover.cursor_sender(board_id)
        before = len(received)
        start = trio.current_time()
        for step in range(100):  # 1,000 moves within 0.1 s, 10 at a time
            await trio.sleep_until(start + step * 0.0008)
            for n in range(10):
                i = step * 10 + n
                sender.move(float(i), float(2 * i))
        burst_s = trio.current_time() - start
        with trio.fail_after(10):
            await sender.flush()
        await _until(seen, lambda p: p.cursors.get(mover.user_id) == (999.0, 1998.0))
        moves = [
            u.cursor
            for conn, u in received[before:]
            if conn == mover.connection_id and u.cursor is not None
        ]
        # the first at once, then one per interval of the burst (0.08 s, 7
        # frames at 60/s, more if a busy machine stretched it), and the last
        rate = min(mover.presence_rate_per_s, mover.machine.server_limits.presence_rate_per_s)
        assert 2 <= len(moves) <= 2 + burst_s * rate, (moves, burst_s)
        assert moves[-1] == Cursor(x=999.0, y=1998.0)
        assert sender.moves == 1000 and sender.frames_sent - 1 == len(moves)  # +1: the join


async def test_hide_cursors_and_follow_through_the_client(running: Daemon) -> None:
    async with team(running, windows=1) as ([me, bob], board_id):
        owner, mate = me.user_id, bob.user_id
        assert owner is not None and mate is not None
        mine, bobs = await me.board_presence(board_id), await bob.board_presence(board_id)
        await _until(mine, lambda p: set(p.users) == {owner, mate})
        await _until(bobs, lambda p: set(p.users) == {owner, mate})
        cursor = bob.cursor_sender(board_id)
        cursor.move(5.0, 5.0)
        await _until(mine, lambda p: p.cursors.get(mate) == (5.0, 5.0))

        # hidden: none of Bob's moves come (Bob waits until the server took
        # the request: he sees the view sent with it)
        await me.set_presence(board_id, hide_cursors=True, view="hiding")
        assert mine.cursors == {} and mine.hiding_cursors
        await _until(bobs, lambda p: p.users[owner].view == "hiding")
        for n in range(5):
            cursor.move(float(n), float(n))
        await bob.set_presence(board_id, view="moved")  # after the moves
        await _until(mine, lambda p: p.users[mate].view == "moved")
        assert mine.cursors == {} and mine.cursors_ignored == 0
        # shown again: the next move comes
        await me.set_presence(board_id, hide_cursors=False, view="showing")
        await _until(bobs, lambda p: p.users[owner].view == "showing")
        cursor.move(7.0, 8.0)
        await _until(mine, lambda p: p.cursors.get(mate) == (7.0, 8.0))

        # follow Bob: his viewport as it moves
        first = Viewport(x=0.0, y=0.0, w=1280.0, h=720.0, zoom=1.0)
        second = Viewport(x=400.0, y=300.0, w=1280.0, h=720.0, zoom=2.0)
        await bob.set_presence(board_id, viewport=first)
        await me.set_presence(board_id, follow=mate)
        assert _following(mine)[0] == mate
        await _until(mine, lambda p: p.followed_viewport == first)
        await bob.set_presence(board_id, viewport=second)
        await _until(mine, lambda p: p.followed_viewport == second)
        # stop following: no more viewports
        await me.set_presence(board_id, follow="", view="alone")
        assert _following(mine) == (None, None)
        await _until(bobs, lambda p: p.users[owner].view == "alone")
        await bob.set_presence(board_id, viewport=first, view="panned")
        await _until(mine, lambda p: p.users[mate].view == "panned")
        assert mine.followed_viewport is None and mine.viewports_ignored == 0


async def test_presence_is_restored_after_a_reconnect(running: Daemon) -> None:
    async with team(running, windows=1) as ([me, bob], board_id):
        owner, mate = me.user_id, bob.user_id
        assert owner is not None and mate is not None
        mine, bobs = await me.board_presence(board_id), await bob.board_presence(board_id)
        await _until(mine, lambda p: set(p.users) == {owner, mate})
        await _until(bobs, lambda p: set(p.users) == {owner, mate})
        bobs_view = Viewport(x=0.0, y=0.0, w=640.0, h=480.0, zoom=1.0)
        await bob.set_presence(board_id, viewport=bobs_view)
        my_viewport = Viewport(x=0.0, y=0.0, w=400.0, h=300.0, zoom=1.0)
        await me.set_presence(board_id, view="session:s-1", viewport=my_viewport, follow=mate)
        await _until(mine, lambda p: p.followed_viewport == bobs_view)
        await _until(bobs, lambda p: p.users[owner].view == "session:s-1")

        async def drop_and_come_back() -> None:
            first = me.connection_id
            await me.disconnect()
            # the server forgot this connection's presence (within the
            # grace, the user stays, without a view)
            await _until(bobs, lambda p: p.users[owner].view is None)
            me.reconnect()
            await _until(bobs, lambda p: p.users[owner].view == "session:s-1")
            assert me.connection_id not in (None, first)

        await drop_and_come_back()
        # follow is back: Bob's viewport as it moves
        moved = Viewport(x=900.0, y=900.0, w=640.0, h=480.0, zoom=1.0)
        await bob.set_presence(board_id, viewport=moved)
        await _until(mine, lambda p: p.followed_viewport == moved)
        # the viewport is back: a cursor far outside it is culled
        far = bob.cursor_sender(board_id)
        far.move(5000.0, 5000.0)
        await bob.set_presence(board_id, view="far")
        await _until(mine, lambda p: p.users[mate].view == "far")
        assert mine.cursors.get(mate) != (5000.0, 5000.0)
        far.move(100.0, 100.0)
        await _until(mine, lambda p: p.cursors.get(mate) == (100.0, 100.0))

        # hidden cursors are back too
        await me.set_presence(board_id, hide_cursors=True)
        await drop_and_come_back()
        assert mine.hiding_cursors and mine.cursors == {}
        far.move(50.0, 60.0)
        await bob.set_presence(board_id, view="moved again")
        await _until(mine, lambda p: p.users[mate].view == "moved again")
        assert mine.cursors == {} and mine.cursors_ignored == 0
        assert me.statistics().reconnects == 2


async def test_activity_pages_filters_and_live_feed(running: Daemon) -> None:
    async with team(running, windows=1) as ([me, bob], board_id):
        mate = bob.user_id
        activity = me.activity(board_id)
        async with await activity.live() as feed:
            created = [
                await client.service("sessions").create({"title": title, "board_id": board_id})
                for client, title in [(bob, "one"), (me, "two"), (bob, "three")]
            ]
            live = []
            with trio.fail_after(10):
                async for entry in feed:
                    if entry.action == "session:created":
                        live.append(entry)
                    if len(live) == 3:
                        break
        assert [e.user_id for e in live] == [mate, me.user_id, mate]
        assert [e.id for e in live] == sorted(e.id for e in live)
        assert feed.missed == 0

        # pages: newest first, older on demand, the same entries as live
        everything = await activity.find(limit=500)
        assert everything.next_cursor is None
        pages = [page async for page in activity.pages(limit=2)]
        assert all(len(page.entries) <= 2 for page in pages) and len(pages) >= 2
        paged = [entry for page in pages for entry in page.entries]
        assert paged == everything.entries
        assert [e.id for e in paged] == sorted((e.id for e in paged), reverse=True)
        assert {e.id for e in live} <= {e.id for e in paged}
        # filters: by user, by action
        bobs = [e async for page in activity.pages(user_id=mate) for e in page.entries]
        assert bobs and all(e.user_id == mate for e in bobs)
        made = (await activity.find(action="session:created")).entries
        assert [e.data["session"]["id"] for e in made] == [s["id"] for s in reversed(created)]


async def test_a_board_left_while_its_room_was_rejoined_is_not_restored(
    short_grace: Daemon,
) -> None:
    """After a reconnect the client restores its board's presence once the
    board's room is rejoined.  A window that moved to no board meanwhile
    must not be put back on it: before, the restore ran anyway and the
    user sat on the board's facepile for good (simulator, profile
    ``medium``, seeds 219 and 723)."""
    async with team(short_grace, windows=1) as ([me, bob], board_id):
        owner, mate = me.user_id, bob.user_id
        assert owner is not None and mate is not None
        await me.board_presence(board_id)
        bobs = await bob.board_presence(board_id)
        await _until(bobs, lambda p: set(p.users) == {owner, mate})
        await me.set_presence(board_id, view="session:s-1")
        sender = me.presence_sender
        assert sender is not None and sender.current_board == board_id
        # what a new connection's welcome does: the restore waits for the room
        me._presence_welcomed()
        assert me._restore_due == board_id
        await me.set_presence("")  # the window looks at no board now
        me._presence_rejoined(f"board:{board_id}")  # the room is back
        assert sender.current_board == ""
        assert sender.pending(board_id) is None  # nothing queued for the board left
        # the server let the user go (after the short grace), and keeps it so
        await _until(bobs, lambda p: set(p.users) == {mate})
