// The JavaScript client against a real daemon, under Node's test runner.
// Run by tests/web/test_web_client.py (which starts the daemon and passes
// AGOR_URL and AGOR_TOKEN); Node 20 needs --experimental-websocket (Node 22+
// has a global WebSocket).
import { test, after } from "node:test"
import assert from "node:assert/strict"
import { connect, createClient, applyEvent, backoffS, CallError } from "../../agor_actors/web/agor-client.js"

const URL = process.env.AGOR_URL
const TOKEN = process.env.AGOR_TOKEN
assert.ok(URL && TOKEN, "AGOR_URL and AGOR_TOKEN must be set")

const clients = []
after(() => { for (const c of clients) c.close() })

async function open(options = {}) {
  const client = await connect(URL, { token: TOKEN, backoffBaseS: 0.02, backoffCapS: 0.2, ...options })
  clients.push(client)
  return client
}

/** Resolves when `predicate()` holds, checked on every `emitter` "change";
 * fails after `timeoutMs` (a guard, not a wait). */
function until(emitter, predicate, what, timeoutMs = 5000) {
  return new Promise((resolve, reject) => {
    if (predicate()) { resolve(); return }
    const timer = setTimeout(() => { emitter.off("change", check); reject(new Error(`timed out waiting for ${what}`)) }, timeoutMs)
    const check = () => { if (predicate()) { clearTimeout(timer); emitter.off("change", check); resolve() } }
    emitter.on("change", check)
  })
}

