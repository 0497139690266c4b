// agor-client.js: the browser (and Node 20+) client of the agor wire protocol
// (protocols/PROTOCOL.md, subprotocol agor.v1.json). A plain ES module, no
// build step, no dependency.
//
//   import { connect } from "/client/agor-client.js"
//   const client = await connect("ws://127.0.0.1:3030/ws", { token })  // no token: the session cookie
//   const tasks = client.service("tasks")
//   await tasks.create({ session_id, prompt: "Write tests" })           // optimistic in a joined mirror
//   tasks.on("created", (task, ev) => ...)                              // events of joined rooms
//   const mirror = await client.join(`session:${id}`)                   // a live copy of the room
//   mirror.on("change", () => render(mirror.items("tasks")))
//   const board = client.presence(boardId)                              // facepile, cursors, follow
//   board.moveCursor(x, y); board.on("change", ...)
//   client.on("state", (s) => pill.textContent = s)                     // connecting|live|reconnecting|offline
//
// Behaviour follows the Python client (agor_actors/client): reconnect with
// exponential backoff and full jitter, rejoin every room with `since`, apply
// each seq exactly once in order, reload a room after `recovered: false`,
// optimistic creates under a `temp_id`, own echoes recognised by `origin`,
// presence sent coalesced and throttled. In Node 20 pass `WebSocket` (the
// `ws` package) or run with --experimental-websocket.
//
// Access tokens (from POST /authentication) expire: pass `refresh` (an async
// function returning a new access token, e.g. one that posts the refresh
// token) and the client renews in band (`auth`) `refreshBeforeMs` before
// `welcome.expires_at`; after a `token_expired` close (4002) it refreshes,
// reconnects and resumes every room with `since`.

export const PROTOCOL_VERSION = 1
export const SUBPROTOCOL = "agor.v1.json"
export const STATES = Object.freeze(["connecting", "live", "reconnecting", "offline"])
export const FATAL_CLOSE_CODES = new Set([4001])
export const TOKEN_EXPIRED_CLOSE = 4002
export const PRESENCE_RATE_PER_S = 30
export const MAX_RESUMES = 3
/** A room's `left` with one of these says the server cannot take the client
 * in now (its room could not start: the store away; a crash; too many
 * joins): the room stays wanted, its mirror kept, and it is joined again
 * after a backoff from where the mirror stands (as a Phoenix channel
 * rejoins after an error), until `leave`. */
export const REJOIN_CODES = new Set(["internal", "server_error", "rate_limited", "unavailable"])
/** A call refused with `rate_limited` is sent again this many times at
 * most, each after the `retry_after_ms` the server names. */
export const RATE_LIMITED_RETRIES = 5
/** How often a write under an idempotency key answered `unavailable` is sent again. */
export const WRITE_RETRIES = 3
/** The services whose writes take an idempotency key. */
export const KEYED_SERVICES = new Set(["sessions", "tasks", "messages", "boards"])

/** Seconds to wait before reconnect attempt `attempt` (0 first): exponential
 * from `baseS`, capped at `capS`, full jitter over the whole window. */
export function backoffS(attempt, random01, baseS = 0.5, capS = 30) {
  return random01 * Math.min(capS, baseS * 2 ** Math.min(attempt, 1000))
}

/** An error a call, join or connect got: `code` is a protocol error code. */
export class CallError extends Error {
  constructor(code, message, data = null) {
    super(`${code}: ${message}`)
    this.name = "CallError"
    this.code = code
    this.data = data
  }
}

/** A tiny event emitter (works the same in browsers and Node). */
class Emitter {
  constructor() { this._handlers = new Map() }
  on(name, fn) {
    if (!this._handlers.has(name)) this._handlers.set(name, new Set())
    this._handlers.get(name).add(fn)
    return this
  }
  off(name, fn) { this._handlers.get(name)?.delete(fn); return this }
  once(name, fn) {
    const wrapper = (...args) => { this.off(name, wrapper); fn(...args) }
    return this.on(name, wrapper)
  }
  emit(name, ...args) {
    for (const fn of [...(this._handlers.get(name) ?? [])]) {
      try { fn(...args) } catch (err) { console.error(`agor-client: a "${name}" handler failed`, err) }
    }
  }
}

// ------------------------------------------------------------------ mirror

/** The resource an event names and the service it belongs to. */
export const RESOURCE_SERVICES = Object.freeze({
  board: "boards", session: "sessions", task: "tasks", message: "messages",
  tool_call: "tool_calls", user: "users",
})
const CASCADE = { sessions: ["session_id", ["tasks", "messages", "tool_calls"]], tasks: ["task_id", ["messages", "tool_calls"]] }
const DELETED = new Set(["deleted", "removed"])

function publicRow(row) {
  const out = {}
  for (const [k, v] of Object.entries(row)) if (!k.startsWith("_")) out[k] = v
  return out
}

function table(resources, service) {
  if (!resources[service]) resources[service] = {}
  return resources[service]
}

function removeRow(resources, service, id) {
  if (resources[service]) delete resources[service][id]
  const cascade = CASCADE[service]
  if (!cascade) return
  const [key, dependents] = cascade
  for (const dep of dependents) {
    for (const [childId, row] of Object.entries(resources[dep] ?? {})) {
      if (row[key] === id) removeRow(resources, dep, childId)
    }
  }
}

// The daemon counts a message's characters in code points (a character
// beyond U+FFFF, an emoji say, is one); JavaScript's strings count UTF-16
// units (two for such a character). A chunk's `offset` is in code points.
const CODE_POINTS = new WeakMap() // message row -> [its content, that content's length in code points]

function pairAt(s, i) {
  const c = s.charCodeAt(i)
  if (c < 0xd800 || c > 0xdbff || i + 1 >= s.length) return false
  const d = s.charCodeAt(i + 1)
  return d >= 0xdc00 && d <= 0xdfff
}

function codePoints(s) {
  let n = 0
  for (let i = 0; i < s.length; i += pairAt(s, i) ? 2 : 1) n++
  return n
}

/** The UTF-16 index at which code point `cp` of `s` starts (`s.length` past its end). */
function unitIndex(s, cp) {
  let i = 0
  for (let n = 0; n < cp && i < s.length; n++) i += pairAt(s, i) ? 2 : 1
  return i
}

