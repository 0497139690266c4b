"""The board page in a real browser: Debian's chromium driven by Playwright
(the Python package, pointed at /usr/bin/chromium; nothing downloads a
browser), against a real daemon in a subprocess.

Set ``AGOR_UPDATE_SCREENSHOTS=1`` to write the README's screenshots into
``docs/screenshots/``."""

from __future__ import annotations

import os
import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from web_support import REPO, DaemonProcess, daemon_process, request

CHROMIUM = pathlib.Path(os.environ.get("AGOR_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = REPO / "docs" / "screenshots"
DESKTOP = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}
WAIT_MS = 10_000

playwright_sync = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'"
)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"no chromium at {CHROMIUM}: apt-get install -y chromium (or set AGOR_CHROMIUM)",
    ),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def daemon(tmp_path: pathlib.Path) -> Iterator[DaemonProcess]:
    with daemon_process(tmp_path / "agor") as d:
        yield d


class Api:
    """The daemon's REST routes, as the owner (or another token)."""

    def __init__(self, daemon: DaemonProcess, token: str | None = None) -> None:
        self.daemon = daemon
        self.token = token or daemon.token

    def __call__(self, method: str, path: str, body: Any = None) -> Any:
        status, _, answer = request(
            method, self.daemon.http_url + path, token=self.token, body=body
        )
        assert status < 300, (method, path, status, answer)
        return answer


def open_board(
    browser: Any,
    daemon: DaemonProcess,
    board_id: str,
    *,
    token: str | None = None,
    viewport: dict[str, int] = DESKTOP,
) -> Any:
    """A new browser context (its own cookie jar) signed in through a
    one-time link, on the board: the page, once it is live."""
    code = Api(daemon, token)("POST", "/auth/codes", {"next": f"/?board={board_id}"})
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    page.goto(daemon.http_url + code["path"])
    page.wait_for_selector("body[data-ready=true]", timeout=WAIT_MS)
    page.wait_for_selector("#status[data-state=live]", timeout=WAIT_MS)
    assert "code=" not in page.url
    return page


def text_of(page: Any, selector: str) -> str:
    return str(page.eval_on_selector(selector, "n => n.textContent"))


def stats(page: Any) -> dict[str, int]:
    return dict(page.evaluate("() => ({...window.agor.client.stats})"))


def test_without_signing_in_the_page_says_how(browser: Any, daemon: DaemonProcess) -> None:
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.goto(daemon.http_url + "/")
    page.wait_for_selector("#signin:not([hidden])", timeout=WAIT_MS)
    assert "agor-actors open" in text_of(page, "#signin")
    assert page.get_attribute("#status", "data-state") == "offline"
    context.close()


def test_two_pages_see_a_session_appear_and_a_reply_stream_in(
    browser: Any, daemon: DaemonProcess
) -> None:
    api = Api(daemon)
    board = api("POST", "/boards", {"name": "Launch"})
    bob = api("POST", "/users", {"name": "Bob"})
    api("POST", f"/boards/{board['id']}/add_member", {"user_id": bob["id"]})
    alice_page = open_board(browser, daemon, board["id"])
    bob_page = open_board(browser, daemon, board["id"], token=bob["token"])

    # a session created over REST appears on both pages
    session = api(
        "POST", "/sessions", {"board_id": board["id"], "title": "Ship it", "agent": "codex"}
    )
    card = f'.card[data-id="{session["id"]}"]'
    for page in (alice_page, bob_page):
        page.wait_for_selector(f'{card} >> text="Ship it"', timeout=WAIT_MS)
    # both users are in each facepile
    for page in (alice_page, bob_page):
        page.wait_for_function(
            "() => document.querySelectorAll('#facepile .face').length === 2", timeout=WAIT_MS
        )

    # a change by the owner flashes the card on Bob's page, and recolours it
    bob_page.evaluate(
        """id => { window.pulses = 0; new MutationObserver(() => {
             if (document.querySelector(`.card[data-id="${id}"]`).classList.contains('pulse')) window.pulses++
           }).observe(document.getElementById('cards'), {subtree: true, attributes: true, attributeFilter: ['class']}) }""",
        session["id"],
    )
    api("POST", f"/sessions/{session['id']}/set_status", {"status": "running"})
    for page in (alice_page, bob_page):
        page.wait_for_selector(f'{card}[data-status="running"]', timeout=WAIT_MS)
    bob_page.wait_for_function("() => window.pulses > 0", timeout=WAIT_MS)

    # both open the session; a reply streamed word by word shows word by word
    for page in (alice_page, bob_page):
        page.click(card)
        page.wait_for_selector("#session-drawer:not([hidden])", timeout=WAIT_MS)
    task = api("POST", "/tasks", {"session_id": session["id"], "prompt": "Write the changelog"})
    message = api(
        "POST",
        "/messages",
        {"session_id": session["id"], "task_id": task["id"], "role": "assistant", "content": ""},
    )
    bubble = f'.msg[data-id="{message["id"]}"]'
    words = ["Here", "is", "the", "changelog", "for", "the", "launch:", "faster", "sync."]
    shown = ""
    for word in words:
        chunk = word if not shown else " " + word
        api("POST", f"/messages/{message['id']}/stream", {"chunk": chunk})
        shown += chunk
        alice_page.wait_for_function(
            "([sel, text]) => document.querySelector(sel)?.textContent === text",
            arg=[bubble, shown],
            timeout=WAIT_MS,
        )
    assert "streaming" in (alice_page.get_attribute(bubble, "class") or "")
    api("POST", f"/messages/{message['id']}/finish", {})
    for page in (alice_page, bob_page):
        page.wait_for_function(
            "([sel, text]) => { const n = document.querySelector(sel); return n && n.textContent === text && !n.classList.contains('streaming') }",
            arg=[bubble, shown],
            timeout=WAIT_MS,
        )
        assert page.locator(".task-prompt").all_text_contents() == ["Write the changelog"]
        s = stats(page)
        assert s["duplicatesDropped"] == 0 and s["gaps"] == 0, s
    assert alice_page.errors == [] and bob_page.errors == []


