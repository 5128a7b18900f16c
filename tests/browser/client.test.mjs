// The client module (konstruct-chat.js) against a scripted server: each test plays the frames
// the server sends in one situation and checks what the module holds and sends.
// Run: node --test tests/browser/client.test.mjs (the `client_module` integration test does).
import { test } from "node:test";
import assert from "node:assert/strict";

// What a browser gives the module.
globalThis.location = { protocol: "http:", host: "chat.test", origin: "http://chat.test" };
class MemoryStorage {
  constructor() { this.items = new Map(); }
  getItem(k) { return this.items.has(k) ? this.items.get(k) : null; }
  setItem(k, v) { this.items.set(k, String(v)); }
  removeItem(k) { this.items.delete(k); }
}
globalThis.sessionStorage = new MemoryStorage();

/** A WebSocket the test plays the server's side of. */
class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.all.push(this);
    queueMicrotask(() => { this.readyState = 1; this.onopen?.(); });
  }
  send(data) { this.sent.push(JSON.parse(data)); }
  close(code = 1000) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    queueMicrotask(() => this.onclose?.({ code }));
  }
  /** A frame from the server. */
  push(frame) { this.onmessage({ data: JSON.stringify(frame) }); }
  framesOfType(type) { return this.sent.filter((f) => f.type === type); }
}
globalThis.WebSocket = FakeSocket;

/** The REST API: pages served by `pages` (query → array), or a pending promise. */
let pages = () => [];
globalThis.fetch = async (url) => {
  const query = new URL(url).searchParams.toString();
  const page = await pages(query);
  return { ok: true, json: async () => page };
};

const { Chat } = await import("../../functions/konstruct-local/static/konstruct-chat.js");

const conversationId = "c0000000-0000-4000-8000-000000000001";
const settle = () => new Promise((r) => setTimeout(r, 0));
const until = async (what, check) => {
  for (let i = 0; i < 200; i++) {
    if (check()) return;
    await new Promise((r) => setTimeout(r, 5));
  }
  assert.fail(`timed out waiting for ${what}`);
};

/** A JWT whose `exp` is `seconds` from now (the module reads, never verifies, it). */
function jwt(seconds, n = 0) {
  const part = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return `${part({ alg: "HS256" })}.${part({ sub: "u", exp: Math.floor(Date.now() / 1000) + seconds, n })}.sig`;
}

/** A started chat whose socket has authenticated; history `page` served first. */
async function connected({ page = [], lastSeq = 0, ...options } = {}) {
  FakeSocket.all = [];
  pages = () => page;
  const chat = new Chat({ conversationId, getToken: () => jwt(3600), storage: new MemoryStorage(), ...options });
  await chat.start();
  await until("the socket's auth", () => FakeSocket.all[0]?.sent.length > 0);
  const socket = FakeSocket.all[0];
  socket.push({ type: "auth_ok", conversation_id: conversationId, user_id: "u", last_seq: lastSeq });
  return { chat, socket };
}

const stored = (seq, id, role, content, extra = {}) => ({
  seq, id, role, content, status: "complete", reply_to: null, client_message_id: null,
  created_at: "2026-12-03T00:00:00Z", ...extra,
});

test("a resumed stream continues from a catch-up chunk that overlaps what is held", async () => {
  const { chat, socket } = await connected();
  const chunk = (offset, delta, extra = {}) => socket.push({
    type: "chunk", conversation_id: conversationId, message_id: "r1", reply_to: "m1",
    offset, delta, reset: false, ...extra,
  });
  chunk(0, "Hello, ");
  // The socket drops; the new one is sent the text so far from offset 0, then live chunks.
  chunk(0, "Hello, wor");
  chunk(10, "ld");
  chunk(7, "world");   // a repeat of what is held: ignored
  assert.equal(chat.byId.get("r1").content, "Hello, world");
  chunk(12, " and ünïcödé ✓");
  chunk(0, "Hello, world and ünïcödé ✓ end");
  assert.equal(chat.byId.get("r1").content, "Hello, world and ünïcödé ✓ end");
  chat.stop();
});

test("a chunk past what is held leaves a gap that the end of the reply reads again", async () => {
  const { chat, socket } = await connected();
  pages = (query) => (query.includes("after_seq=4")
    ? [stored(5, "r1", "assistant", "one two three", { reply_to: "m1" })] : []);
  socket.push({ type: "chunk", conversation_id: conversationId, message_id: "r1", reply_to: "m1", offset: 0, delta: "one", reset: false });
  socket.push({ type: "chunk", conversation_id: conversationId, message_id: "r1", reply_to: "m1", offset: 7, delta: " three", reset: false });
  assert.equal(chat.byId.get("r1").content, "one");
  // Too long for the frame: the response comes without its text.
  socket.push({ type: "response", conversation_id: conversationId, message_id: "r1", reply_to: "m1", seq: 5, stop_reason: "end" });
  await until("the reply read again", () => chat.byId.get("r1").content === "one two three");
  assert.equal(chat.byId.get("r1").status, "complete");
  chat.stop();
});

