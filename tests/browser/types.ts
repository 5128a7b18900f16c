// Type-checked, never run: what a portal developer's TypeScript writes against konstruct-chat.js,
// so `tsc --strict` (the `client_module` test) fails when konstruct-chat.d.ts and the module's
// use drift apart.
import {
  Chat,
  type ChatError,
  type ChatMessage,
  type ClientFrame,
  type ServerFrame,
} from "../../functions/konstruct-local/static/konstruct-chat.js";

declare function freshJwt(): Promise<string>;
declare function render(messages: ChatMessage[], state: string, typing: boolean): void;

const chat = new Chat({
  conversationId: "c0000000-0000-4000-8000-000000000001",
  getToken: () => freshJwt(),
  socketUrl: "wss://api.execute-api.eu-west-1.amazonaws.com/prod?conversation_id=c0000000-0000-4000-8000-000000000001",
  apiBase: "https://chat-api.example.test",
  onChange: (c) => render(c.messages, c.state, c.typing),
  onError: (e: ChatError) => console.warn(e.code, e.message, e.client_message_id),
  onHead: (headId: string | null) => console.info("branch now ends at", headId),
  maxConnectionMs: 115 * 60 * 1000,
  renewBeforeMs: 60_000,
  storage: null,
});

async function use(): Promise<void> {
  await chat.start();
  const clientMessageId: string = chat.send("Hello");
  const mine = chat.messages.find((m) => m.clientMessageId === clientMessageId);
  if (mine?.id) chat.cancel(mine.id);
  for (const m of chat.messages) {
    const seq: number | null = m.seq;
    const failed: boolean = m.status === "failed" && m.error !== undefined;
    const version = `${m.id ? m.siblings.indexOf(m.id) + 1 : 0} of ${m.siblings.length}`;
    const parent: string | null = m.parentId;
    void seq, failed, version, parent;
    if (m.role === "assistant" && m.replyTo) chat.regenerate(m.replyTo);
    if (m.role === "user" && m.id) chat.edit(m.id, "Better words");
    if (m.id && m.siblings.length > 1) await chat.switchTo(m.siblings[0]);
  }
  const head: string | null = chat.head;
  void head;
  await chat.reload();
  chat.stop();
}
void use;

// Every frame narrows on `type`.
function describe(frame: ServerFrame): string {
  switch (frame.type) {
    case "auth_ok": return `resumes after ${frame.last_seq}`;
    case "replay": return `${frame.messages.length} missed, recovered ${frame.recovered}`;
    case "ack": return `stored as ${frame.seq}`;
    case "message": return frame.content ?? `read ${frame.seq} over REST`;
    case "typing": return "typing";
    case "chunk": return `${frame.offset}+${frame.delta.length}${frame.reset ? " (reset)" : ""}`;
    case "response": return `${frame.stop_reason}: ${frame.text ?? "(rebuilt from chunks)"}`;
    case "error": return `${frame.code}: ${frame.message}`;
    case "head": return `branch ends at ${frame.head_id ?? "nothing"}${frame.reply_id ? ` (reply ${frame.reply_id} to come)` : ""}`;
    case "pong": return "pong";
  }
}
void describe;

const frames: ClientFrame[] = [
  { type: "auth", token: "jwt", resume_after: 42 },
  { type: "message", text: "Hi", client_message_id: "00000000-0000-4000-8000-000000000000" },
  { type: "cancel", reply_to: "00000000-0000-4000-8000-000000000000" },
  { type: "regenerate", reply_to: "00000000-0000-4000-8000-000000000000" },
  { type: "edit", message_id: "00000000-0000-4000-8000-000000000000", text: "Hi again", client_message_id: "00000000-0000-4000-8000-000000000001" },
  { type: "head", message_id: "00000000-0000-4000-8000-000000000000" },
  { type: "ping" },
];
void frames;