def test_cursors_show_in_the_other_page_and_can_be_hidden(
    browser: Any, daemon: DaemonProcess
) -> None:
    api = Api(daemon)
    board = api("POST", "/boards", {"name": "Cursors"})
    api("POST", "/sessions", {"board_id": board["id"], "title": "One"})
    bob = api("POST", "/users", {"name": "Bob"})
    api("POST", f"/boards/{board['id']}/add_member", {"user_id": bob["id"]})
    owner_page = open_board(browser, daemon, board["id"])
    bob_page = open_board(browser, daemon, board["id"], token=bob["token"])
    bob_page.wait_for_function(
        "() => document.querySelectorAll('#facepile .face').length === 2", timeout=WAIT_MS
    )

    world = owner_page.eval_on_selector(
        "#world", "n => { const r = n.getBoundingClientRect(); return [r.left, r.top] }"
    )
    owner_page.mouse.move(world[0] + 300, world[1] + 400)
    owner_page.mouse.move(world[0] + 500, world[1] + 420, steps=10)
    cursor = bob_page.wait_for_selector('.cursor[data-user="owner"]', timeout=WAIT_MS)
    bob_page.wait_for_function(
        "() => document.querySelector('.cursor[data-user=owner]')?.style.transform === 'translate(500px, 420px)'",
        timeout=WAIT_MS,
    )
    assert cursor.text_content() == "owner"
    assert bob_page.locator(f'.cursor[data-user="{bob["id"]}"]').count() == 0  # never your own

    # hidden with the toggle, and no more arrive
    bob_page.click("#toggle-cursors")
    bob_page.wait_for_selector('.cursor[data-user="owner"]', state="detached", timeout=WAIT_MS)
    owner_page.mouse.move(world[0] + 200, world[1] + 200, steps=5)
    owner_page.wait_for_function(
        "() => window.agor.client._presenceOut.pending.size === 0", timeout=WAIT_MS
    )
    bob_page.wait_for_function(
        "() => window.agor.client._boards.values().next().value.cursors.size === 0"
    )
    assert bob_page.locator(".cursor").count() == 0

    # follow mode: click the owner's face, get the owner's viewport
    bob_page.click('#facepile .face[data-user="owner"]')
    bob_page.wait_for_selector("#follow-banner:not([hidden])", timeout=WAIT_MS)
    assert text_of(bob_page, "#follow-name") == "owner"
    owner_page.set_viewport_size({"width": 1200, "height": 700})
    bob_page.wait_for_function(
        "() => window.agor.client._boards.values().next().value.followedViewport?.w === 1200",
        timeout=WAIT_MS,
    )
    assert owner_page.errors == [] and bob_page.errors == []


