// The protocol's golden vectors (tests/vectors/, agor.v1.json) through the
// JavaScript client, under Node's test runner: the client's frames equal the
// client vectors, and the server vectors do what PROTOCOL.md says. The peer is
// a scripted socket passed as the `WebSocket` option (no network, as the
// Python machines are tested back to back).
import { test } from "node:test"
import assert from "node:assert/strict"
import { readFileSync } from "node:fs"
import { createClient, CallError } from "../../agor_actors/web/agor-client.js"

const VECTORS = new URL("../vectors/", import.meta.url)
const manifest = JSON.parse(readFileSync(new URL("manifest.json", VECTORS)))
const raw = (name) => readFileSync(new URL(`${name}.json`, VECTORS), "utf8")
const vector = (name) => JSON.parse(raw(name))

class ScriptedSocket {
  static opened = []
  static openWaiters = []
  /** Resolves once the client opened another socket (its backoff timer fired). */
  static nextOpen() { return new Promise((resolve) => ScriptedSocket.openWaiters.push(resolve)) }
  constructor(url, protocols) {
    this.url = url
    this.protocols = protocols
    this.readyState = 0
    this.sent = []
    this.closed = null
    this.waiters = []
    ScriptedSocket.opened.push(this)
    for (const wake of ScriptedSocket.openWaiters.splice(0)) wake()
  }
  send(data) {
    assert.equal(this.readyState, 1, "sent before open")
    this.sent.push(JSON.parse(data))
    for (const wake of this.waiters.splice(0)) wake()
  }
  /** Resolves once a frame was sent (the client's own timers decide when). */
  sentSomething() { return new Promise((resolve) => this.waiters.push(resolve)) }
  close(code = 1000) { this.readyState = 3; this.closed = code }
  // the server's side
  open() { this.readyState = 1; this.onopen?.() }
  deliver(text) { this.onmessage?.({ data: text }) }
  drop() { this.readyState = 3; this.onclose?.({ code: 1006, reason: "" }) }
  take() { return this.sent.splice(0) }
}

function newClient(options = {}) {
  ScriptedSocket.opened = []
  const client = createClient("ws://daemon/ws", {
    WebSocket: ScriptedSocket,
    token: "eyJhbGciOiJIUzI1NiJ9.e30.c2ln",
    clientId: "tab-3f2a",
    random: () => 0, // reconnect at once
    loader: async () => ({}),
    ...options,
  })
  const socket = ScriptedSocket.opened.at(-1)
  socket.open()
  return { client, socket }
}

function welcome(socket) {
  socket.deliver(raw("welcome"))
}

test("the manifest lists the vectors this test uses", () => {
  assert.equal(manifest.subprotocols.json, "agor.v1.json")
  const names = new Set(manifest.valid.map((v) => v.name))
  for (const name of ["hello", "call_create", "call_patch", "call_find", "call_stream", "join", "leave", "batch_client",
    "welcome", "result_ok", "result_error", "joined", "event", "event_merged", "batch_server", "lagged", "left", "left_refused",
    "presence", "presence_viewport", "presence_update", "presence_update_follow", "error", "pong"]) {
    assert.ok(names.has(name), name)
  }
})

test("hello, then welcome: the subprotocol, the hello vector, the live state", () => {
  const { client, socket } = newClient()
  assert.deepEqual(socket.protocols, [manifest.subprotocols.json])
  assert.deepEqual(socket.take(), [vector("hello")])
  assert.equal(client.state, "connecting")
  welcome(socket)
  assert.equal(client.state, "live")
  assert.equal(client.userId, "u-1")
  assert.equal(client.connectionId, "conn-1")
  assert.equal(client.limits.max_batch, manifest.limits.max_batch)
  client.close()
})

