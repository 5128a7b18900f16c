// Konstruct web chat: the browser client of the chat protocol (PROTOCOL.md §2 "Resume").
// Dependency-free ES module. It keeps one conversation in step with the server across drops,
// reloads, API Gateway's 10-minute idle cut and 2-hour connection limit:
//
// - an outbox: a message is shown at once (pending) and sent when a socket is authenticated;
//   unacknowledged ones are sent again, with the same client_message_id, after reconnecting
//   (the server stores and answers each once). The outbox survives a reload (sessionStorage).
// - resume: `auth` carries `resume_after` = the largest `seq` seen; `replay` fills the gap;
//   more than the server replays (`recovered: false`) reloads the history over REST.
// - chunks are applied by `offset`: a repeated one is ignored, one that overlaps what is held
//   contributes its new part, `reset` starts over; every message is kept once, by id, and a
//   stored message is matched to its pending one by client_message_id.
// - the token: `getToken()` is asked at every connect, again shortly before the token expires
//   (a fresh `auth` on the same socket), and on `unauthenticated`.
// - a refused message: permanently (bad_request, too_large, forbidden) it leaves the outbox,
//   visibly failed; transiently (rate_limited, internal) it is sent again after a backoff.
// - reconnects with exponential backoff and jitter; pings every 5 minutes; reconnects by
//   itself before the 2-hour cut.
// - branches (PROTOCOL.md §2 "Branches"): every message it holds is kept (the whole tree);
//   `messages` is the current branch, the path from the head back. The head follows the server:
//   `auth_ok` names it, a new user message and a reply to the head move it, a `head` frame moves
//   it anywhere. `regenerate()`, `edit()` and `switchTo()` ask the server to move it.
//
// Usage:
//   import { Chat } from "/konstruct-chat.js";
//   const chat = new Chat({ conversationId, getToken: () => portal.freshJwt(), onChange: render });
//   chat.start();
//   chat.send("Hello");            // shown pending at once, sent when connected
//   chat.cancel(userMessageId);    // stops the reply to it
//   chat.regenerate(userMessageId); // a new reply to it; the earlier ones stay, as siblings
//   chat.edit(userMessageId, "…"); // a new version of it, answered; the original stays
//   chat.switchTo(messageId);      // show the branch through that message
//   chat.messages;                 // ChatMessage[]: the current branch, pending ones last

/**
 * @typedef {"pending" | "complete" | "streaming" | "cancelled" | "failed"} MessageStatus
 *
 * @typedef {object} ChatMessage
 * @property {string} key             stable key for rendering (client_message_id until stored)
 * @property {string | null} id       the stored message id (null while pending)
 * @property {number | null} seq      its place in the conversation (null while pending)
 * @property {"user" | "assistant"} role
 * @property {string} content
 * @property {MessageStatus} status
 * @property {string | null} replyTo  for a reply, the user message it answers
 * @property {string | null} clientMessageId
 * @property {string | null} stopReason  for a reply: end, length, cancelled or error
 * @property {string | null} parentId  the message it follows (null for the first)
 * @property {string | null} replyId   for a user message: the id its reply takes
 * @property {string[]} siblings   ids of the messages beside it (same parent), oldest first,
 *   itself among them: "2 of 3" is `siblings.indexOf(id) + 1` of `siblings.length`
 * @property {string | null} [editOf]  for a pending edit: the message it edits
 *
 * @typedef {object} ChatOptions
 * @property {string} conversationId
 * @property {() => string | Promise<string>} [getToken]  gives a valid portal JWT: called at
 *   every connect, before the one in use expires, and when the server says `unauthenticated`
 * @property {string | (() => string | Promise<string>)} [token]  the same as `getToken`, or a
 *   fixed JWT (which cannot be renewed)
 * @property {string} [socketUrl]  default: ws(s)://<this host>/chat/ws/<conversationId>
 *   (on AWS: wss://{api}.execute-api.{region}.amazonaws.com/{stage}?conversation_id=…)
 * @property {string} [apiBase]    default: this origin; REST history is read from
 *   <apiBase>/api/portal/chat/conversations/<id>/messages
 * @property {(chat: Chat) => void} [onChange]  called after every change of state
 * @property {(error: {code: string, message: string}) => void} [onError]
 * @property {(headId: string | null) => void} [onHead]  the current branch changed (here or in
 *   another tab): it now ends at `headId`
 * @property {number} [maxConnectionMs]  reconnect before this (default 115 minutes)
 * @property {number} [renewBeforeMs]  renew the token this long before it expires (default 60 s)
 * @property {Storage | null} [storage]  where the outbox survives a reload (default
 *   sessionStorage; null for none)
 */