test("the token is renewed on the same socket before it expires, and on unauthenticated", async () => {
  let n = 0;
  const { chat, socket } = await connected({
    getToken: () => jwt(2, ++n), renewBeforeMs: 1000,
  });
  // Renewed about a second before its expiry, on the same socket, resuming after what was seen.
  await until("a renewal", () => socket.framesOfType("auth").length === 2);
  const [first, renewal] = socket.framesOfType("auth");
  const nOf = (token) => JSON.parse(Buffer.from(token.split(".")[1], "base64url")).n;
  assert.ok(nOf(renewal.token) > nOf(first.token), "a token asked for again, not the old one");
  assert.equal(renewal.resume_after, 0);
  socket.push({ type: "auth_ok", conversation_id: conversationId, user_id: "u", last_seq: 0 });
  assert.equal(chat.state, "connected");

  // The server says the token expired when a message is sent: a fresh auth, then the message
  // goes again, on the same socket.
  const id = chat.send("after expiry");
  socket.push({ type: "error", code: "unauthenticated", message: "token expired", client_message_id: id });
  await until("an auth after unauthenticated", () => socket.framesOfType("auth").length === 3);
  socket.push({ type: "auth_ok", conversation_id: conversationId, user_id: "u", last_seq: 0 });
  const sends = socket.framesOfType("message").filter((f) => f.client_message_id === id);
  assert.equal(sends.length, 2, "sent, refused, sent again after the new auth_ok");
  assert.equal(FakeSocket.all.length, 1, "no reconnect was needed");
  chat.stop();
});

test("a token refused twice closes the socket and a new one asks for a token again", async () => {
  let n = 0;
  const { chat, socket } = await connected({ getToken: () => jwt(3600, ++n) });
  socket.push({ type: "error", code: "unauthenticated", message: "token expired" });
  await until("a fresh auth", () => socket.framesOfType("auth").length === 2);
  socket.push({ type: "error", code: "unauthenticated", message: "token expired" });
  await until("a new socket", () => FakeSocket.all.length === 2);
  await until("its auth", () => FakeSocket.all[1].framesOfType("auth").length === 1);
  assert.equal(socket.readyState, 3);
  assert.ok(n >= 3);
  chat.stop();
});

test("a transiently refused message is sent again after a backoff; a permanent refusal fails it", async () => {
  const { chat, socket } = await connected();
  const later = chat.send("rate limited");
  const never = chat.send("forbidden");
  socket.push({ type: "error", code: "rate_limited", message: "slow down", client_message_id: later });
  socket.push({ type: "error", code: "forbidden", message: "no", client_message_id: never });
  await until("the retry", () => socket.framesOfType("message").filter((f) => f.client_message_id === later).length === 2);
  assert.equal(chat.outbox.has(later), true);
  assert.equal(chat.outbox.has(never), false);
  assert.equal(chat.messages.find((m) => m.clientMessageId === never).status, "failed");
  socket.push({ type: "ack", conversation_id: conversationId, message_id: "m1", client_message_id: later, seq: 1 });
  assert.equal(chat.outbox.size, 0);
  chat.stop();
});

test("a message sent just before a drop and found in the replay is shown once", async () => {
  const { chat, socket } = await connected();
  const id = chat.send("just before the drop");
  socket.close(1006);
  await until("a new socket", () => FakeSocket.all.length === 2 && FakeSocket.all[1].sent.length > 0);
  const again = FakeSocket.all[1];
  assert.equal(again.sent[0].resume_after, 0);
  again.push({ type: "auth_ok", conversation_id: conversationId, user_id: "u", last_seq: 1 });
  again.push({
    type: "replay", recovered: true, more: false,
    messages: [stored(1, "m1", "user", "just before the drop", { client_message_id: id })],
  });
  const shown = chat.messages.filter((m) => m.content === "just before the drop");
  assert.equal(shown.length, 1);
  assert.equal(shown[0].status, "complete");
  assert.equal(shown[0].key, id, "the pending bubble becomes the stored one");
  // History read later carries the same id: still once.
  pages = () => [stored(1, "m1", "user", "just before the drop", { client_message_id: id })];
  await chat.reload();
  assert.equal(chat.messages.filter((m) => m.content === "just before the drop").length, 1);
  chat.stop();
});