/** Append a streamed chunk. With `offset` (the content's length in code
 * points before it), a chunk already there (a replay) is not applied twice;
 * its length is kept per row, so that an append reads only the chunk. */
function appendChunk(message, chunk, offset) {
  const text = typeof message.content === "string" ? message.content : ""
  const known = CODE_POINTS.get(message)
  const length = known && known[0] === text ? known[1] : codePoints(text)
  const size = codePoints(chunk)
  let after = length + size
  if (Number.isInteger(offset) && offset >= 0) {
    if (offset + size <= length) after = length // there already
    else if (offset >= length) message.content = text + chunk
    else {
      message.content = text.slice(0, unitIndex(text, offset)) + chunk
      after = offset + size
    }
  } else {
    message.content = text + chunk
  }
  CODE_POINTS.set(message, [message.content, after])
}

function touch(row, ts) { if (ts != null && "updated_at" in row) row.updated_at = ts }

/** Apply one room event to `resources` ({service: {id: row}}) in place: the
 * same rules as the Python client's `apply_event`. Returns what changed as
 * [service, id, kind] with kind "created" | "patched" | "removed", or null. */
export function applyEvent(resources, name, data, tempId = null, ts = null) {
  if (data === null || typeof data !== "object" || Array.isArray(data)) return null
  const [prefix, action] = name.split(":", 2)
  let changed = null
  for (const [key, service] of Object.entries(RESOURCE_SERVICES)) {
    const value = data[key]
    if (value && typeof value === "object" && typeof value.id === "string") {
      if (tempId != null && resources[service]) delete resources[service][tempId]
      const rows = table(resources, service)
      const existed = value.id in rows
      rows[value.id] = existed ? Object.assign(rows[value.id], publicRow(value)) : publicRow(value)
      changed = [service, value.id, existed ? "patched" : "created"]
    }
  }
  if (changed) return changed
  if (name === "task:message") {
    const id = data.message_id
    if (typeof id !== "string") return null
    if (data.deleted === true) { removeRow(resources, "messages", id); return ["messages", id, "removed"] }
    const message = resources.messages?.[id]
    if (!message) return null
    touch(message, ts)
    if (typeof data.chunk === "string") {
      appendChunk(message, data.chunk, data.offset)
      message.streaming = true
    }
    for (const [k, v] of Object.entries(data)) {
      if (!["chunk", "offset", "message_id", "task_id"].includes(k)) message[k] = v
    }
    return ["messages", id, "patched"]
  }
  if (name === "git:state_changed") {
    const session = resources.sessions?.[data.session_id]
    if (!session) return null
    session.git_state = data.git_state ?? null
    touch(session, ts)
    return ["sessions", data.session_id, "patched"]
  }
  const target = RESOURCE_SERVICES[prefix]
  const id = data[`${prefix}_id`]
  if (!target || typeof id !== "string") return null
  if (DELETED.has(action)) { removeRow(resources, target, id); return [target, id, "removed"] }
  const current = resources[target]?.[id]
  if (!current) return null
  touch(current, ts)
  if (data.updates && typeof data.updates === "object") {
    Object.assign(current, data.updates)
    if (Number.isInteger(data.rev)) current.rev = data.rev
  } else {
    for (const [k, v] of Object.entries(data)) if (k !== `${prefix}_id`) current[k] = v
  }
  return [target, id, "patched"]
}

/** A live copy of one joined room's resources. Emits "change" (after every
 * applied event, reload or optimistic change), "reload" and "left". */
export class Mirror extends Emitter {
  constructor(room) {
    super()
    this.room = room
    this.resources = {}
    this.epoch = null
    this.seq = 0
    this.applied = 0
    this.reloads = 0
    this.leftReason = null
    this.leftMessage = null
    this._reloading = false
    this._buffer = []
    this._pending = new Map() // temp_id -> [service, row]
    this.ready = new Promise((resolve) => { this._resolveReady = resolve })
  }
  get(service, id) { return this.resources[service]?.[id] ?? null }
  /** The rows of `service` as an array (optimistic ones have `_pending: true`). */
  items(service) { return Object.values(this.resources[service] ?? {}) }
  get reloading() { return this._reloading }

  _changed(info) { this.emit("change", info) }
  _apply(ev) {
    this.seq = ev.last_seq ?? ev.seq
    if (this._reloading) { this._buffer.push(ev); return }
    const info = applyEvent(this.resources, ev.event, ev.data, ev.temp_id ?? null, ev.ts ?? null)
    if (ev.temp_id != null) this._pending.delete(ev.temp_id)
    this.applied += 1
    this._changed({ event: ev, change: info })
  }
  _joined(epoch, seq) { this.epoch = epoch; this.seq = seq }
  _beginReload(epoch, seq) {
    this.epoch = epoch; this.seq = seq; this._reloading = true; this._buffer = []
  }
  _finishReload(resources) {
    this.resources = {}
    for (const [service, rows] of Object.entries(resources)) this.resources[service] = { ...rows }
    for (const ev of this._buffer) {
      applyEvent(this.resources, ev.event, ev.data, ev.temp_id ?? null, ev.ts ?? null)
      if (ev.temp_id != null) this._pending.delete(ev.temp_id)
      this.applied += 1
    }
    this._buffer = []
    for (const [tempId, [service, row]] of this._pending) table(this.resources, service)[tempId] = { ...row }
    this._reloading = false
    this.reloads += 1
    this._resolveReady(this)
    this.emit("reload", this)
    this._changed({ reload: true })
  }
  _left(reason, message = null) {
    this.leftReason = reason
    this.leftMessage = message
    this._resolveReady(this)
    this.emit("left", reason)
    this._changed({ left: reason })
  }
  _putOptimistic(service, tempId, data) {
    const row = { ...data, id: tempId, _pending: true }
    this._pending.set(tempId, [service, row])
    table(this.resources, service)[tempId] = { ...row }
    this._changed({ optimistic: tempId })
  }
  _settle(service, tempId, row) {
    const awaited = this._pending.delete(tempId)
    const rows = table(this.resources, service)
    delete rows[tempId]
    if (awaited && !this._reloading && row && typeof row.id === "string" && !(row.id in rows)) {
      rows[row.id] = publicRow(row)
    }
    this._changed({ settled: tempId, id: row?.id ?? null })
  }
}