test("calls: the call vectors out, the result vectors answer them", async () => {
  const { client, socket } = newClient({ idempotentWrites: false }) // the vectors carry no keys
  welcome(socket)
  socket.take()
  client._nextRef = 7 // the vectors' refs
  const created = client.service("tasks").create({ session_id: "s-1", title: "Write tests" }, { tempId: "tmp-1" })
  const patched = client.service("sessions").patch("s-1", { title: "Renamed" }, { baseRev: 3 })
  client.service("tasks").find({ session_id: "s-1", $limit: 50 }).catch(() => {})
  client.service("messages").call("stream", "m-1", { chunk: "Hello " }).catch(() => {})
  assert.deepEqual(socket.take(), [vector("call_create"), vector("call_patch"), vector("call_find"), vector("call_stream")])
  socket.deliver(raw("result_ok"))
  assert.deepEqual(await created, { id: "t-1", rev: 1 })
  socket.deliver(raw("result_error"))
  await assert.rejects(patched, (err) => err instanceof CallError && err.code === "conflict" && err.data.rev === 4)
  // a lost connection fails the writes in flight with connection_lost; reads are retried
  const write = client.service("tasks").create({ session_id: "s-1", title: "x" })
  socket.drop()
  await assert.rejects(write, (err) => err.code === "connection_lost")
  client.close()
})

test("keyed writes: sent again after a drop and after unavailable, under the same key", async () => {
  const { client, socket } = newClient()
  welcome(socket)
  socket.take()
  const created = client.service("tasks").create({ session_id: "s-1", title: "once" }, { tempId: "tmp-1" })
  const streamed = client.service("messages").call("stream", "m-1", { chunk: "x" }) // no key: offsets do it
  const [first, chunk] = socket.take()
  assert.match(first.idempotency_key, /^key-tab-3f2a-/)
  assert.equal(chunk.idempotency_key, undefined)
  socket.drop() // the answer is lost with the connection
  await assert.rejects(streamed, (err) => err.code === "connection_lost")
  await ScriptedSocket.nextOpen()
  const again = ScriptedSocket.opened.at(-1)
  again.open()
  again.take() // hello
  welcome(again)
  const [resent] = again.take()
  assert.equal(resent.idempotency_key, first.idempotency_key) // the same write, the same key
  assert.deepEqual(resent.data, first.data)
  // the store failed (maybe after its commit): sent again after a backoff
  again.deliver(JSON.stringify({ type: "result", ref: resent.ref, ok: false, error: { code: "unavailable", message: "store" } }))
  await again.sentSomething()
  const [third] = again.take()
  assert.equal(third.idempotency_key, first.idempotency_key)
  again.deliver(JSON.stringify({ type: "result", ref: third.ref, ok: true, data: { id: "t-1", rev: 1, _replayed: true } }))
  assert.deepEqual(await created, { id: "t-1", rev: 1, _replayed: true })
  // a key of the caller's own, and none when the client is told so
  const own = client.service("sessions").patch("s-1", { title: "T" }, { idempotencyKey: "mine-1" })
  assert.equal(again.take()[0].idempotency_key, "mine-1")
  own.catch(() => {})
  client.close()
})

test("keyed writes lost with the connection go again first, ahead of calls queued after them", async () => {
  const { client, socket } = newClient()
  const oneAtATime = JSON.stringify({ ...vector("welcome"), limits: { ...vector("welcome").limits, max_pending_calls: 1 } })
  socket.deliver(oneAtATime)
  socket.take()
  const sessions = client.service("sessions")
  const first = sessions.patch("s-1", { title: "first" })
  const second = sessions.patch("s-1", { title: "second" }) // queued: one call at a time
  const [sent] = socket.take()
  assert.equal(sent.data.title, "first")
  socket.drop()
  await ScriptedSocket.nextOpen()
  const again = ScriptedSocket.opened.at(-1)
  again.open()
  again.take() // hello
  again.deliver(oneAtATime)
  const [resent] = again.take()
  assert.equal(resent.data.title, "first") // the lost one first, under its key
  assert.equal(resent.idempotency_key, sent.idempotency_key)
  again.deliver(JSON.stringify({ type: "result", ref: resent.ref, ok: true, data: { id: "s-1", title: "first" } }))
  assert.deepEqual(await first, { id: "s-1", title: "first" })
  const [next] = again.take()
  assert.equal(next.data.title, "second")
  second.catch(() => {})
  client.close()
})