function nextEvent(emitter, name, timeoutMs = 5000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${name} in ${timeoutMs} ms`)), timeoutMs)
    emitter.once(name, (...args) => { clearTimeout(timer); resolve(args) })
  })
}

test("backoff is exponential with full jitter, capped", () => {
  assert.equal(backoffS(0, 0.5), 0.25)
  assert.equal(backoffS(3, 0.5), 2)
  assert.equal(backoffS(20, 0.999), 0.999 * 30)
  assert.equal(backoffS(0, 0), 0)
})

test("a chunk's offset counts code points, as the daemon does: an emoji is one", () => {
  const r = {}
  applyEvent(r, "task:message", { message: { id: "m", session_id: "s", content: "" } })
  applyEvent(r, "task:message", { message_id: "m", chunk: "🚀 go", offset: 0 }) // 4 code points, 5 UTF-16 units
  applyEvent(r, "task:message", { message_id: "m", chunk: "!", offset: 4 })
  assert.equal(r.messages.m.content, "🚀 go!")
  applyEvent(r, "task:message", { message_id: "m", chunk: "o!", offset: 3 }) // replayed, overlapping: nothing new
  assert.equal(r.messages.m.content, "🚀 go!")
  applyEvent(r, "task:message", { message_id: "m", chunk: "o!? 🎉", offset: 3 }) // overlaps, then goes on
  assert.equal(r.messages.m.content, "🚀 go!? 🎉")
  applyEvent(r, "task:message", { message_id: "m", chunk: "x", offset: 8 })
  assert.equal(r.messages.m.content, "🚀 go!? 🎉x")
  r.messages.m.content = "🎉🎉" // replaced by a patch: counted again
  applyEvent(r, "task:message", { message_id: "m", chunk: "🎉", offset: 1 })
  assert.equal(r.messages.m.content, "🎉🎉")
  applyEvent(r, "task:message", { message_id: "m", chunk: "a", offset: 2 })
  assert.equal(r.messages.m.content, "🎉🎉a")
})

test("applyEvent merges whole rows, appends chunks once, cascades deletes", () => {
  const r = {}
  applyEvent(r, "session:created", { session_id: "s", session: { id: "s", title: "A", status: "idle", updated_at: 1 } })
  applyEvent(r, "task:created", { task_id: "t", task: { id: "t", session_id: "s" } })
  applyEvent(r, "task:message", { message: { id: "m", session_id: "s", task_id: "t", content: "" } })
  applyEvent(r, "task:message", { message_id: "m", chunk: "Hello ", offset: 0 })
  applyEvent(r, "task:message", { message_id: "m", chunk: "Hello ", offset: 0 }) // replayed: not twice
  applyEvent(r, "task:message", { message_id: "m", chunk: "world", offset: 6 })
  applyEvent(r, "session:updated", { session_id: "s", updates: { title: "B" }, rev: 2 }, null, 5)
  assert.equal(r.messages.m.content, "Hello world")
  assert.deepEqual([r.sessions.s.title, r.sessions.s.rev, r.sessions.s.updated_at], ["B", 2, 5])
  applyEvent(r, "session:deleted", { session_id: "s" })
  assert.deepEqual([r.sessions.s, r.tasks.t, r.messages.m], [undefined, undefined, undefined])
})

test("a bad token is refused with unauthorized, and the client goes offline", async () => {
  await assert.rejects(connect(URL, { token: "not-a-token" }), (err) => {
    assert.ok(err instanceof CallError)
    assert.equal(err.code, "unauthorized")
    assert.equal(err.message, "unauthorized: invalid token")
    return true
  })
  const client = createClient(URL, { token: "not-a-token" })
  const states = [client.state]
  client.on("state", (s) => states.push(s))
  await nextEvent(client, "closed")
  assert.deepEqual(states, ["connecting", "offline"])
})

test("services: create, get, find, patch, custom methods, errors", async () => {
  const client = await open()
  assert.equal(client.state, "live")
  assert.equal(client.userId, "owner")
  const board = await client.service("boards").create({ name: "js board" })
  const session = await client.service("sessions").create({ board_id: board.id, title: "js", agent: "claude" })
  assert.equal((await client.service("sessions").get(session.id)).title, "js")
  const patched = await client.service("sessions").patch(session.id, { title: "js renamed" })
  assert.equal(patched.title, "js renamed")
  const found = await client.service("sessions").find({ board_id: board.id })
  assert.deepEqual(found.data.map((s) => s.id), [session.id])
  const status = await client.service("sessions").call("set_status", session.id, { status: "running" })
  assert.equal(status.status, "running")
  await assert.rejects(client.service("sessions").get("no-such-id"), (err) => err.code === "not_found")
  await assert.rejects(client.service("nope").find(), (err) => err.code === "unknown_service")
})

test("join: a mirror that follows events; service events know their own echoes", async () => {
  const a = await open()
  const b = await open()
  const board = await a.service("boards").create({ name: "mirror board" })
  const mirror = await b.join(`board:${board.id}`)
  assert.equal(mirror.get("boards", board.id).name, "mirror board")
  const seenByA = []
  const seenByB = []
  await a.join(`board:${board.id}`)
  a.service("sessions").on("created", (row, ev) => seenByA.push([row.id, ev.own]))
  b.service("sessions").on("created", (row, ev) => seenByB.push([row.id, ev.own]))
  const patches = []
  b.service("sessions").on("patched", (row) => patches.push(row.title))
  const session = await a.service("sessions").create({ board_id: board.id, title: "live" })
  await until(mirror, () => mirror.get("sessions", session.id) !== null, "the created session")
  await a.service("sessions").patch(session.id, { title: "live 2" })
  await until(mirror, () => mirror.get("sessions", session.id).title === "live 2", "the patch")
  assert.deepEqual(seenByB, [[session.id, false]])
  await until(a.mirror(`board:${board.id}`), () => seenByA.length === 1, "a's echo")
  assert.deepEqual(seenByA, [[session.id, true]])
  assert.deepEqual(patches, ["live 2"])
  // a message streamed word by word arrives whole, in order, emoji and all
  // (the daemon's offsets count them as one character, JavaScript as two)
  const room = `session:${session.id}`
  const sm = await b.join(room)
  const task = await a.service("tasks").create({ session_id: session.id, prompt: "go" })
  const message = await a.service("messages").create({ session_id: session.id, task_id: task.id, role: "assistant", content: "" })
  const words = "the quick 🚀 brown fox 🎉🎉 jumps over the lazy dog".split(" ")
  for (const w of words) await a.service("messages").call("stream", message.id, { chunk: w + " " })
  await until(sm, () => sm.get("messages", message.id)?.content === words.join(" ") + " ", "the whole message")
  assert.equal((await a.service("messages").get(message.id)).content, words.join(" ") + " ")
  assert.equal(b.stats.duplicatesDropped, 0)
  assert.equal(b.stats.gaps, 0)
})

test("optimistic create shows at once under a temp id, then the real row", async () => {
  const client = await open()
  const board = await client.service("boards").create({ name: "optimistic" })
  const session = await client.service("sessions").create({ board_id: board.id, title: "o" })
  const mirror = await client.join(`session:${session.id}`)
  const snapshots = []
  mirror.on("change", () => snapshots.push(mirror.items("tasks").map((t) => [t.id, !!t._pending])))
  const pending = client.service("tasks").create({ session_id: session.id, prompt: "fast" }, { tempId: "tmp-42" })
  assert.deepEqual(mirror.items("tasks").map((t) => [t.id, t._pending]), [["tmp-42", true]])
  const row = await pending
  await until(mirror, () => mirror.items("tasks").length === 1 && mirror.get("tasks", row.id) !== null, "the real row")
  assert.deepEqual(mirror.items("tasks").map((t) => t.id), [row.id])
  assert.deepEqual(snapshots[0], [["tmp-42", true]])
  assert.ok(snapshots.every((s) => s.length === 1), `never two rows for one create: ${JSON.stringify(snapshots)}`)
  // a refused create drops its optimistic copy
  await assert.rejects(client.service("tasks").create({ session_id: session.id, prompt: 5 }))
  assert.deepEqual(mirror.items("tasks").map((t) => t.id), [row.id])
})

test("reconnect: the socket dies, the mirror resumes with since, nothing lost or doubled", async () => {
  const watcher = await open()
  const writer = await open()
  const board = await writer.service("boards").create({ name: "resume" })
  const session = await writer.service("sessions").create({ board_id: board.id, title: "r" })
  const room = `session:${session.id}`
  const mirror = await watcher.join(room)
  const ids = []
  for (let i = 0; i < 5; i++) ids.push((await writer.service("tasks").create({ session_id: session.id, prompt: `before ${i}` })).id)
  await until(mirror, () => mirror.items("tasks").length === 5, "5 tasks")
  const states = []
  watcher.on("state", (s) => states.push(s))
  const reloadsBefore = watcher.stats.reloads
  const appliedBefore = mirror.applied
  const welcomed = nextEvent(watcher, "welcome")
  watcher.dropConnection()
  assert.equal(watcher.state, "reconnecting")
  for (let i = 0; i < 5; i++) ids.push((await writer.service("tasks").create({ session_id: session.id, prompt: `during ${i}` })).id)
  await welcomed
  for (let i = 0; i < 3; i++) ids.push((await writer.service("tasks").create({ session_id: session.id, prompt: `after ${i}` })).id)
  await until(mirror, () => ids.every((id) => mirror.get("tasks", id)), "all 13 tasks")
  assert.deepEqual(states, ["reconnecting", "live"])
  assert.equal(watcher.stats.reconnects, 1)
  assert.equal(watcher.stats.reloads, reloadsBefore, "resumed, not reloaded")
  assert.equal(watcher.stats.duplicatesDropped, 0)
  assert.equal(watcher.stats.gaps, 0)
  assert.equal(mirror.applied - appliedBefore, 8)
  assert.equal(mirror.items("tasks").length, 13)
  // a fresh client's reload equals the resumed mirror
  const fresh = await open()
  const other = await fresh.join(room)
  assert.deepEqual(JSON.parse(JSON.stringify(other.resources)), JSON.parse(JSON.stringify(mirror.resources)))
})

test("a burst of calls is paced to the server's limits: none refused for good, no flood", async () => {
  const client = await open()
  // 1,000 at once: more than max_pending_calls (64) and than the rate's burst (400)
  const results = await Promise.all(Array.from({ length: 1000 }, () => client.service("sessions").find({ $limit: 1 })))
  assert.equal(results.length, 1000)
  assert.ok(results.every((r) => Array.isArray(r.data)))
  assert.equal(client.state, "live")
  assert.equal(client.stats.reconnects, 0)
})

test("a call made while reconnecting waits for the connection", async () => {
  const client = await open()
  client.dropConnection()
  const boards = await client.service("boards").find({ $limit: 1 })
  assert.ok(Array.isArray(boards.data))
  assert.equal(client.state, "live")
})

test("presence: facepile, throttled cursors, hide cursors, follow", async () => {
  const admin = await open()
  const board = await admin.service("boards").create({ name: "presence" })
  const bob = await admin.service("users").create({ name: "Bob" })
  await admin.service("boards").call("add_member", board.id, { user_id: bob.id })
  const alice = await open()
  const bobClient = await open({ token: bob.token })
  const pa = alice.presence(board.id)
  const pb = bobClient.presence(board.id)
  await until(pa, () => pa.users.has(bob.id) && pa.users.has("owner"), "both users in alice's facepile")
  assert.equal(pa.users.get(bob.id).name, "Bob")
  assert.ok(["active", "idle", "away"].includes(pa.users.get(bob.id).status))
  pa.setViewport({ x: 0, y: 0, w: 2000, h: 2000 })
  pb.setViewport({ x: 0, y: 0, w: 2000, h: 2000 })
  // 100 moves at once: throttled to at most 30 a second, the last one always sent
  const sentBefore = bobClient._presenceOut.sent
  for (let i = 1; i <= 100; i++) pb.moveCursor(i, 2 * i)
  await until(pa, () => pa.cursors.get(bob.id)?.x === 100 && pa.cursors.get(bob.id)?.y === 200, "bob's last cursor")
  assert.ok(bobClient._presenceOut.sent - sentBefore <= 5, `coalesced: ${bobClient._presenceOut.sent - sentBefore} frames`)
  // follow: alice gets bob's viewport
  pa.follow(bob.id)
  pb.setViewport({ x: 640, y: 320, w: 800, h: 600 })
  await until(pa, () => pa.followedViewport?.x === 640, "bob's viewport")
  // hide cursors: none are kept
  pa.hideCursors(true)
  pb.moveCursor(5, 5)
  assert.equal(pa.cursors.size, 0)
  // a highlight when bob changes the board
  const highlight = nextEvent(pa, "highlight")
  await bobClient.service("sessions").create({ board_id: board.id, title: "by bob" })
  const [h] = await highlight
  assert.equal(h.user_id, bob.id)
  assert.equal(h.target_type, "session")
})

test("activity: pages newest first, with a cursor", async () => {
  const client = await open()
  const board = await client.service("boards").create({ name: "activity" })
  for (let i = 0; i < 5; i++) await client.service("sessions").create({ board_id: board.id, title: `s${i}` })
  const first = await client.activity(board.id, { limit: 4 })
  assert.equal(first.data.length, 4)
  assert.ok(first.next_cursor)
  const second = await client.activity(board.id, { limit: 4, cursor: first.next_cursor })
  const ids = [...first.data, ...second.data].map((e) => e.id)
  assert.equal(new Set(ids).size, ids.length)
  assert.deepEqual([...ids].sort((x, y) => y - x), ids)
  assert.equal(ids.length, 6) // board:created + 5 sessions
})

test("an expiring access token is renewed in band, and after a 4002 the client refreshes and reconnects", async () => {
  // another host name: Node's fetch keeps its HTTP connection alive and its
  // WebSocket would be sent on it, but the daemon routes /ws per connection
  const http = URL.replace(/^ws/, "http").replace(/\/ws$/, "").replace("127.0.0.1", "localhost")
  const post = async (path, body, token) => {
    const headers = { "Content-Type": "application/json" }
    if (token) headers.Authorization = `Bearer ${token}`
    const reply = await fetch(http + path, { method: "POST", headers, body: JSON.stringify(body) })
    const data = await reply.json()
    if (!reply.ok) throw new CallError(data.code, data.message)
    return data
  }
  const name = `js-${Date.now().toString(36)}`
  await post("/users", { name, password: "js password" }, TOKEN)
  let tokens = await post("/authentication", { strategy: "local", name, password: "js password" })
  const rotate = async () => {
    tokens = await post("/authentication", { strategy: "refresh", refreshToken: tokens.refreshToken })
    return tokens.accessToken
  }
  // in band: the renewal goes through on the same connection
  let renewed
  const secondRefresh = new Promise((resolve) => { renewed = resolve })
  let calls = 0
  const renewing = await open({ token: tokens.accessToken, refreshBeforeMs: 2000, refresh: async () => { calls += 1; if (calls === 2) renewed(); return rotate() } })
  assert.ok(renewing.expiresAt > Date.now())
  const connection = renewing.connectionId
  await Promise.race([secondRefresh, new Promise((_, reject) => setTimeout(() => reject(new Error("no renewal")), 15000))])
  assert.ok(renewing.stats.renewals >= 1)
  assert.equal(renewing.connectionId, connection)
  renewing.close()
  // the renewal fails once: the server closes with 4002, the client refreshes and reconnects
  let failed = false
  const expiring = await open({ token: tokens.accessToken, refresh: async () => { if (!failed) { failed = true; throw new Error("down") } return rotate() } })
  const first = expiring.connectionId
  await nextEvent(expiring, "welcome", 15000)
  assert.notEqual(expiring.connectionId, first)
  assert.equal(expiring.stats.reconnects, 1)
  const made = await expiring.service("sessions").create({ title: "after a refresh" })
  assert.equal(made.title, "after a refresh")
})

test("a refused join throws the server's reason in words", async () => {
  const client = await open()
  await assert.rejects(client.join("session:gone"), (err) => {
    assert.ok(err instanceof CallError)
    assert.equal(err.code, "forbidden")
    assert.equal(err.message, "forbidden: join session:gone refused: no room 'session:gone' that this user may see")
    return true
  })
})

// a port nothing listens on (refused at once)
const REFUSED = "ws://127.0.0.1:9/ws"

test("connect to where no daemon listens, or to a wrong path, rejects with unavailable at once", { timeout: 10_000 }, async () => {
  for (const url of [REFUSED, URL.replace(/\/ws$/, "/nows")]) {
    await assert.rejects(connect(url, { token: TOKEN, backoffBaseS: 0.02 }), (err) => {
      assert.ok(err instanceof CallError)
      assert.equal(err.code, "unavailable")
      assert.ok(err.message.startsWith(`unavailable: cannot connect to ${url}: `), err.message)
      return true
    })
  }
})

test("refused reconnects are tried again until the daemon answers (also when the socket only errors)", { timeout: 10_000 }, async () => {
  // counts the client's attempts; after `refusals` to REFUSED, points it back
  function counting(refusals, good) {
    const seen = { attempts: 0 }
    seen.WebSocket = class extends globalThis.WebSocket {
      constructor(url, protocols) {
        seen.attempts += 1
        super(seen.attempts > refusals ? good : url, protocols)
      }
    }
    return seen
  }
  const seen = counting(4, URL)
  const client = await open({ WebSocket: seen.WebSocket })
  client.url = REFUSED
  const states = []
  client.on("state", (s) => states.push(s))
  const welcomed = nextEvent(client, "welcome")
  seen.attempts = 0
  client.dropConnection()
  await welcomed
  assert.equal(seen.attempts, 5, "4 refused, the fifth welcomed")
  assert.deepEqual(states, ["reconnecting", "live"])
  const boards = await client.service("boards").find({ $limit: 1 })
  assert.ok(Array.isArray(boards.data))
  // a first connection is retried too, when asked
  const late = counting(3, URL)
  const first = createClient(REFUSED, { token: TOKEN, backoffBaseS: 0.02, backoffCapS: 0.05, retryFirst: true, WebSocket: late.WebSocket })
  clients.push(first)
  await first.ready()
  assert.equal(late.attempts, 4)
})