const PING_MS = 5 * 60 * 1000;
const TWO_HOURS_LESS_MARGIN_MS = 115 * 60 * 1000;
const RENEW_BEFORE_MS = 60 * 1000;
/** Refusals that sending the same message again cannot change (PROTOCOL §2). */
const PERMANENT_REFUSALS = ["bad_request", "too_large", "forbidden"];
/** Refusals worth sending the same message again later. */
const TRANSIENT_REFUSALS = ["rate_limited", "internal"];

/** Exponential backoff with full jitter: up to 0.5 s, 1 s, 2 s, … 30 s for attempt 0, 1, 2, … */
function backoffMs(attempt) {
  const ceiling = Math.min(30000, 500 * 2 ** attempt);
  return Math.round(ceiling / 2 + Math.random() * ceiling / 2);
}

/** When a JWT expires (ms since the epoch), from its `exp` claim; null if it has none. */
function expiresAt(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(payload.padEnd(payload.length + (4 - payload.length % 4) % 4, "="))).exp;
    return typeof exp === "number" ? exp * 1000 : null;
  } catch {
    return null;
  }
}

export class Chat {
  /** @param {ChatOptions} options */
  constructor(options) {
    this.options = options;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const conversation = encodeURIComponent(options.conversationId);
    this.socketUrl = options.socketUrl || `${scheme}://${location.host}/chat/ws/${conversation}`;
    this.apiBase = options.apiBase ?? location.origin;
    this.storage = options.storage === undefined ? globalThis.sessionStorage ?? null : options.storage;
    this.outboxKey = `konstruct.outbox.${options.conversationId}`;
    /** @type {Map<string, ChatMessage>} stored messages by id */
    this.byId = new Map();
    /** @type {Map<string, ChatMessage>} unacknowledged user messages by client_message_id */
    this.outbox = new Map();
    /** @type {Map<string, ChatMessage>} messages the server refused for good (status "failed") */
    this.refused = new Map();
    /** The largest seq seen: what a reconnect resumes after. */
    this.lastSeq = 0;
    /** The end of the current branch (null until the server names it). */
    this.head = null;
    /** "connecting" | "connected" | "disconnected" */
    this.state = "disconnected";
    this.typing = false;
    this.socket = null;
    this.attempt = 0;
    /** How many times the socket was opened again. */
    this.reconnects = 0;
    this.timers = [];
    this.stopped = false;
    this.loaded = false;
    this.restoreOutbox();
  }

  /**
   * The current branch (the path from the head back, oldest first), then the pending messages
   * in the order typed. Before the server has named a head, every stored message, in seq order.
   */
  get messages() {
    const stored = [...this.byId.values()].sort((a, b) => a.seq - b.seq);
    const siblings = new Map();
    for (const m of stored) {
      const of = siblings.get(m.parentId) ?? [];
      of.push(m.id);
      siblings.set(m.parentId, of);
    }
    for (const m of stored) m.siblings = siblings.get(m.parentId);
    return [...this.branch(stored), ...this.refused.values(), ...this.outbox.values()];
  }

  /** The path from the head back, oldest first (a parent not held yet ends it). */
  branch(stored) {
    const head = this.head && this.byId.get(this.head);
    // A server without branches names no head: one line, by seq.
    if (!this.branches || !head) return stored;
    // A reply that has not started is known by the id its user message says it will take.
    const byReplyId = new Map(stored.filter((m) => m.replyId).map((m) => [m.replyId, m]));
    const path = [];
    const seen = new Set();
    for (let at = head; at && !seen.has(at.id);) {
      seen.add(at.id);
      path.push(at);
      at = at.parentId ? this.byId.get(at.parentId) ?? byReplyId.get(at.parentId) : null;
    }
    return path.reverse();
  }