def test_the_pill_goes_reconnecting_then_live_and_missed_events_arrive_once(
    browser: Any, daemon: DaemonProcess
) -> None:
    api = Api(daemon)
    board = api("POST", "/boards", {"name": "Restart"})
    before = [
        api("POST", "/sessions", {"board_id": board["id"], "title": f"before {n}"})
        for n in range(3)
    ]
    page = open_board(browser, daemon, board["id"])
    page.wait_for_function("() => document.querySelectorAll('.card').length === 3", timeout=WAIT_MS)
    # the page retries only when told (below), so that the writes made while
    # the daemon was down for it are surely missed events, not live ones
    page.evaluate(
        """() => { window.pills = []; const c = window.agor.client
                   c.on('state', s => window.pills.push(s)); c.backoffBaseS = 600; c.random = () => 0.99 }"""
    )
    reloads = stats(page)["reloads"]

    daemon.kill()  # SIGKILL: no drain
    page.wait_for_selector("#status[data-state=reconnecting]", timeout=WAIT_MS)
    daemon.start()
    missed = [
        api("POST", "/sessions", {"board_id": board["id"], "title": f"missed {n}"})
        for n in range(3)
    ]
    assert page.get_attribute("#status", "data-state") == "reconnecting"
    assert page.locator(".card").count() == 3
    page.evaluate("() => window.agor.client.reconnectNow()")
    page.wait_for_selector("#status[data-state=live]", timeout=WAIT_MS)
    ids = [s["id"] for s in before + missed]
    page.wait_for_function(
        'ids => ids.every(id => document.querySelector(`.card[data-id="${id}"]`))',
        arg=ids,
        timeout=WAIT_MS,
    )
    after = api("POST", "/sessions", {"board_id": board["id"], "title": "after"})
    page.wait_for_selector(f'.card[data-id="{after["id"]}"]', timeout=WAIT_MS)
    assert page.locator(".card").count() == 7
    assert page.evaluate("() => window.pills") == ["reconnecting", "live"]
    s = stats(page)
    assert s["duplicatesDropped"] == 0 and s["gaps"] == 0, s
    assert s["reloads"] == reloads, "the board was resumed with since, not reloaded"
    assert s["reconnects"] == 1
    assert page.errors == []


def test_an_optimistic_create_shows_at_once_then_the_real_row(
    browser: Any, daemon: DaemonProcess
) -> None:
    api = Api(daemon)
    board = api("POST", "/boards", {"name": "Optimistic"})
    page = open_board(browser, daemon, board["id"])
    page.evaluate(
        """() => { window.cardIds = []; new MutationObserver(() => {
             window.cardIds.push([...document.querySelectorAll('.card')].map(c => c.dataset.id + (c.classList.contains('pending') ? '*' : '')).join(','))
           }).observe(document.getElementById('cards'), {childList: true, subtree: true, attributes: true}) }"""
    )
    page.click("#new-session")
    page.wait_for_function(
        "() => document.querySelectorAll('.card').length === 1 && !document.querySelector('.card').dataset.id.startsWith('tmp-')",
        timeout=WAIT_MS,
    )
    history = [h for h in page.evaluate("() => window.cardIds") if h]
    assert history[0].startswith("tmp-") and history[0].endswith("*"), history
    assert all("," not in h for h in history), f"never two cards for one create: {history}"
    real_id = page.get_attribute(".card", "data-id")
    rows = api("GET", f"/sessions?board_id={board['id']}")["data"]
    assert [r["id"] for r in rows] == [real_id]
    assert page.locator(".card.pending").count() == 0


def test_a_page_whose_sign_in_ends_says_so_and_offers_signing_in_again(
    browser: Any, daemon: DaemonProcess
) -> None:
    """Bob's password changes while his page is live: the daemon closes the
    page's connection (its browser sign-in is closed), and the page shows
    how to sign in again instead of reconnecting for ever; Alice's page,
    another user's, stays live."""
    api = Api(daemon)
    board = api("POST", "/boards", {"name": "Signed out"})
    bob = api("POST", "/users", {"name": "Bob"})
    api("POST", f"/boards/{board['id']}/add_member", {"user_id": bob["id"]})
    alice_page = open_board(browser, daemon, board["id"])
    bob_page = open_board(browser, daemon, board["id"], token=bob["token"])
    assert bob_page.is_hidden("#signin")
    api("PATCH", f"/users/{bob['id']}", {"password": "a new password 123"})
    bob_page.wait_for_selector("#signin:not([hidden])", timeout=WAIT_MS)
    assert "agor-actors open" in text_of(bob_page, "#signin")
    assert bob_page.get_attribute("#status", "data-state") != "live"
    assert alice_page.get_attribute("#status", "data-state") == "live"
    assert not bob_page.errors and not alice_page.errors


