// Types for konstruct-chat.js, the browser client of the Konstruct web chat protocol
// (docs/protocol.md). Checked against the module's use by `tsc --strict` in `make test`
// (tests/browser/types.ts).

/** A stored message's state; `pending` only on the client, before the server acknowledges it. */
export type MessageStatus = "pending" | "complete" | "streaming" | "cancelled" | "failed";

/** Why a reply ended: `length` when a size limit cut it. */
export type StopReason = "end" | "length" | "cancelled" | "error";

/** The `code` of an `error` frame, and of what `onError` is given. */
export type ErrorCode =
  | "bad_request"
  | "unauthenticated"
  | "forbidden"
  | "not_found"
  | "conflict"
  | "too_large"
  | "rate_limited"
  | "agent_failed"
  | "internal";

/** One message as the module holds it. */
export interface ChatMessage {
  /** A stable key for rendering (the client_message_id until stored, then kept). */
  key: string;
  /** The stored message's id; null while pending. */
  id: string | null;
  /** Its place in the conversation; null while pending. */
  seq: number | null;
  role: "user" | "assistant";
  content: string;
  status: MessageStatus;
  /** For a reply, the user message it answers. */
  replyTo: string | null;
  clientMessageId: string | null;
  stopReason: StopReason | null;
  /** For a message refused for good, the refusal's code. */
  error?: ErrorCode;
}

export interface ChatError {
  code: ErrorCode | string;
  message: string;
  client_message_id?: string | null;
}

export interface ChatOptions {
  conversationId: string;
  /**
   * Gives a valid portal JWT: called at every connect, shortly before the one in use expires,
   * and when the server says `unauthenticated`.
   */
  getToken?: () => string | Promise<string>;
  /** The same as `getToken`, or a fixed JWT (which cannot be renewed). */
  token?: string | (() => string | Promise<string>);
  /**
   * Default: ws(s)://<this host>/chat/ws/<conversationId>; on AWS:
   * wss://{api}.execute-api.{region}.amazonaws.com/{stage}?conversation_id=…
   */
  socketUrl?: string;
  /** Where the REST history is read (default: this origin). */
  apiBase?: string;
  /** Called after every change of state. */
  onChange?: (chat: Chat) => void;
  /** A refusal, a failed history read, a token that could not be had. */
  onError?: (error: ChatError) => void;
  /** Reconnect before this (default 115 minutes: API Gateway cuts at 2 hours). */
  maxConnectionMs?: number;
  /** Renew the token this long before it expires (default 60 000). */
  renewBeforeMs?: number;
  /** Where the outbox survives a reload (default sessionStorage; null for none). */
  storage?: Storage | null;
}

export type ConnectionState = "connecting" | "connected" | "disconnected";

export declare class Chat {
  constructor(options: ChatOptions);
  readonly options: ChatOptions;
  /** Every message once: stored ones in `seq` order, then refused ones, then pending ones. */
  readonly messages: ChatMessage[];
  /** The largest `seq` seen: what a reconnect resumes after. */
  lastSeq: number;
  state: ConnectionState;
  /** The agent is typing (between `typing` and the first chunk or the response). */
  typing: boolean;
  /** How many times the socket was opened again. */
  reconnects: number;
  /** The close code of the socket last closed. */
  closeCode?: number;
  /** Loads the history, then connects. */
  start(): Promise<void>;
  /** Closes the socket for good. */
  stop(): void;
  /** Queues a user message (shown pending at once); returns its client_message_id. */
  send(text: string): string;
  /** Stops the agent's reply to a user message. */
  cancel(userMessageId: string): void;
  /** Reads the newest page of history again over REST. */
  reload(): Promise<void>;
}

// --- the wire: frames a server sends and a client sends (docs/protocol.md §2) ---------------

export interface StoredMessage {
  seq: number;
  id: string;
  role: "user" | "assistant";
  content: string;
  status: Exclude<MessageStatus, "pending">;
  reply_to: string | null;
  /** User messages: the sending client's own id, when it gave one. */
  client_message_id?: string | null;
  created_at: string;
  /** User messages: who wrote it (the conversation's owner, or a platform admin). */
  author_id?: string;
}

export type ServerFrame =
  | { type: "auth_ok"; conversation_id: string; user_id: string; last_seq: number }
  | { type: "replay"; messages: StoredMessage[]; recovered: boolean; more: boolean }
  | { type: "ack"; conversation_id: string; message_id: string; client_message_id: string | null; seq: number }
  | {
      type: "message";
      conversation_id: string;
      message_id: string;
      seq: number;
      role: "user";
      /** Absent when the message is too long for a frame: read it by `seq` over REST. */
      content?: string;
      created_at: string;
      client_message_id: string | null;
    }
  | { type: "typing"; conversation_id: string }
  | {
      type: "chunk";
      conversation_id: string;
      message_id: string;
      reply_to: string;
      /** Characters (Unicode scalar values) of the reply before `delta`. */
      offset: number;
      delta: string;
      /** The reply restarted: discard the partial text (offset is 0). Absent when false. */
      reset?: boolean;
    }
  | {
      type: "response";
      conversation_id: string;
      message_id: string;
      reply_to: string;
      seq: number;
      /** Absent when the whole reply does not fit in a frame. */
      text?: string | null;
      stop_reason: StopReason;
      usage?: { input_tokens: number; output_tokens: number };
    }
  | { type: "error"; code: ErrorCode; message: string; client_message_id?: string | null }
  | { type: "pong" };

export type ClientFrame =
  | { type: "auth"; token: string; resume_after?: number }
  | { type: "message"; text: string; client_message_id?: string }
  | { type: "cancel"; reply_to: string }
  | { type: "ping" };