test("rooms: join, joined, events in seq order once, merged chunks, batches, duplicates, gaps", async () => {
  const events = []
  const { client, socket } = newClient()
  welcome(socket)
  socket.take()
  client.on("event", (ev) => events.push([ev.seq, ev.last_seq ?? ev.seq, ev.own]))
  const joining = client.join("session:s-1")
  assert.deepEqual(socket.take(), [vector("join")])
  socket.deliver(raw("event")) // before joined: ignored
  socket.deliver(raw("joined")) // no since was asked: a reload
  const mirror = await joining
  assert.deepEqual([mirror.epoch, mirror.seq, client.stats.reloads], ["ep-1", 41, 1])
  socket.deliver(raw("event"))
  socket.deliver(raw("event")) // again: a duplicate, dropped
  socket.deliver(raw("event_merged"))
  socket.deliver(raw("batch_server"))
  assert.deepEqual(events, [[42, 42, true], [43, 45, false], [46, 46, false], [47, 47, false]])
  assert.equal(mirror.seq, 47)
  assert.equal(client.stats.duplicatesDropped, 1)
  assert.equal(client.stats.ignored, 1)
  // a gap: not applied, the client resumes from its last seq
  socket.deliver(JSON.stringify({ ...vector("event"), seq: 50 }))
  assert.deepEqual(socket.take(), [{ type: "join", room: "session:s-1", since: { epoch: "ep-1", seq: 47 } }])
  assert.equal(mirror.seq, 47)
  // recovered: the replay follows, then live
  socket.deliver(JSON.stringify({ ...vector("joined"), seq: 50 }))
  for (const seq of [48, 49, 50]) socket.deliver(JSON.stringify({ ...vector("event"), seq }))
  assert.equal(mirror.seq, 50)
  assert.equal(client.stats.reloads, 1)
  // leave, then left
  client.leave("session:s-1")
  assert.deepEqual(socket.take(), [{ type: "leave", room: "session:s-1" }])
  client.close()
})

test("lagged: the client rejoins from min(last, resume_from - 1)", async () => {
  const { client, socket } = newClient()
  welcome(socket)
  socket.take()
  const joining = client.join("board:b-1")
  socket.take()
  socket.deliver(JSON.stringify({ type: "joined", room: "board:b-1", epoch: "ep-9", seq: 1050, recovered: false }))
  await joining
  socket.deliver(raw("lagged"))
  assert.deepEqual(socket.take(), [{ type: "join", room: "board:b-1", since: { epoch: "ep-9", seq: 1041 } }])
  assert.equal(client.stats.lagged, 1)
  client.close()
})

test("a refused join: left with a reason", async () => {
  const { client, socket } = newClient()
  welcome(socket)
  const joining = client.join("session:s-2")
  socket.deliver(raw("left"))
  await assert.rejects(joining, (err) => err.code === "forbidden")
  // with the reason in words, which the error carries
  const refused = client.join("session:s-2")
  socket.deliver(raw("left_refused"))
  await assert.rejects(refused, (err) => err.code === "invalid_field" &&
    err.message === "invalid_field: join session:s-2 refused: join: expected a map, got a string @ $.since")
  client.close()
})

test("a room the server lets go for now (unavailable) is joined again from where it stood", async () => {
  const { client, socket } = newClient()
  welcome(socket)
  const joining = client.join("session:s-1")
  socket.deliver(JSON.stringify({ type: "joined", room: "session:s-1", epoch: "ep-1", seq: 41, recovered: false }))
  const mirror = await joining
  assert.equal(mirror.reloads, 1)
  socket.take()
  const left = []
  client.on("left", (m) => left.push(m.reason))
  let sent = socket.sentSomething()
  socket.deliver(JSON.stringify({ type: "left", room: "session:s-1", reason: "unavailable" }))
  assert.equal(mirror.leftReason, null)
  assert.equal(client.mirror("session:s-1"), mirror)
  await sent // the backoff's timer fired (random() is 0 here)
  assert.deepEqual(socket.take(), [{ type: "join", room: "session:s-1", since: { epoch: "ep-1", seq: 41 } }])
  // refused again: again after a backoff
  sent = socket.sentSomething()
  socket.deliver(JSON.stringify({ type: "left", room: "session:s-1", reason: "unavailable" }))
  await sent
  assert.deepEqual(socket.take(), [{ type: "join", room: "session:s-1", since: { epoch: "ep-1", seq: 41 } }])
  socket.deliver(JSON.stringify({ type: "joined", room: "session:s-1", epoch: "ep-1", seq: 41, recovered: true }))
  socket.deliver(JSON.stringify({ type: "event", room: "session:s-1", seq: 42, event: "task:created", data: { task: { id: "t1" } } }))
  assert.equal(mirror.reloads, 1) // resumed, not reloaded
  assert.equal(mirror.seq, 42)
  assert.deepEqual(left, ["unavailable", "unavailable"])
  // a refusal for good still ends it
  socket.deliver(JSON.stringify({ type: "left", room: "session:s-1", reason: "forbidden" }))
  assert.equal(mirror.leftReason, "forbidden")
  assert.equal(client.mirror("session:s-1"), null)
  client.close()
})

