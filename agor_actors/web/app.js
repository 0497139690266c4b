// The board page: one board's sessions as cards on a canvas, kept live by
// agor-client.js over the daemon's WebSocket (signed in by the session
// cookie that `agor-actors open` sets up).
import { createClient, pageUrl } from "/client/agor-client.js"

const CARD_W = 280
const CARD_H = 156
const GAP = 28
const MARGIN = 32
const COLUMNS = 4
const ACTIVITY_PAGE = 30
const PHONE = window.matchMedia("(max-width: 700px)")

const $ = (id) => document.getElementById(id)
const el = (tag, cls, text) => {
  const node = document.createElement(tag)
  if (cls) node.className = cls
  if (text != null) node.textContent = text
  return node
}

const client = createClient(pageUrl(), { clientId: `tab-${Math.random().toString(36).slice(2, 10)}` })
window.agor = { client } // for the console and the browser tests

const ui = {
  boardId: null,
  board: null, // mirror of board:<id>
  presence: null,
  cards: new Map(), // session id -> element
  cursorEls: new Map(),
  session: null, // { id, mirror, off }
  activity: { open: false, cursor: null, done: false, loading: false, ids: new Set(), room: null },
}

// ------------------------------------------------------------ connection

const pill = $("status")
function showState(state) {
  pill.dataset.state = state
  pill.textContent = state
}
showState(client.state)
client.on("state", showState)
window.addEventListener("online", () => client.reconnectNow())
document.addEventListener("visibilitychange", () => { if (!document.hidden) client.reconnectNow() })
client.on("closed", (err) => {
  if (err && (err.code === "unauthorized" || err.code === "not_authenticated")) $("signin").hidden = false
})

// ------------------------------------------------------------ helpers

const STATUS_LABEL = { idle: "idle", running: "running", awaiting_permission: "needs you", completed: "done", failed: "failed", created: "queued", stopped: "stopped" }

function statusChip(status) {
  const chip = el("span", `status-chip s-${status ?? "idle"}`, STATUS_LABEL[status] ?? status ?? "idle")
  return chip
}

function ago(ms) {
  if (!ms) return ""
  const s = Math.max(0, (Date.now() - ms) / 1000)
  if (s < 45) return "just now"
  if (s < 3600) return `${Math.round(s / 60)} min ago`
  if (s < 86400) return `${Math.round(s / 3600)} h ago`
  return new Date(ms).toLocaleDateString()
}

function initials(name) {
  const parts = String(name ?? "?").trim().split(/\s+/)
  return ((parts[0]?.[0] ?? "?") + (parts[1]?.[0] ?? "")).toUpperCase()
}

function realName(id) {
  return ui.presence?.users.get(id)?.name ?? (id === "owner" ? "owner" : `user ${String(id).slice(-4)}`)
}

function userName(id) { return id === client.userId ? "You" : realName(id) }

function userColor(id) { return ui.presence?.users.get(id)?.color ?? "#64748b" }

function sortedSessions() {
  return ui.board.items("sessions").sort((a, b) => (a.created_at ?? Infinity) - (b.created_at ?? Infinity) || String(a.id).localeCompare(b.id))
}

// ------------------------------------------------------------ the board

async function pickBoard() {
  const wanted = new URLSearchParams(location.search).get("board")
  if (wanted) return wanted
  const page = await client.service("boards").find({ $limit: 1, $sort: { created_at: 1 } })
  if (page.data.length) return page.data[0].id
  return (await client.service("boards").create({ name: "My board" })).id
}

function cardFor(session) {
  let card = ui.cards.get(session.id)
  if (!card) {
    card = el("button", "card")
    card.type = "button"
    card.dataset.id = session.id
    card.append(el("div", "card-top"), el("div", "card-title"), el("div", "card-foot"))
    card.addEventListener("click", () => openSession(card.dataset.id))
    card.addEventListener("animationend", () => card.classList.remove("pulse"))
    $("cards").append(card)
    ui.cards.set(session.id, card)
  }
  return card
}