/** Loads a room's resources after a `recovered: false` join. */
export async function loadRoom(client, room) {
  const [kind, ...rest] = room.split(":")
  const ident = rest.join(":")
  const getOrNone = async (service) => {
    try { return { [ident]: await client.service(service).get(ident) } } catch (err) {
      if (err.code === "not_found") return {}
      throw err
    }
  }
  const allOf = async (service, key) => {
    const rows = await client.service(service).findAll({ [key]: ident })
    return Object.fromEntries(rows.map((r) => [r.id, publicRow(r)]))
  }
  if (kind === "session") {
    return { sessions: await getOrNone("sessions"), tasks: await allOf("tasks", "session_id"), messages: await allOf("messages", "session_id") }
  }
  if (kind === "board") return { boards: await getOrNone("boards"), sessions: await allOf("sessions", "board_id") }
  return {}
}

// ---------------------------------------------------------------- services

const SERVICE_EVENTS = { created: "created", updated: "patched", patched: "patched", status_changed: "patched", deleted: "removed", removed: "removed" }
const OPTIMISTIC_ROOMS = { tasks: ["session", "session_id"], messages: ["session", "session_id"], sessions: ["board", "board_id"] }

/** `client.service(name)`: Feathers-like methods, and "created" / "patched" /
 * "removed" events of that service (from the rooms the client joined). */
export class Service extends Emitter {
  constructor(client, name) { super(); this.client = client; this.name = name }
  find(query = {}) { return this.client.call(this.name, "find", { query }) }
  async findAll(query = {}) {
    const items = []
    let cursor = null
    for (;;) {
      const page = await this.find({ $limit: 500, ...query, ...(cursor ? { $cursor: cursor } : {}) })
      items.push(...(page.data ?? []))
      cursor = page.next_cursor
      if (!cursor) return items
    }
  }
  get(id) { return this.client.call(this.name, "get", { id }) }
  /** Create; the mirror of the room the new row belongs to (if joined) shows
   * it at once under `tempId` (`_pending: true`), swapped for the real row
   * when the result (or its event) arrives, dropped if the create fails. */
  async create(data, { tempId, idempotencyKey } = {}) {
    const client = this.client
    tempId = tempId ?? client._newTempId()
    const mirrors = client._optimisticMirrors(this.name, data)
    for (const m of mirrors) m._putOptimistic(this.name, tempId, data)
    let row
    try {
      row = await client.call(this.name, "create", { data, temp_id: tempId, idempotency_key: idempotencyKey })
    } catch (err) {
      for (const m of mirrors) m._settle(this.name, tempId, null)
      throw err
    }
    for (const m of mirrors) m._settle(this.name, tempId, row)
    return row
  }
  update(id, data, { baseRev, idempotencyKey } = {}) {
    return this.client.call(this.name, "update", { id, data, base_rev: baseRev, idempotency_key: idempotencyKey })
  }
  patch(id, data, { baseRev, idempotencyKey } = {}) {
    return this.client.call(this.name, "patch", { id, data, base_rev: baseRev, idempotency_key: idempotencyKey })
  }
  remove(id, { idempotencyKey } = {}) { return this.client.call(this.name, "remove", { id, idempotency_key: idempotencyKey }) }
  /** A custom method: `tasks.call("start", id)`, `messages.call("stream", id, {chunk})`. */
  call(method, id = null, data = null, { query, baseRev, idempotencyKey } = {}) {
    return this.client.call(this.name, method, { id, data, query, base_rev: baseRev, idempotency_key: idempotencyKey })
  }
}

// ---------------------------------------------------------------- presence

function finite(v) { return typeof v === "number" && Number.isFinite(v) }

/** Presence on one board: `users` (facepile, by id), `cursors` (others',
 * latest per user), `followedViewport`, `highlights`; and this client's own
 * presence, sent coalesced and throttled. Emits "change" and "highlight". */
export class BoardPresence extends Emitter {
  constructor(client, boardId, { maxHighlights = 100 } = {}) {
    super()
    this.client = client
    this.boardId = boardId
    this.room = `board:${boardId}`
    this.users = new Map()
    this.cursors = new Map()
    this.followedViewport = null
    this.following = null
    this.hidingCursors = false
    this.highlights = []
    this.maxHighlights = maxHighlights
    this.frames = 0
  }
  /** The facepile without this client's own user. */
  others() { return [...this.users.values()].filter((u) => u.user_id !== this.client.userId) }
  moveCursor(x, y) { this.client._presenceOut.update(this.boardId, { cursor: { x, y } }) }
  setViewport({ x, y, w, h, zoom = 1 }) { this.client._presenceOut.update(this.boardId, { viewport: { x, y, w, h, zoom } }) }
  setView(view) { this.client._presenceOut.update(this.boardId, { view }) }
  setTyping(typing) { this.client._presenceOut.update(this.boardId, { typing: !!typing }) }
  hideCursors(hide = true) {
    this.hidingCursors = !!hide
    if (hide) this.cursors.clear()
    this.client._presenceOut.update(this.boardId, { hide_cursors: !!hide })
    this.emit("change", this)
  }
  /** Follow `userId`'s viewport; null or "" stops following. */
  follow(userId) {
    this.following = userId || null
    this.followedViewport = null
    this.client._presenceOut.update(this.boardId, { follow: userId || "" })
    this.emit("change", this)
  }
  _apply(frame) {
    if (Array.isArray(frame.users)) {
      this.users = new Map()
      for (const u of frame.users) if (u && typeof u.user_id === "string") this.users.set(u.user_id, u)
      for (const id of [...this.cursors.keys()]) if (!this.users.has(id)) this.cursors.delete(id)
    }
    if (Array.isArray(frame.cursors) && !this.hidingCursors) {
      for (const c of frame.cursors) {
        if (c && typeof c.user_id === "string" && finite(c.x) && finite(c.y)) this.cursors.set(c.user_id, { x: c.x, y: c.y })
      }
    }
    if (frame.viewport && this.following) this.followedViewport = frame.viewport
    for (const h of frame.highlights ?? []) {
      this.highlights.push(h)
      if (this.highlights.length > this.maxHighlights) this.highlights.shift()
      this.emit("highlight", h)
    }
    this.frames += 1
    this.emit("change", this)
  }
  _left(reason) {
    this.users.clear(); this.cursors.clear(); this.followedViewport = null
    this.emit("change", this)
  }
}