test("reconnect: after the welcome every room is rejoined with since, in one batch", async () => {
  const { client, socket } = newClient()
  welcome(socket)
  const joining = client.join("session:s-1")
  socket.deliver(raw("joined"))
  await joining
  client.join("board:b-1") // not answered before the drop
  socket.take()
  const states = []
  client.on("state", (s) => states.push(s))
  const reopened = ScriptedSocket.nextOpen()
  socket.drop()
  await reopened
  const second = ScriptedSocket.opened.at(-1)
  assert.notEqual(second, socket)
  second.open()
  assert.deepEqual(second.take(), [vector("hello")])
  welcome(second)
  assert.deepEqual(second.take(), [vector("batch_client")])
  assert.deepEqual(states, ["reconnecting", "live"])
  client.close()
})

test("presence: the update vectors out (coalesced), the presence vectors in", async () => {
  const { client, socket } = newClient()
  welcome(socket)
  const board = client.presence("b-1")
  socket.deliver(JSON.stringify({ type: "joined", room: "board:b-1", epoch: "ep-1", seq: 0, recovered: false }))
  board.moveCursor(10, 10)
  board.moveCursor(120.5, 80.0)
  board.setViewport({ x: 0.0, y: 0.0, w: 1920.0, h: 1080.0, zoom: 1.25 })
  board.setView("session:s-1")
  board.setTyping(true)
  await socket.sentSomething() // the throttle's first slot
  const sent = socket.take().filter((m) => m.type === "presence")
  assert.equal(sent.length, 1, "one coalesced frame")
  assert.deepEqual({ ...sent[0], hide_cursors: undefined }, { ...vector("presence_update"), hide_cursors: undefined })
  socket.deliver(raw("presence"))
  assert.equal(board.users.get("u-2").name, "Bob")
  assert.deepEqual(board.cursors.get("u-2"), { x: 300.0, y: 200.5 })
  socket.deliver(raw("presence_viewport"))
  assert.equal(board.followedViewport, null, "a viewport while following nobody is ignored")
  board.hideCursors(true)
  board.follow("u-2")
  await socket.sentSomething() // the next slot, 1/30 s later
  const [follow] = socket.take().filter((m) => m.type === "presence")
  const { board: boardId, ...fields } = follow
  assert.equal(boardId, "b-1")
  assert.deepEqual(fields, vector("presence_update_follow"))
  socket.deliver(raw("presence_viewport"))
  assert.deepEqual(board.followedViewport, vector("presence_viewport").viewport)
  assert.equal(board.cursors.size, 0)
  client.close()
})

test("server errors, pongs and unknown types; bad JSON drops the connection", async () => {
  const { client, socket } = newClient()
  welcome(socket)
  const errors = []
  client.on("error", (err) => errors.push(err.code))
  socket.deliver(raw("error"))
  socket.deliver(raw("pong"))
  socket.deliver(JSON.stringify({ type: "from_the_future" }))
  assert.deepEqual(errors, [vector("error").code])
  assert.equal(client.state, "live")
  socket.deliver("{not json")
  assert.equal(client.state, "reconnecting")
  assert.ok(socket.closed !== null)
  client.close()
})