  /** Loads the history, then connects. */
  async start() {
    this.stopped = false;
    await this.reload();
    this.connect();
  }

  /** Closes the socket for good. */
  stop() {
    this.stopped = true;
    this.clearTimers();
    if (this.socket) this.socket.close(1000, "client stopped");
  }

  /**
   * Queues a user message: shown pending at once, sent now if connected, else on reconnect.
   * @param {string} text
   * @returns {string} its client_message_id
   */
  send(text) {
    const clientMessageId = crypto.randomUUID();
    /** @type {ChatMessage} */
    const message = {
      key: clientMessageId, id: null, seq: null, role: "user", content: text,
      status: "pending", replyTo: null, clientMessageId, stopReason: null,
      parentId: null, replyId: null, siblings: [],
    };
    this.outbox.set(clientMessageId, message);
    this.saveOutbox();
    this.transmit(message);
    this.changed();
    return clientMessageId;
  }

  /**
   * Stops the agent's reply to a user message (one not started is never started).
   * @param {string} userMessageId
   */
  cancel(userMessageId) {
    this.frame({ type: "cancel", reply_to: userMessageId });
  }

  /**
   * Asks for a new reply to a user message (one still streaming stops first); the earlier
   * replies stay, as its siblings. Says whether the frame went (a socket must be connected).
   * @param {string} userMessageId
   */
  regenerate(userMessageId) {
    return this.frame({ type: "regenerate", reply_to: userMessageId });
  }

  /**
   * A new version of a user message, beside it (same parent), answered by the agent; the
   * original and what follows it stay on their branch. Pending like `send` until stored.
   * @param {string} userMessageId
   * @param {string} text
   * @returns {string} its client_message_id
   */
  edit(userMessageId, text) {
    const clientMessageId = crypto.randomUUID();
    /** @type {ChatMessage} */
    const message = {
      key: clientMessageId, id: null, seq: null, role: "user", content: text,
      status: "pending", replyTo: null, clientMessageId, stopReason: null,
      parentId: null, replyId: null, siblings: [], editOf: userMessageId,
    };
    this.outbox.set(clientMessageId, message);
    this.saveOutbox();
    this.transmit(message);
    this.changed();
    return clientMessageId;
  }