const REMEMBERED = ["view", "viewport", "hide_cursors", "follow"]

/** This client's presence: updates merge into one pending update per board
 * (newest value of each field wins); at most `ratePerS` go out a second, the
 * newest values always last. View, viewport, hidden cursors and followed user
 * are sent again after a reconnect. */
class PresenceSender {
  constructor(client, ratePerS) {
    this.client = client
    this.intervalMs = 1000 / ratePerS
    this.pending = new Map() // board -> fields
    this.remembered = new Map()
    this.lastSentMs = -Infinity
    this.timer = null
    this.sent = 0
  }
  update(board, fields) {
    const pending = this.pending.get(board) ?? {}
    Object.assign(pending, fields)
    this.pending.set(board, pending)
    const kept = this.remembered.get(board) ?? {}
    for (const k of REMEMBERED) if (k in fields) kept[k] = fields[k]
    this.remembered.set(board, kept)
    this._schedule()
  }
  restore(board) { this.update(board, { ...(this.remembered.get(board) ?? {}) }) }
  _schedule() {
    if (this.timer !== null || this.pending.size === 0 || !this.client.connected) return
    const wait = Math.max(0, this.lastSentMs + this.intervalMs - this.client._now())
    this.timer = setTimeout(() => { this.timer = null; this._flush() }, wait)
  }
  _flush() {
    if (!this.client.connected) return
    const [board, fields] = this.pending.entries().next().value ?? []
    if (board === undefined) return
    this.pending.delete(board)
    this.client._sendMessage({ type: "presence", board, ...fields })
    this.lastSentMs = this.client._now()
    this.sent += 1
    this._schedule()
  }
  stop() { if (this.timer !== null) clearTimeout(this.timer); this.timer = null }
}

// ------------------------------------------------------------------ client

let clientCounter = 0

/** The connection to the daemon, kept open across drops. Use `connect()` or
 * `createClient()`. Emits "state" (connecting | live | reconnecting |
 * offline), "welcome", "event" (every applied room event, with `own`),
 * "reload", "left", "error" (server error frames), "closed". */
export class Client extends Emitter {
  constructor(url, options = {}) {
    super()
    this.url = url
    this.token = options.token ?? null
    this.refresh = options.refresh ?? null
    this.refreshBeforeMs = options.refreshBeforeMs ?? 60_000
    this.expiresAt = null
    this._renewTimer = null
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket
    if (typeof this.WebSocket !== "function") {
      throw new TypeError("no WebSocket: pass options.WebSocket (the ws package) or run Node with --experimental-websocket")
    }
    this.clientId = options.clientId ?? `js-${Date.now().toString(36)}-${(++clientCounter).toString(36)}-${Math.random().toString(36).slice(2, 8)}`
    this.backoffBaseS = options.backoffBaseS ?? 0.5
    this.backoffCapS = options.backoffCapS ?? 30
    this.random = options.random ?? Math.random
    this.callTimeoutMs = options.callTimeoutMs ?? 30_000
    this.idempotentWrites = options.idempotentWrites ?? true
    this.loader = options.loader ?? loadRoom
    // false (connect's default): a first connection that fails before the
    // server's welcome rejects ready() instead of retrying (a page retries)
    this.retryFirst = options.retryFirst ?? true
    this._now = options.now ?? (() => (globalThis.performance ? performance.now() : Date.now()))
    this.state = "connecting"
    this.userId = null
    this.connectionId = null
    this.ownConnectionIds = new Set()
    this.limits = {}
    this.heartbeatMs = 15_000
    this.closeReason = null
    this.stats = { renewals: 0, reconnects: 0, applied: 0, duplicatesDropped: 0, gaps: 0, resumes: 0, reloads: 0, lagged: 0, ignored: 0, rateLimited: 0 }
    this._ws = null
    this._welcomed = false
    this._everWelcomed = false
    this._closed = false
    this._attempt = 0
    this._nextRef = 1
    this._pending = new Map() // ref -> {resolve, reject, timer, read, request}
    this._waiting = [] // calls queued until welcomed: () => void
    this._rooms = new Map() // room -> {status, epoch, seq, requestedSince, leaves, resumes}
    this._mirrors = new Map()
    this._joinWaiters = new Map() // room -> [{resolve, reject}]
    this._services = new Map()
    this._boards = new Map()
    this._presenceOut = new PresenceSender(this, Math.min(options.presenceRatePerS ?? PRESENCE_RATE_PER_S, PRESENCE_RATE_PER_S))
    this._reconnectTimer = null
    this._heartbeatTimer = null
    this._lastReceivedMs = 0
    this._lastPingMs = 0
    this._tempCounter = 0
    this._readyWaiters = []
    this._open()
  }

  get connected() { return this._welcomed }
  get closed() { return this._closed }

  service(name) {
    if (!this._services.has(name)) this._services.set(name, new Service(this, name))
    return this._services.get(name)
  }
  mirror(room) { return this._mirrors.get(room) ?? null }

  /** Resolves once welcomed (at once if live); rejects on a fatal refusal. */
  ready() {
    if (this._welcomed) return Promise.resolve(this)
    if (this._closed) return Promise.reject(new CallError("connection_lost", this.closeReason ?? "the client is closed"))
    return new Promise((resolve, reject) => this._readyWaiters.push({ resolve, reject }))
  }