function renderCards() {
  const sessions = sortedSessions()
  const seen = new Set()
  sessions.forEach((s, i) => {
    seen.add(s.id)
    const card = cardFor(s)
    card.classList.toggle("pending", !!s._pending)
    card.dataset.status = s.status ?? "idle"
    const top = card.children[0]
    top.replaceChildren(el("span", "agent", s.agent ?? "agent"), statusChip(s._pending ? "created" : s.status))
    card.children[1].textContent = s.title || "Untitled session"
    const viewers = [...(ui.presence?.users.values() ?? [])].filter((u) => u.view === `session:${s.id}` && u.user_id !== client.userId)
    const foot = card.children[2]
    const faces = el("span", "mini-faces")
    for (const u of viewers.slice(0, 4)) {
      const f = el("span", "mini-face", initials(u.name))
      f.style.background = u.color
      f.title = `${u.name} is looking`
      faces.append(f)
    }
    foot.replaceChildren(el("span", "when", s._pending ? "creating…" : ago(s.updated_at)), faces)
    const col = i % COLUMNS
    const row = Math.floor(i / COLUMNS)
    card.style.left = `${MARGIN + col * (CARD_W + GAP)}px`
    card.style.top = `${MARGIN + row * (CARD_H + GAP)}px`
    card.style.order = String(i)
  })
  for (const [id, card] of ui.cards) {
    if (!seen.has(id)) {
      card.remove()
      ui.cards.delete(id)
      if (ui.session?.id === id) closeSession()
    }
  }
  const rows = Math.max(1, Math.ceil(sessions.length / COLUMNS))
  const world = $("world")
  world.style.width = `${MARGIN * 2 + COLUMNS * CARD_W + (COLUMNS - 1) * GAP}px`
  world.style.height = `${Math.max(MARGIN * 2 + rows * CARD_H + (rows - 1) * GAP + 120, 600)}px`
  $("empty").hidden = sessions.length > 0
  const name = ui.board.get("boards", ui.boardId)?.name
  if (name) { $("board-name").textContent = name; document.title = `${name} · agor` }
}

$("new-session").addEventListener("click", () => {
  const n = ui.board ? ui.board.items("sessions").length + 1 : 1
  client.service("sessions").create({ board_id: ui.boardId, title: `Session ${n}`, agent: "claude-code" })
    .catch((err) => toast(`Could not create the session: ${err.message}`))
})

// ------------------------------------------------------------ presence

function renderFacepile() {
  const pile = $("facepile")
  const users = [...ui.presence.users.values()].sort((a, b) => (a.user_id === client.userId) - (b.user_id === client.userId) || String(a.name).localeCompare(b.name))
  pile.replaceChildren()
  for (const u of users.slice(0, 6)) {
    const own = u.user_id === client.userId
    const face = el("button", `face st-${u.status ?? "active"}${own ? " own" : ""}${ui.presence.following === u.user_id ? " followed" : ""}`, initials(u.name))
    face.type = "button"
    face.style.setProperty("--c", u.color ?? "#64748b")
    face.dataset.user = u.user_id
    face.title = own ? `${u.name} (you)` : `${u.name} · ${u.status ?? "active"} — click to follow`
    if (!own) face.addEventListener("click", () => follow(ui.presence.following === u.user_id ? null : u.user_id))
    pile.append(face)
  }
  if (users.length > 6) pile.append(el("span", "face more", `+${users.length - 6}`))
}

function follow(userId) {
  ui.presence.follow(userId)
  $("follow-banner").hidden = !userId
  if (userId) $("follow-name").textContent = realName(userId)
  renderFacepile()
}
$("stop-follow").addEventListener("click", () => follow(null))