test("frames that arrive while a reload reads the history are kept", async () => {
  const { chat, socket } = await connected({ page: [stored(1, "m1", "user", "old")] });
  let release;
  pages = () => new Promise((r) => { release = r; });
  socket.push({ type: "replay", recovered: false, more: false, messages: [] });
  await until("the reload's request", () => release);
  // Meanwhile a message and a reply arrive live.
  socket.push({ type: "message", conversation_id: conversationId, message_id: "m900", seq: 900, role: "user", content: "live", created_at: "x", client_message_id: null });
  socket.push({ type: "chunk", conversation_id: conversationId, message_id: "r901", reply_to: "m900", offset: 0, delta: "streaming", reset: false });
  socket.push({ type: "response", conversation_id: conversationId, message_id: "r901", reply_to: "m900", seq: 901, stop_reason: "end", text: "streaming done" });
  // The page was read before those: its newest is 899, and the reply it read still streaming.
  release([stored(700, "m700", "user", "page"), stored(899, "r901x", "assistant", "x", { reply_to: "m700" })]);
  await until("the reload", () => !chat.byId.has("m1"));
  assert.deepEqual(chat.messages.map((m) => m.seq), [700, 899, 900, 901]);
  assert.equal(chat.byId.get("r901").content, "streaming done");
  assert.equal(chat.lastSeq, 901);
  chat.stop();
});

test("a page read while a reply streamed does not take back its end", async () => {
  const { chat, socket } = await connected();
  let release;
  pages = () => new Promise((r) => { release = r; });
  socket.push({ type: "replay", recovered: false, more: false, messages: [] });
  await until("the reload's request", () => release);
  socket.push({ type: "response", conversation_id: conversationId, message_id: "r2", reply_to: "m1", seq: 2, stop_reason: "end", text: "the whole reply" });
  release([stored(1, "m1", "user", "q"), stored(2, "r2", "assistant", "the wh", { status: "streaming", reply_to: "m1" })]);
  await until("the reload", () => chat.byId.has("m1"));
  assert.equal(chat.byId.get("r2").content, "the whole reply");
  assert.equal(chat.byId.get("r2").status, "complete");
  chat.stop();
});

test("a reply that ended while the socket was down is read again, though later messages were seen", async () => {
  const { chat, socket } = await connected();
  socket.push({ type: "ack", conversation_id: conversationId, message_id: "m1", client_message_id: null, seq: 1 });
  socket.push({ type: "chunk", conversation_id: conversationId, message_id: "r2", reply_to: "m1", offset: 0, delta: "partial", reset: false });
  // The user sends again while the reply streams: seq 3 is seen, the reply (seq 2) not yet ended.
  socket.push({ type: "ack", conversation_id: conversationId, message_id: "m3", client_message_id: null, seq: 3 });
  assert.equal(chat.lastSeq, 3);
  socket.close(1006);
  await until("a new socket", () => FakeSocket.all.length === 2 && FakeSocket.all[1].sent.length > 0);
  const again = FakeSocket.all[1];
  // It resumes from before the reply, so the reply's end (stored meanwhile) is replayed.
  assert.equal(again.sent[0].resume_after, 1);
  again.push({ type: "auth_ok", conversation_id: conversationId, user_id: "u", last_seq: 3 });
  again.push({
    type: "replay", recovered: true, more: false,
    messages: [
      stored(2, "r2", "assistant", "partial and the rest", { reply_to: "m1" }),
      stored(3, "m3", "user", ""),
    ],
  });
  assert.equal(chat.byId.get("r2").content, "partial and the rest");
  assert.equal(chat.byId.get("r2").status, "complete");
  assert.deepEqual(chat.messages.map((m) => m.seq), [1, 2, 3]);
  chat.stop();
});

test("a reply whose frames come before the ack or the head frame still ends the branch", async (t) => {
  const { chat, socket } = await connected({ page: [stored(1, "m0", "user", "hi", { reply_id: "r0" }),
    stored(2, "r0", "assistant", "hello", { reply_to: "m0", parent_id: "m0" })] });
  t.after(() => chat.stop());
  socket.push({ type: "auth_ok", conversation_id: conversationId, user_id: "u", last_seq: 2, head_id: "r0" });
  chat.send("again");
  const [sent] = socket.framesOfType("message");
  // On the Lambda path the route's ack is posted after the function returns: the reply can
  // come first.
  socket.push({ type: "response", conversation_id: conversationId, message_id: "r1", reply_to: "m1",
    seq: 4, text: "answer", stop_reason: "end" });
  socket.push({ type: "ack", conversation_id: conversationId, message_id: "m1", seq: 3,
    client_message_id: sent.client_message_id, parent_id: "r0", reply_id: "r1" });
  assert.equal(chat.head, "r1");
  assert.deepEqual(chat.messages.map((m) => m.id), ["m0", "r0", "m1", "r1"]);
  // A regenerate's head frame that arrives after its reply started.
  socket.push({ type: "response", conversation_id: conversationId, message_id: "r2", reply_to: "m1",
    seq: 5, text: "answer, again", stop_reason: "end" });
  socket.push({ type: "head", conversation_id: conversationId, head_id: "m1", reply_id: "r2" });
  assert.equal(chat.head, "r2");
  assert.deepEqual(chat.messages.map((m) => m.id), ["m0", "r0", "m1", "r2"]);
});