  /** One call: `{id, data, query, temp_id, base_rev, idempotency_key}`.
   * Waits for the connection while disconnected (up to `callTimeoutMs`).
   * A call whose connection dropped before its result came is sent again
   * after the reconnect if it runs once whatever happens: `find`/`get`, and
   * a write under an `idempotency_key` (also after an `unavailable`
   * answer, after a backoff: the store may have failed after the commit);
   * the server answers a write sent again under its key with the first
   * one's result (`_replayed: true`).  With `idempotentWrites` (the
   * default) every write of sessions, tasks, messages and boards but
   * `messages.stream` gets a key of its own; other writes fail with
   * `connection_lost` (they may or may not have run). */
  call(service, method, fields = {}) {
    return new Promise((resolve, reject) => {
      if (this._closed) { reject(new CallError("connection_lost", "the client is closed")); return }
      const message = { type: "call", service, method }
      for (const [k, v] of Object.entries(fields)) if (v !== undefined && v !== null) message[k] = v
      const read = method === "find" || method === "get"
      if (message.idempotency_key == null && this.idempotentWrites && !read && KEYED_SERVICES.has(service) &&
          !(service === "messages" && method === "stream")) {
        message.idempotency_key = this._newKey()
      }
      const entry = { resolve, reject, message, read, resend: read || message.idempotency_key != null, timer: null }
      entry.timer = setTimeout(() => {
        entry.timer = null
        for (const [ref, e] of this._pending) if (e === entry) this._pending.delete(ref)
        this._waiting = this._waiting.filter((e) => e !== entry)
        reject(new CallError("timeout", `${service}.${method} got no answer in ${this.callTimeoutMs} ms`))
      }, this.callTimeoutMs)
      this._waiting.push(entry)
      if (this._welcomed) this._pumpCalls()
    })
  }

  /** Send waiting calls while the server's `max_pending_calls` allows
   * (beyond it the server would answer `too_many_pending`) and at most at
   * 90 % of its announced rate (a token bucket like the server's, a tenth
   * left for joins, pings and presence), so that a burst of calls is paced
   * rather than refused, and never closed with `flood`. */
  _pumpCalls() {
    const most = this.limits.max_pending_calls ?? 64
    while (this._welcomed && this._waiting.length && this._pending.size < most) {
      const waitMs = this._takeToken()
      if (waitMs > 0) {
        if (!this._pumpTimer) this._pumpTimer = setTimeout(() => { this._pumpTimer = null; this._pumpCalls() }, waitMs)
        return
      }
      this._sendCall(this._waiting.shift())
    }
  }

  /** 0 and a token taken, or how long until one is there (ms). */
  _takeToken() {
    const rate = 0.9 * (this.limits.rate_per_s ?? 200)
    const burst = Math.max(1, Math.floor(0.9 * (this.limits.rate_burst ?? 400)))
    const now = this._now()
    const bucket = this._bucket ?? (this._bucket = { tokens: burst, at: now })
    bucket.tokens = Math.min(burst, bucket.tokens + ((now - bucket.at) / 1000) * rate)
    bucket.at = now
    if (bucket.tokens >= 1) { bucket.tokens -= 1; return 0 }
    return Math.max(1, Math.ceil(((1 - bucket.tokens) / rate) * 1000))
  }

  /** Join `room` and return its mirror once the room's state is in. */
  async join(room) {
    let mirror = this._mirrors.get(room)
    if (!mirror) { mirror = new Mirror(room); this._mirrors.set(room, mirror) }
    if (!this._rooms.has(room) || this._rooms.get(room).status === "leaving") {
      const track = this._rooms.get(room)
      this._rooms.set(room, { status: "joining", epoch: track?.epoch ?? null, seq: track?.seq ?? null, requestedSince: null, leaves: track?.leaves ?? 0, resumes: 0 })
      if (this._welcomed) this._sendJoin(room, null)
    }
    const result = await mirror.ready
    if (result.leftReason && result.leftReason !== "left") {
      this._mirrors.delete(room)
      const why = result.leftMessage ? `: ${result.leftMessage}` : ""
      throw new CallError(result.leftReason, `join ${room} refused${why}`)
    }
    return mirror
  }

  async leave(room) {
    const track = this._rooms.get(room)
    this._mirrors.delete(room)
    if (!track) return
    clearTimeout(track.rejoinTimer)
    track.status = "leaving"
    track.leaves += 1
    if (this._welcomed) this._sendMessage({ type: "leave", room })
    else this._rooms.delete(room)
  }

  /** Presence on `boardId` (joins `board:<id>`, announces this client). */
  presence(boardId) {
    let board = this._boards.get(boardId)
    if (!board) {
      board = new BoardPresence(this, boardId)
      this._boards.set(boardId, board)
      this.join(board.room).catch((err) => board._left(err.code ?? "error"))
      this._presenceOut.update(boardId, { hide_cursors: false })
    }
    return board
  }

  /** The activity log of a board, newest first: `{data, next_cursor}`. */
  activity(boardId, { limit = 30, cursor = null, userId, action } = {}) {
    const query = { board_id: boardId, $limit: limit }
    if (cursor) query.$cursor = cursor
    if (userId) query.user_id = userId
    if (action) query.action = action
    return this.service("activity").find(query)
  }

  /** Drop the connection now (as a network failure would): the client
   * reconnects after its backoff and resumes every room. */
  dropConnection() { if (this._ws) this._lost(this._ws, 1006, "dropped by the client") }

  /** While reconnecting: try now rather than after the backoff (a page
   * calls it when the browser comes back online or the tab is shown). */
  reconnectNow() {
    if (this._closed || this._ws) return
    clearTimeout(this._reconnectTimer)
    this._reconnectTimer = null
    this._open()
  }

  /** Close for good. */
  close() {
    if (this._closed) return
    this._closed = true
    clearTimeout(this._reconnectTimer)
    clearTimeout(this._pumpTimer)
    clearTimeout(this._renewTimer)
    for (const track of this._rooms.values()) clearTimeout(track.rejoinTimer)
    this._presenceOut.stop()
    const ws = this._ws
    if (ws) { this._detach(ws); try { ws.close(1000) } catch { /* already closed */ } }
    this._ws = null
    this._welcomed = false
    this._failCalls("connection_lost", "the client is closed", true)
    this._setState("offline")
    this.emit("closed")
  }

  // ------------------------------------------------------- internals

  _setState(state) {
    if (this.state === state) return
    this.state = state
    this.emit("state", state)
  }

  _newTempId() { return `tmp-${this.clientId}-${++this._tempCounter}` }