function renderCursors() {
  const layer = $("cursors")
  const canvas = $("canvas")
  const view = { x: canvas.scrollLeft, y: canvas.scrollTop, w: canvas.clientWidth, h: canvas.clientHeight }
  const shown = new Set()
  if (!ui.presence.hidingCursors && !PHONE.matches) {
    for (const [uid, pos] of ui.presence.cursors) {
      if (uid === client.userId) continue
      // culled to what this window shows (the server culls too)
      if (pos.x < view.x - 20 || pos.y < view.y - 20 || pos.x > view.x + view.w || pos.y > view.y + view.h) continue
      shown.add(uid)
      let c = ui.cursorEls.get(uid)
      if (!c) {
        c = el("div", "cursor")
        c.innerHTML = '<svg viewBox="0 0 16 20" aria-hidden="true"><path d="M1 1l13 8-6 1.5L5 18z"/></svg>'
        c.append(el("span", "cursor-name"))
        c.dataset.user = uid
        layer.append(c)
        ui.cursorEls.set(uid, c)
      }
      c.style.setProperty("--c", userColor(uid))
      c.lastChild.textContent = realName(uid)
      c.style.transform = `translate(${pos.x}px, ${pos.y}px)`
    }
  }
  for (const [uid, c] of ui.cursorEls) if (!shown.has(uid)) { c.remove(); ui.cursorEls.delete(uid) }
}

function sendViewport() {
  const canvas = $("canvas")
  ui.presence?.setViewport({ x: canvas.scrollLeft, y: canvas.scrollTop, w: canvas.clientWidth, h: canvas.clientHeight, zoom: 1 })
}

function onPresence() {
  renderFacepile()
  renderCursors()
  if (ui.board) renderCards()
  if (ui.session) renderViewers()
  const vp = ui.presence.followedViewport
  if (ui.presence.following && vp) $("canvas").scrollTo({ left: vp.x, top: vp.y, behavior: "smooth" })
  if (ui.presence.following && !ui.presence.users.has(ui.presence.following)) follow(null)
}

function onHighlight(h) {
  if (h.target_type !== "session" || h.user_id === client.userId) return
  const card = ui.cards.get(h.target_id)
  if (!card) return
  card.style.setProperty("--pulse", h.color ?? "#6366f1")
  card.classList.remove("pulse")
  void card.offsetWidth // restart the animation
  card.classList.add("pulse")
}

const canvas = $("canvas")
canvas.addEventListener("pointermove", (ev) => {
  if (!ui.presence || ev.pointerType === "touch") return
  const rect = $("world").getBoundingClientRect()
  ui.presence.moveCursor(Math.round(ev.clientX - rect.left), Math.round(ev.clientY - rect.top))
})
canvas.addEventListener("scroll", () => { sendViewport(); renderCursors() }, { passive: true })
window.addEventListener("resize", () => { sendViewport(); renderCursors() })

$("toggle-cursors").addEventListener("click", () => {
  const hide = !ui.presence.hidingCursors
  ui.presence.hideCursors(hide)
  $("toggle-cursors").setAttribute("aria-pressed", String(hide))
  document.body.classList.toggle("cursors-hidden", hide)
  renderCursors()
})

// ------------------------------------------------------------ a session

function renderViewers() {
  const box = $("drawer-viewers")
  const viewers = [...ui.presence.users.values()].filter((u) => u.view === `session:${ui.session.id}` && u.user_id !== client.userId)
  box.replaceChildren()
  for (const u of viewers) {
    const chip = el("span", "viewer", `${u.name}${u.typing ? " is typing…" : " is here"}`)
    chip.style.setProperty("--c", u.color)
    box.append(chip)
  }
}