def test_phone_width_has_no_horizontal_scroll(browser: Any, daemon: DaemonProcess) -> None:
    api = Api(daemon)
    board = api("POST", "/boards", {"name": "Phone"})
    for n in range(5):
        api(
            "POST",
            "/sessions",
            {"board_id": board["id"], "title": f"A rather long session title number {n}"},
        )
    page = open_board(browser, daemon, board["id"], viewport=PHONE)
    page.wait_for_function("() => document.querySelectorAll('.card').length === 5", timeout=WAIT_MS)
    widths = page.evaluate(
        """() => ({doc: document.documentElement.scrollWidth, body: document.body.scrollWidth,
                  canvas: [document.getElementById('canvas').scrollWidth, document.getElementById('canvas').clientWidth],
                  cards: [...document.querySelectorAll('.card')].map(c => c.getBoundingClientRect().right),
                  bar: document.querySelector('.topbar').scrollWidth, inner: innerWidth})"""
    )
    assert widths["doc"] <= widths["inner"] and widths["body"] <= widths["inner"], widths
    assert widths["canvas"][0] <= widths["canvas"][1], widths
    assert max(widths["cards"]) <= widths["inner"] and widths["bar"] <= widths["inner"], widths
    # the drawers fit too
    page.click(".card >> nth=0")
    page.wait_for_selector("#session-drawer:not([hidden])", timeout=WAIT_MS)
    assert page.evaluate("() => document.documentElement.scrollWidth <= innerWidth")


def test_screenshots_of_the_board(
    browser: Any, daemon: DaemonProcess, tmp_path: pathlib.Path
) -> None:
    """Desktop and phone, two users, a reply streaming, the activity drawer open."""
    api = Api(daemon)
    board = api("POST", "/boards", {"name": "Agor launch"})
    bob = api("POST", "/users", {"name": "Bob Marley"})
    api("POST", f"/boards/{board['id']}/add_member", {"user_id": bob["id"]})
    sessions = {}
    for title, agent, status in [
        ("Refactor the auth middleware", "claude-code", "running"),
        ("Fix the flaky WebSocket test", "codex", "awaiting_permission"),
        ("Write the release notes", "claude-code", "completed"),
        ("Bump the dependencies", "gemini", "failed"),
        ("Explore a cache for the board room", "claude-code", "idle"),
        ("Profile the fan-out under load", "codex", "running"),
    ]:
        s = api("POST", "/sessions", {"board_id": board["id"], "title": title, "agent": agent})
        if status != "idle":
            api("POST", f"/sessions/{s['id']}/set_status", {"status": status})
        sessions[title] = s
    main = sessions["Refactor the auth middleware"]
    desktop = open_board(browser, daemon, board["id"])
    other = open_board(browser, daemon, board["id"], token=bob["token"])
    other.click(f'.card[data-id="{main["id"]}"]')
    desktop.click(f'.card[data-id="{main["id"]}"]')
    task = api(
        "POST",
        "/tasks",
        {
            "session_id": main["id"],
            "prompt": "Move the token check into one middleware and add tests.",
        },
    )
    api("POST", f"/tasks/{task['id']}/start", {})
    message = api(
        "POST",
        "/messages",
        {"session_id": main["id"], "task_id": task["id"], "role": "assistant", "content": ""},
    )
    reply = (
        "I'll start by reading how each route checks the token today. There are three copies of "
        "the same check: the REST handler, the WebSocket hello and the debug route. I'm moving them into"
    )
    for word in reply.split(" "):
        api("POST", f"/messages/{message['id']}/stream", {"chunk": word + " "})
    desktop.wait_for_function(
        "id => (document.querySelector(`.msg[data-id=\"${id}\"]`)?.textContent ?? '').endsWith('into ')",
        arg=message["id"],
        timeout=WAIT_MS,
    )
    world = other.eval_on_selector(
        "#world", "n => { const r = n.getBoundingClientRect(); return [r.left, r.top] }"
    )
    other.mouse.move(world[0] + 420, world[1] + 300, steps=8)
    desktop.wait_for_selector(".cursor", timeout=WAIT_MS)
    desktop.click("#open-activity")
    desktop.wait_for_selector(".activity-item", timeout=WAIT_MS)
    shots = {"board-desktop.png": desktop}
    desktop.screenshot(path=str(tmp_path / "board-desktop.png"), animations="disabled")
    phone = open_board(browser, daemon, board["id"], viewport=PHONE)
    phone.wait_for_function(
        "() => document.querySelectorAll('.card').length === 6", timeout=WAIT_MS
    )
    phone.screenshot(path=str(tmp_path / "board-phone.png"), animations="disabled")
    shots["board-phone.png"] = phone
    for name in shots:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    if os.environ.get("AGOR_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for name in shots:
            shutil.copyfile(tmp_path / name, SCREENSHOTS / name)