  /** An idempotency key: unique among the user's writes (this client's id,
   * a count, and random digits: a reloaded tab may keep its id). */
  _newKey() {
    const draw = Math.floor(this.random() * 2 ** 48).toString(36)
    return `key-${this.clientId}-${++this._tempCounter}-${draw}`
  }

  _optimisticMirrors(service, data) {
    const spec = OPTIMISTIC_ROOMS[service]
    if (!spec || !data) return []
    const ident = data[spec[1]]
    const mirror = typeof ident === "string" ? this._mirrors.get(`${spec[0]}:${ident}`) : null
    return mirror ? [mirror] : []
  }

  _open() {
    if (this._closed) return
    this._setState(this._everWelcomed ? "reconnecting" : "connecting")
    let ws
    try {
      ws = new this.WebSocket(this.url, [SUBPROTOCOL])
    } catch (err) {
      if (this._failFirst(`${err?.message ?? err}`)) return
      this._scheduleReconnect()
      return
    }
    this._ws = ws
    ws.onopen = () => {
      this._lastReceivedMs = this._now()
      const hello = { type: "hello", protocol: PROTOCOL_VERSION, client_id: this.clientId }
      if (this.token) hello.token = this.token
      ws.send(JSON.stringify(hello))
    }
    ws.onmessage = (ev) => this._onFrame(ws, ev.data)
    ws.onclose = (ev) => this._lost(ws, ev.code, ev.reason)
    // a browser fires close right after error; Node 20's WebSocket fires
    // only error when the connection is refused, so the error counts as the
    // close unless a close came first (then `ws` is no longer current)
    ws.onerror = () => { setTimeout(() => this._lost(ws, 1006, ""), 0) }
  }

  _detach(ws) { ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null }

  _lost(ws, code, reason) {
    if (ws !== this._ws) return
    this._detach(ws)
    try { ws.close() } catch { /* gone */ }
    this._ws = null
    clearInterval(this._heartbeatTimer)
    clearTimeout(this._renewTimer)
    this._presenceOut.stop()
    const wasWelcomed = this._welcomed
    this._welcomed = false
    this.connectionId = null
    this._failCalls("connection_lost", "the connection was lost", false)
    for (const [room, track] of this._rooms) {
      if (track.status === "leaving") this._rooms.delete(room)
      else { track.status = "detached"; track.requestedSince = null; track.leaves = 0 }
    }
    if (FATAL_CLOSE_CODES.has(code)) {
      this.closeReason = reason || `closed with ${code}`
      const [errCode, ...rest] = (reason || "unauthorized: refused").split(": ")
      const err = new CallError(errCode, rest.length ? rest.join(": ") : errCode)
      for (const w of this._readyWaiters.splice(0)) w.reject(err)
      this._closed = true
      this._failCalls("connection_lost", this.closeReason, true)
      this._setState("offline")
      this.emit("closed", err)
      return
    }
    if (this._failFirst(`closed (${code}${reason ? `: ${reason}` : ""}) before the server's welcome`)) return
    if (wasWelcomed) this.stats.reconnects += 1
    if (code === TOKEN_EXPIRED_CLOSE && this.refresh) {
      // a new token first (if that fails, the old one is refused: fatal)
      Promise.resolve().then(() => this.refresh())
        .then((token) => { this.token = token }, () => { /* reconnect with the old one */ })
        .finally(() => this._scheduleReconnect())
      return
    }
    this._scheduleReconnect()
  }

  /** With `retryFirst` false, a first connection that never got a welcome
   * is not tried again: ready() rejects with `unavailable` and the client
   * closes (as the Python client's `connect`). */
  _failFirst(why) {
    if (this.retryFirst || this._everWelcomed || this._closed) return false
    const err = new CallError("unavailable", `cannot connect to ${this.url}: ${why}`)
    this.closeReason = err.message
    this._closed = true
    for (const w of this._readyWaiters.splice(0)) w.reject(err)
    this._failCalls("connection_lost", this.closeReason, true)
    this._setState("offline")
    this.emit("closed", err)
    return true
  }

  /** Renew the access token in band a little before it expires. */
  _scheduleRenewal() {
    clearTimeout(this._renewTimer)
    if (this.expiresAt == null || !this.refresh || this._closed) return
    const leftMs = this.expiresAt - Date.now()
    const marginMs = Math.min(this.refreshBeforeMs, Math.max(0, leftMs) / 2)
    this._renewTimer = setTimeout(() => this._renew(), Math.max(0, leftMs - marginMs))
  }

  async _renew() {
    try {
      const token = await this.refresh()
      this.token = token
      const data = await this._auth(token)
      this.expiresAt = data?.expires_at ?? null
      this.stats.renewals += 1
      this._scheduleRenewal()
    } catch (err) {
      // the server closes at expiry (4002); the reconnect refreshes again
      this.emit("error", err instanceof CallError ? err : new CallError("unavailable", String(err)))
    }
  }

  _auth(token) {
    return new Promise((resolve, reject) => {
      if (!this._welcomed) { reject(new CallError("connection_lost", "not connected")); return }
      const ref = this._nextRef++
      const timer = setTimeout(() => {
        this._pending.delete(ref)
        reject(new CallError("timeout", "no answer to auth"))
      }, this.callTimeoutMs)
      this._pending.set(ref, { resolve, reject, timer, read: false, request: null })
      this._sendMessage({ type: "auth", ref, token })
    })
  }

  _scheduleReconnect() {
    if (this._closed) return
    this._setState(this._everWelcomed ? "reconnecting" : "connecting")
    const delayS = backoffS(this._attempt, this.random(), this.backoffBaseS, this.backoffCapS)
    this._attempt += 1
    this._reconnectTimer = setTimeout(() => this._open(), delayS * 1000)
  }

  _failCalls(code, message, all) {
    const again = [] // sent again once welcomed, first, in the order they were sent
    for (const [ref, entry] of [...this._pending]) {
      this._pending.delete(ref)
      if (entry.resend && !all) { again.push(entry); continue }
      clearTimeout(entry.timer)
      entry.timer = null
      entry.reject(new CallError(code, message))
    }
    if (all) {
      for (const entry of this._waiting.splice(0)) { clearTimeout(entry.timer); entry.timer = null; entry.reject(new CallError(code, message)) }
    } else if (again.length) {
      this._waiting = [...again, ...this._waiting] // ahead of the calls queued after them
    }
  }