function renderSession() {
  const s = ui.session
  if (!s) return
  const m = s.mirror
  const row = m.get("sessions", s.id) ?? ui.board.get("sessions", s.id) ?? {}
  $("drawer-title").textContent = row.title || "Untitled session"
  $("drawer-agent").textContent = row.agent ?? "agent"
  $("drawer-status").replaceWith(Object.assign(statusChip(row.status), { id: "drawer-status" }))
  const convo = $("conversation")
  const atBottom = convo.scrollHeight - convo.scrollTop - convo.clientHeight < 40
  const tasks = m.items("tasks").sort((a, b) => (a.created_at ?? Infinity) - (b.created_at ?? Infinity))
  const messages = m.items("messages").sort((a, b) => (a.created_at ?? 0) - (b.created_at ?? 0))
  convo.replaceChildren()
  if (!tasks.length) convo.append(el("p", "muted center", "No tasks yet: ask the agent something below."))
  for (const t of tasks) {
    const block = el("section", `task${t._pending ? " pending" : ""}`)
    block.dataset.id = t.id
    const head = el("div", "task-head")
    head.append(el("span", "task-prompt", t.prompt ?? ""), statusChip(t._pending ? "created" : t.status))
    block.append(head)
    for (const msg of messages.filter((x) => x.task_id === t.id)) {
      const bubble = el("div", `msg role-${msg.role ?? "assistant"}${msg.streaming ? " streaming" : ""}`)
      bubble.dataset.id = msg.id
      bubble.textContent = msg.content ?? ""
      block.append(bubble)
    }
    if (t.error) block.append(el("div", "msg error", String(t.error)))
    convo.append(block)
  }
  if (atBottom) convo.scrollTop = convo.scrollHeight
  renderViewers()
}

async function openSession(id) {
  if (String(id).startsWith("tmp-")) return
  if (ui.session?.id === id) return
  closeSession()
  const drawer = $("session-drawer")
  drawer.hidden = false
  document.body.classList.add("drawer-open")
  const mirror = await client.join(`session:${id}`)
  const render = () => renderSession()
  mirror.on("change", render)
  ui.session = { id, mirror, off: () => mirror.off("change", render) }
  ui.presence.setView(`session:${id}`)
  for (const card of ui.cards.values()) card.classList.toggle("selected", card.dataset.id === id)
  renderSession()
}

function closeSession() {
  const s = ui.session
  if (!s) return
  s.off()
  client.leave(`session:${s.id}`)
  ui.session = null
  $("session-drawer").hidden = true
  document.body.classList.remove("drawer-open")
  ui.presence?.setView("")
  for (const card of ui.cards.values()) card.classList.remove("selected")
}
$("close-session").addEventListener("click", closeSession)

$("prompt-form").addEventListener("submit", (ev) => {
  ev.preventDefault()
  const input = $("prompt-input")
  const prompt = input.value.trim()
  if (!prompt || !ui.session) return
  input.value = ""
  ui.presence.setTyping(false)
  client.service("tasks").create({ session_id: ui.session.id, prompt }).catch((err) => toast(`Not sent: ${err.message}`))
})
$("prompt-input").addEventListener("input", () => ui.presence?.setTyping($("prompt-input").value.length > 0))

// ------------------------------------------------------------ activity

function describe(entry) {
  const d = entry.data ?? {}
  const title = (id) => ui.board?.get("sessions", id)?.title ?? "a session"
  switch (entry.action) {
    case "board:created": return ["created the board", d.board?.name]
    case "session:created": return ["started session", d.session?.title]
    case "session:updated": return [d.updates && "title" in d.updates ? "renamed a session to" : "updated", d.updates?.title ?? title(d.session_id)]
    case "session:status_changed": return [`set ${title(d.session_id)} to`, STATUS_LABEL[d.status] ?? d.status]
    case "session:deleted": return ["deleted a session", null]
    case "task:created": return ["asked", d.task?.prompt]
    case "task:started": return ["started a task", null]
    case "task:completed": return ["completed a task", null]
    case "task:failed": return ["saw a task fail", null]
    case "task:message": return [d.message ? "began a reply" : "streamed a reply", null]
    default: return [entry.action.replace(":", " "), null]
  }
}

/** A status change is logged twice (the update and the status event): one line is enough. */
function isEcho(entry) {
  if (entry.action !== "session:updated") return false
  const keys = Object.keys(entry.data?.updates ?? {}).filter((k) => k !== "updated_at")
  return keys.length === 1 && keys[0] === "status"
}