  /**
   * Shows the branch through a stored message (the newest message that follows it becomes the
   * head), in every tab: over the socket, or over REST while it is down.
   * @param {string} messageId
   */
  async switchTo(messageId) {
    if (this.frame({ type: "head", message_id: messageId })) return;
    const token = await this.currentToken();
    const conversation = encodeURIComponent(this.options.conversationId);
    const response = await fetch(`${this.apiBase}/api/portal/chat/conversations/${conversation}/head`, {
      method: "PUT",
      headers: { Authorization: "Bearer " + token, "Content-Type": "application/json" },
      body: JSON.stringify({ message_id: messageId }),
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      if (this.options.onError) this.options.onError({ code: body.code || "internal", message: body.detail || response.statusText });
      return;
    }
    this.moveHead(body.head_id ?? null, body.reply_id);
    this.changed();
  }

  /** The head moved (as the server says); `replyId`: the id its reply will take. */
  moveHead(headId, replyId) {
    const head = headId && this.byId.get(headId);
    if (head && replyId) head.replyId = replyId;
    // Its reply has started already: the frames crossed (a reply to the head moves the head
    // when it starts, and the server never names a user message whose reply has started).
    const started = head && head.replyId && this.byId.get(head.replyId);
    if (started) headId = started.id;
    if (headId === this.head) return;
    this.head = headId;
    if (this.options.onHead) this.options.onHead(headId);
  }

  // --- connection -------------------------------------------------------------------------

  connect() {
    if (this.stopped) return;
    this.clearTimers();
    this.state = "connecting";
    this.changed();
    const socket = new WebSocket(this.socketUrl);
    this.socket = socket;
    socket.onopen = () => this.authenticate(socket);
    socket.onmessage = (event) => {
      if (socket === this.socket) this.receive(JSON.parse(event.data));
    };
    socket.onclose = (event) => {
      if (socket !== this.socket) return;
      this.socket = null;
      this.state = "disconnected";
      this.closeCode = event.code;
      this.clearTimers();
      this.changed();
      if (!this.stopped) {
        this.reconnects++;
        this.later(() => this.connect(), this.backoff());
      }
    };
  }

  /** The next reconnect's delay. */
  backoff() {
    return backoffMs(this.attempt++);
  }

  /** A valid token, from `getToken` (or `token`). */
  async currentToken() {
    const source = this.options.getToken ?? this.options.token;
    return typeof source === "function" ? await source() : source;
  }

  /**
   * Sends `auth` with a fresh token on `socket`: when it opens, and again on the same socket to
   * renew the token (resuming after what was seen, so nothing is missed meanwhile).
   */
  async authenticate(socket) {
    let token;
    try {
      token = await this.currentToken();
    } catch (e) {
      if (this.options.onError) this.options.onError({ code: "unauthenticated", message: `getToken failed: ${e}` });
      if (socket === this.socket) socket.close(4001, "no token");
      return;
    }
    if (socket !== this.socket || socket.readyState !== 1) return;
    const auth = { type: "auth", token };
    if (this.loaded) auth.resume_after = this.resumePoint();
    this.authenticating = true;
    this.token = token;
    socket.send(JSON.stringify(auth));
  }

  /**
   * What to resume after: the largest `seq` seen, or earlier when a reply is still streaming
   * here. A reply that ended while the socket was down has a `seq` below later messages already
   * seen, and chunks do not carry it: resuming from before the message it answers replays its
   * end (what is replayed again is kept once, by id).
   */
  resumePoint() {
    let point = this.lastSeq;
    for (const m of this.byId.values()) {
      if (m.role !== "assistant" || m.status !== "streaming") continue;
      const asked = m.replyTo ? this.byId.get(m.replyTo) : null;
      const before = m.seq < Number.MAX_SAFE_INTEGER ? m.seq - 1 : (asked?.seq ?? 0);
      point = Math.min(point, before);
    }
    return point;
  }

  /** Renews the token on the open socket shortly before it expires. */
  scheduleRenewal() {
    clearTimeout(this.renewal);
    const expires = this.token ? expiresAt(this.token) : null;
    if (expires === null) return;
    const lead = this.options.renewBeforeMs ?? RENEW_BEFORE_MS;
    const socket = this.socket;
    this.renewal = setTimeout(() => {
      if (socket === this.socket) this.authenticate(socket);
    }, Math.max(1000, expires - lead - Date.now()));
    this.timers.push(this.renewal);
  }

  later(f, ms) {
    this.timers.push(setTimeout(f, ms));
  }

  clearTimers() {
    for (const t of this.timers) { clearTimeout(t); clearInterval(t); }
    this.timers = [];
  }

  /** Sends a frame if a socket is authenticated; says whether it went. */
  frame(frame) {
    if (this.state !== "connected" || !this.socket) return false;
    this.socket.send(JSON.stringify(frame));
    return true;
  }

  transmit(message) {
    this.frame(message.editOf
      ? { type: "edit", message_id: message.editOf, text: message.content, client_message_id: message.clientMessageId }
      : { type: "message", text: message.content, client_message_id: message.clientMessageId });
  }

  // --- frames from the server --------------------------------------------------------------

  receive(frame) {
    switch (frame.type) {
      case "auth_ok":
        this.authenticating = false;
        this.scheduleRenewal();
        if (this.state !== "connected") {
          // A renewal's auth_ok on a connected socket keeps its timers.
          this.state = "connected";
          this.attempt = 0;
          this.timers.push(setInterval(() => this.frame({ type: "ping" }), PING_MS));
          // API Gateway cuts every connection at 2 hours: leave first, and resume.
          const socket = this.socket;
          this.later(() => socket === this.socket && socket.close(4000, "renewing before the 2-hour cut"),
            this.options.maxConnectionMs ?? TWO_HOURS_LESS_MARGIN_MS);
        }
        if (!this.loaded) { this.loaded = true; this.seen(frame.last_seq); }
        // The replay that follows is history: it does not move the head, auth_ok names it.
        this.branches = "head_id" in frame;
        this.moveHead(frame.head_id ?? null);
        // Whatever is still unacknowledged goes again, with the same client_message_id.
        for (const message of this.outbox.values()) this.transmit(message);
        break;
      case "replay":
        if (!frame.recovered) { this.reload(); break; }
        for (const m of frame.messages) this.store(m);
        break;
      case "ack": {
        const message = this.outbox.get(frame.client_message_id);
        this.outbox.delete(frame.client_message_id);
        this.saveOutbox();
        this.store({
          id: frame.message_id, seq: frame.seq, role: "user",
          content: message ? message.content : (this.byId.get(frame.message_id)?.content ?? ""),
          status: "complete", reply_to: null, client_message_id: frame.client_message_id,
          parent_id: frame.parent_id, reply_id: frame.reply_id,
        });
        this.moveHead(frame.message_id);
        break;
      }
      case "message":
        // Too long for a frame: announced without its text, which is read by `seq`.
        if (typeof frame.content !== "string") {
          this.fetchAfter(frame.seq - 1, 1).then(() => { this.moveHead(frame.message_id); this.changed(); });
          break;
        }
        this.store({ ...frame, id: frame.message_id, status: "complete", reply_to: null });
        this.moveHead(frame.message_id);
        break;
      case "head":
        this.moveHead(frame.head_id ?? null, frame.reply_id);
        break;
      case "typing":
        this.typing = true;
        break;
      case "chunk":
        this.chunk(frame);
        break;
      case "response": {
        const reply = this.reply(frame);
        if (frame.text !== undefined && frame.text !== null) reply.content = frame.text;
        // Too long for the frame, and a chunk was missed: the whole text is read by `seq`.
        else if (reply.gap) this.fetchAfter(frame.seq - 1, 1);
        reply.gap = false;
        reply.seq = frame.seq;
        reply.stopReason = frame.stop_reason;
        reply.status = { cancelled: "cancelled", error: "failed" }[frame.stop_reason] || "complete";
        this.seen(frame.seq);
        if (frame.reply_to === this.head) this.moveHead(reply.id);
        this.typing = false;
        break;
      }
      case "error": {
        this.typing = false;
        if (frame.code === "unauthenticated") {
          this.unauthenticated();
          break;
        }
        // A refusal names the message it refuses: one that cannot succeed leaves the outbox,
        // visibly failed, instead of being sent again on every reconnect; one refused for now
        // goes again after a backoff.
        const refused = frame.client_message_id && this.outbox.get(frame.client_message_id);
        if (refused && PERMANENT_REFUSALS.includes(frame.code)) {
          this.outbox.delete(frame.client_message_id);
          this.saveOutbox();
          this.refused.set(frame.client_message_id, { ...refused, status: "failed", error: frame.code });
        } else if (refused && TRANSIENT_REFUSALS.includes(frame.code)) {
          refused.retries = (refused.retries ?? 0) + 1;
          this.later(() => this.outbox.get(refused.clientMessageId) === refused && this.transmit(refused),
            backoffMs(refused.retries));
        }
        if (this.options.onError) this.options.onError(frame);
        break;
      }
    }
    this.changed();
  }

  /** A stored message, as replay, history and frames describe it; kept once, by id. */
  store(m) {
    const existing = this.byId.get(m.id);
    // A page read before a reply ended does not take back what the socket has since shown.
    if (existing && existing.role === "assistant" && m.status === "streaming"
        && (existing.status !== "streaming" || [...existing.content].length > [...m.content].length)) {
      existing.seq = m.seq;
      this.seen(m.seq);
      return;
    }
    const message = existing || /** @type {ChatMessage} */ ({ key: m.id });
    Object.assign(message, {
      id: m.id, seq: m.seq, role: m.role, content: m.content, status: m.status,
      replyTo: m.reply_to ?? null, clientMessageId: m.client_message_id ?? message.clientMessageId ?? null,
      stopReason: message.stopReason ?? null,
      parentId: m.parent_id ?? (m.role === "assistant" ? m.reply_to ?? null : null),
      replyId: m.reply_id ?? message.replyId ?? null, siblings: message.siblings ?? [],
    });
    if (message.clientMessageId && this.outbox.has(message.clientMessageId)) {
      message.key = message.clientMessageId;
      this.outbox.delete(message.clientMessageId);
      this.saveOutbox();
    }
    this.byId.set(m.id, message);
    this.seen(m.seq);
  }

  /** The reply a chunk or response belongs to, created when first seen. */
  reply(frame) {
    let reply = this.byId.get(frame.message_id);
    if (!reply) {
      reply = {
        key: frame.message_id, id: frame.message_id, seq: frame.seq ?? Number.MAX_SAFE_INTEGER,
        role: "assistant", content: "", status: "streaming", replyTo: frame.reply_to,
        clientMessageId: null, stopReason: null, parentId: frame.reply_to, replyId: null,
        siblings: [],
      };
      this.byId.set(frame.message_id, reply);
      // A reply to the head becomes the head when it starts.
      if (frame.reply_to === this.head) this.moveHead(reply.id);
    }
    return reply;
  }

  /**
   * The token expired (or was refused): a fresh one is sent on the same socket. If that one is
   * refused too, the socket is closed and opened again after a backoff, asking for a token
   * again; what was refused meanwhile is still in the outbox and goes after `auth_ok`.
   */
  unauthenticated() {
    const socket = this.socket;
    if (!socket) return;
    if (this.authenticating) {
      if (this.options.onError) this.options.onError({ code: "unauthenticated", message: "the token was refused" });
      socket.close(4001, "token refused");
    } else {
      this.authenticate(socket);
    }
  }

  /**
   * Applies a chunk where it belongs: its text past the length held (so a repeat is ignored,
   * and a chunk that overlaps what is held, such as the text so far sent on a resume,
   * contributes its new part). A chunk past the length held leaves a gap: the text is read
   * again when the reply ends.
   */
  chunk(frame) {
    const reply = this.reply(frame);
    if (reply.status !== "streaming") return;
    if (frame.reset) { reply.content = ""; reply.gap = false; }
    const held = [...reply.content].length;
    const delta = [...frame.delta];
    if (frame.offset > held) reply.gap = true;
    else if (frame.offset + delta.length > held) reply.content += delta.slice(held - frame.offset).join("");
    this.typing = false;
  }

  seen(seq) {
    if (typeof seq === "number" && seq > this.lastSeq) this.lastSeq = seq;
  }

  /**
   * The newest page of history over REST: the first load, and after too much was missed. What
   * is held from before the page is dropped (a gap would lie between); what arrived while it
   * was read (newer than the page, or a reply not stored when it was read) is kept.
   */
  async reload() {
    const page = await this.history("limit=200&branch=all");
    if (!page) return;
    const oldest = page.length ? page[0].seq : 0;
    for (const [id, m] of this.byId) {
      if (m.seq < oldest) this.byId.delete(id);
    }
    for (const m of page) this.store(m);
    this.loaded = true;
    this.changed();
  }

  /** The `limit` messages just after `seq`, over REST (a message announced without its text). */
  async fetchAfter(seq, limit) {
    const page = await this.history(`after_seq=${seq}&limit=${limit}&branch=all`);
    if (!page) return;
    for (const m of page) this.store(m);
    this.changed();
  }

  /** A page of the conversation's history; errors go to `onError`. */
  async history(query) {
    const token = await this.currentToken();
    const conversation = encodeURIComponent(this.options.conversationId);
    const url = `${this.apiBase}/api/portal/chat/conversations/${conversation}/messages?${query}`;
    const response = await fetch(url, { headers: { Authorization: "Bearer " + token } });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      if (this.options.onError) this.options.onError({ code: body.code || "internal", message: body.detail || response.statusText });
      return null;
    }
    return response.json();
  }

  // --- the outbox across reloads ----------------------------------------------------------

  saveOutbox() {
    if (!this.storage) return;
    const pending = [...this.outbox.values()].map((m) => ({ c: m.clientMessageId, t: m.content, e: m.editOf ?? null }));
    this.storage.setItem(this.outboxKey, JSON.stringify(pending));
  }

  restoreOutbox() {
    if (!this.storage) return;
    for (const { c, t, e } of JSON.parse(this.storage.getItem(this.outboxKey) || "[]")) {
      this.outbox.set(c, {
        key: c, id: null, seq: null, role: "user", content: t, status: "pending",
        replyTo: null, clientMessageId: c, stopReason: null, parentId: null, replyId: null,
        siblings: [], editOf: e ?? null,
      });
    }
  }

  changed() {
    if (this.options.onChange) this.options.onChange(this);
  }
}