  _sendMessage(message) {
    const ws = this._ws
    if (!ws || ws.readyState !== 1) return false
    ws.send(JSON.stringify(message))
    return true
  }

  _sendCall(entry) {
    const ref = this._nextRef++
    this._pending.set(ref, entry)
    this._sendMessage({ ...entry.message, ref })
  }

  _sendJoin(room, since) {
    const track = this._rooms.get(room)
    track.status = "joining"
    track.requestedSince = since
    const message = { type: "join", room }
    if (since) message.since = since
    this._sendMessage(message)
  }

  _since(track) { return track.epoch != null && track.seq != null ? { epoch: track.epoch, seq: track.seq } : null }

  _onFrame(ws, raw) {
    if (ws !== this._ws) return
    this._lastReceivedMs = this._now()
    if (typeof raw !== "string") {
      this._lost(ws, 1003, "wrong_frame_kind: a binary frame on agor.v1.json")
      return
    }
    let decoded
    try { decoded = JSON.parse(raw) } catch {
      this._lost(ws, 1007, "bad_json: the server sent bad JSON")
      return
    }
    const messages = Array.isArray(decoded) ? decoded : [decoded]
    for (const m of messages) {
      if (ws !== this._ws) return
      if (m && typeof m === "object" && typeof m.type === "string") this._onMessage(m)
    }
  }

  _onMessage(m) {
    switch (m.type) {
      case "welcome": return this._onWelcome(m)
      case "result": return this._onResult(m)
      case "event": return this._onEvent(m)
      case "joined": return this._onJoined(m)
      case "lagged": return this._onLagged(m)
      case "left": return this._onLeft(m)
      case "presence": return this._boards.get(m.board)?._apply(m)
      case "pong": return undefined
      case "error": return this.emit("error", new CallError(m.code, m.message))
      default: return undefined // a newer server's message: ignored
    }
  }

  _onWelcome(m) {
    this._welcomed = true
    this._everWelcomed = true
    this._attempt = 0
    this.userId = m.user_id
    this.connectionId = m.connection_id
    this.ownConnectionIds.add(m.connection_id)
    this.heartbeatMs = m.heartbeat_ms ?? 15_000
    this.limits = m.limits ?? {}
    this._bucket = null // a new connection: the server's bucket is full again
    this.expiresAt = m.expires_at ?? null
    this._scheduleRenewal()
    this._lastPingMs = this._now()
    this._startHeartbeat()
    // rejoin every room (with since where known), as one batch
    const joins = []
    for (const [room, track] of this._rooms) {
      if (track.status === "leaving") continue
      const since = this._since(track)
      track.status = "joining"
      track.requestedSince = since
      joins.push(since ? { type: "join", room, since } : { type: "join", room })
    }
    const maxBatch = this.limits.max_batch ?? 100
    for (let i = 0; i < joins.length; i += maxBatch) this._sendMessage(joins.slice(i, i + maxBatch))
    this._pumpCalls()
    for (const boardId of this._boards.keys()) this._presenceOut.restore(boardId)
    this._presenceOut._schedule()
    this._setState("live")
    this.emit("welcome", m)
    for (const w of this._readyWaiters.splice(0)) w.resolve(this)
  }

  _startHeartbeat() {
    clearInterval(this._heartbeatTimer)
    const intervalMs = this.heartbeatMs
    const deadMs = 2.5 * intervalMs
    const tickMs = Math.max(50, Math.min(1000, intervalMs / 4))
    this._heartbeatTimer = setInterval(() => {
      const now = this._now()
      if (now >= this._lastReceivedMs + deadMs) { this._lost(this._ws, 4000, "heartbeat_timeout: the server went silent"); return }
      if (now >= this._lastPingMs + intervalMs) {
        this._lastPingMs = now
        this._sendMessage({ type: "ping", t: Math.round(now) })
      }
    }, tickMs)
    if (typeof this._heartbeatTimer?.unref === "function") this._heartbeatTimer.unref()
  }

  _onResult(m) {
    const entry = this._pending.get(m.ref)
    if (!entry) return
    this._pending.delete(m.ref)
    if (!m.ok && m.error?.code === "unavailable" && entry.message.idempotency_key != null &&
        (entry.unavailableRetries ?? 0) < WRITE_RETRIES) {
      // the store failed, maybe after the commit: a keyed write is sent
      // again after a backoff, and runs once
      const delayS = backoffS(entry.unavailableRetries ?? 0, this.random(), this.backoffBaseS, this.backoffCapS)
      entry.unavailableRetries = (entry.unavailableRetries ?? 0) + 1
      setTimeout(() => {
        if (this._closed || !entry.timer) return
        this._waiting.push(entry)
        this._pumpCalls()
      }, delayS * 1000)
      this._pumpCalls()
      return
    }
    if (!m.ok && m.error?.code === "rate_limited" && (entry.rateRetries ?? 0) < RATE_LIMITED_RETRIES) {
      // refused before it ran: send it again once the server says the rate allows
      entry.rateRetries = (entry.rateRetries ?? 0) + 1
      this.stats.rateLimited += 1
      const waitMs = Math.min(Math.max(Number(m.error?.data?.retry_after_ms) || 1, 1), 5_000)
      setTimeout(() => {
        if (this._closed || !entry.timer) return
        this._waiting.unshift(entry)
        this._pumpCalls()
      }, waitMs)
      this._pumpCalls()
      return
    }
    clearTimeout(entry.timer)
    entry.timer = null
    if (m.ok) entry.resolve(m.data ?? null)
    else entry.reject(new CallError(m.error?.code ?? "internal", m.error?.message ?? "error", m.error?.data ?? null))
    this._pumpCalls()
  }

  _onEvent(ev) {
    const track = this._rooms.get(ev.room)
    if (!track || track.status !== "live" || track.seq == null) { this.stats.ignored += 1; return }
    const last = track.seq
    const end = ev.last_seq ?? ev.seq
    if (end <= last) { this.stats.duplicatesDropped += 1; return }
    if (ev.seq !== last + 1) {
      this.stats.gaps += 1
      this._resume(ev.room, track, last, true)
      return
    }
    track.seq = end
    track.resumes = 0
    this.stats.applied += 1
    this._mirrors.get(ev.room)?._apply(ev)
    ev.own = ev.origin != null && this.ownConnectionIds.has(ev.origin)
    this.emit("event", ev)
    this._emitServiceEvent(ev)
  }