function activityItem(entry) {
  const li = el("li", "activity-item")
  li.dataset.id = String(entry.id)
  const face = el("span", "mini-face", initials(realName(entry.user_id)))
  face.style.background = userColor(entry.user_id)
  const [verb, object] = describe(entry)
  const text = el("div", "activity-text")
  text.append(el("b", null, userName(entry.user_id)), document.createTextNode(` ${verb} `))
  if (object) text.append(el("span", "activity-object", object))
  const when = el("time", "when", ago(entry.ts))
  if (entry.ts) when.dateTime = new Date(entry.ts).toISOString()
  li.append(face, text, when)
  return li
}

function addActivity(entries, { atTop = false } = {}) {
  const list = $("activity-list")
  const fresh = entries.filter((e) => !ui.activity.ids.has(e.id))
  for (const e of fresh) ui.activity.ids.add(e.id)
  const items = fresh.filter((e) => !isEcho(e)).map(activityItem)
  if (atTop) {
    list.prepend(...items)
    for (const li of items) li.classList.add("new")
  } else list.append(...items)
}

async function loadActivity() {
  const a = ui.activity
  if (a.loading || a.done || !ui.boardId) return
  a.loading = true
  try {
    const page = await client.activity(ui.boardId, { limit: ACTIVITY_PAGE, cursor: a.cursor })
    addActivity(page.data ?? [])
    a.cursor = page.next_cursor ?? null
    a.done = !a.cursor
    $("activity-more").textContent = a.done ? (ui.activity.ids.size ? "That's the beginning of this board." : "Nothing yet.") : "Loading…"
  } catch (err) {
    $("activity-more").textContent = `Could not load: ${err.message}`
  } finally {
    a.loading = false
  }
  if (!a.done && isVisible($("activity-more"))) loadActivity()
}

function isVisible(node) {
  const list = $("activity-drawer").getBoundingClientRect()
  const r = node.getBoundingClientRect()
  return r.top < list.bottom && r.bottom > list.top
}

const moreObserver = new IntersectionObserver((entries) => {
  if (entries.some((e) => e.isIntersecting)) loadActivity()
}, { root: $("activity-drawer") })

async function openActivity() {
  const a = ui.activity
  $("activity-drawer").hidden = false
  document.body.classList.add("activity-open")
  if (a.open) return
  a.open = true
  a.room = `activity:${ui.boardId}`
  await client.join(a.room)
  moreObserver.observe($("activity-more"))
  loadActivity()
}

function closeActivity() {
  const a = ui.activity
  $("activity-drawer").hidden = true
  document.body.classList.remove("activity-open")
  if (!a.open) return
  a.open = false
  moreObserver.disconnect()
  client.leave(a.room)
  Object.assign(a, { cursor: null, done: false, ids: new Set() })
  $("activity-list").replaceChildren()
}

client.on("event", (ev) => {
  if (ui.activity.open && ev.room === ui.activity.room && ev.event === "activity:new" && ev.data) addActivity([ev.data], { atTop: true })
})
$("open-activity").addEventListener("click", () => ($("activity-drawer").hidden ? openActivity() : closeActivity()))
$("close-activity").addEventListener("click", closeActivity)

// ------------------------------------------------------------ misc

function toast(text) {
  const t = el("div", "toast", text)
  document.body.append(t)
  setTimeout(() => t.remove(), 4000)
}

document.addEventListener("keydown", (ev) => {
  if (ev.key !== "Escape") return
  if (!$("session-drawer").hidden) closeSession()
  else if (!$("activity-drawer").hidden) closeActivity()
  else if (ui.presence?.following) follow(null)
})
setInterval(() => { if (ui.board) renderCards() }, 30_000) // the "n min ago" labels

async function main() {
  await client.ready()
  ui.boardId = await pickBoard()
  ui.presence = client.presence(ui.boardId)
  ui.presence.on("change", onPresence)
  ui.presence.on("highlight", onHighlight)
  ui.board = await client.join(`board:${ui.boardId}`)
  ui.board.on("change", renderCards)
  renderCards()
  sendViewport()
  document.body.dataset.ready = "true"
}

main().catch((err) => {
  if (err?.code === "unauthorized" || err?.code === "not_authenticated") $("signin").hidden = false
  else toast(`agor: ${err.message ?? err}`)
})