  _emitServiceEvent(ev) {
    const [prefix, action] = ev.event.split(":", 2)
    let service = RESOURCE_SERVICES[prefix]
    let kind = SERVICE_EVENTS[action]
    let row = null
    const data = ev.data ?? {}
    if (ev.event === "task:message") {
      service = "messages"
      if (data.message && typeof data.message === "object") { row = data.message; kind = "created" } else {
        kind = data.deleted ? "removed" : "patched"
        row = { id: data.message_id, ...data }
      }
    } else if (service) {
      const key = Object.keys(RESOURCE_SERVICES).find((k) => RESOURCE_SERVICES[k] === service)
      const id = data[`${key}_id`]
      const mirror = this._mirrors.get(ev.room)
      row = data[key] ?? mirror?.get(service, id) ?? { id, ...(data.updates ?? data) }
    }
    if (!service || !kind) return
    const svc = this._services.get(service)
    if (svc) svc.emit(kind, row, ev)
    if (svc) svc.emit(ev.event, data, ev)
  }

  _resume(room, track, sinceSeq, counts) {
    track.resumes += counts ? 1 : 0
    this.stats.resumes += 1
    const since = track.resumes <= MAX_RESUMES && track.epoch != null ? { epoch: track.epoch, seq: sinceSeq } : null
    this._sendJoin(room, since)
  }

  _onLagged(m) {
    const track = this._rooms.get(m.room)
    if (!track || track.status !== "live" || track.seq == null) return
    this.stats.lagged += 1
    this._resume(m.room, track, Math.max(0, Math.min(track.seq, m.resume_from - 1)), false)
  }

  _onJoined(m) {
    let track = this._rooms.get(m.room)
    if (track && track.status === "leaving") return
    if (!track) { track = { status: "joining", epoch: null, seq: null, requestedSince: null, leaves: 0, resumes: 0 }; this._rooms.set(m.room, track) }
    const asked = track.requestedSince
    const recovered = m.recovered && track.epoch === m.epoch && track.seq != null && m.seq >= track.seq &&
      (track.status !== "joining" || asked != null) &&
      (asked == null || (asked.epoch === m.epoch && asked.seq <= track.seq))
    track.status = "live"
    track.rejoins = undefined
    track.requestedSince = null
    let mirror = this._mirrors.get(m.room)
    if (recovered) {
      mirror?._joined(m.epoch, track.seq)
      this._boards.get(m.room.slice(6))?.emit("change")
      return
    }
    track.epoch = m.epoch
    track.seq = m.seq
    track.resumes = 0
    this.stats.reloads += 1
    if (!mirror && m.room.startsWith("activity:")) return
    if (!mirror) { mirror = new Mirror(m.room); this._mirrors.set(m.room, mirror) }
    mirror._beginReload(m.epoch, m.seq)
    this._reload(mirror)
  }

  async _reload(mirror) {
    const token = {}
    mirror._reloadToken = token
    for (;;) {
      try {
        const resources = await this.loader(this, mirror.room)
        if (mirror._reloadToken !== token) return
        mirror._finishReload(resources)
        this.emit("reload", mirror)
        return
      } catch (err) {
        if (mirror._reloadToken !== token || this._closed) return
        if (err.code === "connection_lost" || err.code === "timeout") continue
        mirror._left(err.code ?? "internal", err.message ?? null)
        return
      }
    }
  }

  /** The server let `room` go for now: keep its track (detached, so that a
   * reconnect meanwhile rejoins it too) and its mirror, and join again after
   * a backoff, from where the mirror stands. */
  _rejoinLater(room, track, mirror) {
    track.status = "detached"
    track.requestedSince = null
    track.leaves = 0
    if (mirror.reloading || mirror.epoch == null) { track.epoch = null; track.seq = null }
    else { track.epoch = mirror.epoch; track.seq = mirror.seq }
    track.rejoins = (track.rejoins ?? -1) + 1
    clearTimeout(track.rejoinTimer)
    const delayS = backoffS(track.rejoins, this.random(), this.backoffBaseS, this.backoffCapS)
    track.rejoinTimer = setTimeout(() => {
      track.rejoinTimer = null
      if (this._rooms.get(room) !== track || track.status !== "detached" || !this._welcomed) return
      this._sendJoin(room, this._since(track))
    }, delayS * 1000)
  }

  _onLeft(m) {
    const track = this._rooms.get(m.room)
    if (!track) return
    if (track.leaves > 0) {
      track.leaves -= 1
      if (track.status !== "leaving" || track.leaves > 0) return
    }
    const mirror = this._mirrors.get(m.room)
    if (REJOIN_CODES.has(m.reason) && mirror && !mirror.leftReason && !this._closed) {
      this._rejoinLater(m.room, track, mirror)
      this.emit("left", m)
      return
    }
    this._rooms.delete(m.room)
    if (mirror) { this._mirrors.delete(m.room); mirror._left(m.reason, m.message ?? null) }
    if (m.room.startsWith("board:")) this._boards.get(m.room.slice(6))?._left(m.reason)
    this.emit("left", m)
  }
}

/** A client that starts connecting at once (the page shows its `state`). */
export function createClient(url, options = {}) { return new Client(url, options) }

/** A client, once the server has welcomed it. Rejects if the server refuses
 * the token (4001): `err.code` says why; or, unless `retryFirst: true`, with
 * `unavailable` if the first connection fails (no daemon there, a wrong
 * path): a client that never connected does not retry in silence. Once
 * welcomed it reconnects by itself whatever happens. */
export async function connect(url, options = {}) {
  const client = new Client(url, { retryFirst: false, ...options })
  try {
    return await client.ready()
  } catch (err) {
    client.close()
    throw err
  }
}

/** The `/ws` URL of the page's own daemon (`ws:` or `wss:`). */
export function pageUrl(location = globalThis.location) {
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`
}
