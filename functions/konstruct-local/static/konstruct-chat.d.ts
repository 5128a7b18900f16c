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
  /** The message it follows (null for the conversation's first; null while pending). */
  parentId: string | null;
  /** For a user message: the id its reply takes (known before the reply starts). */
  replyId: string | null;
  /**
   * The ids of the messages beside it (same parent), oldest first, itself among them: "2 of 3"
   * is `siblings.indexOf(id) + 1` of `siblings.length`. Filled by `messages`.
   */
  siblings: string[];
  /** For a pending edit: the user message it edits. */
  editOf?: string | null;
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
  /** The current branch changed (here or in another tab): it now ends at `headId`. */
  onHead?: (headId: string | null) => void;
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
  /**
   * The current branch (the path from the head back, oldest first), then refused ones, then
   * pending ones. Before the server names a head: every stored message in `seq` order.
   */
  readonly messages: ChatMessage[];
  /** The end of the current branch; null until the server names it (or while empty). */
  head: string | null;
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
  /**
   * A new reply to a user message (one streaming stops first); the earlier ones stay, as
   * siblings. False when no socket is connected.
   */
  regenerate(userMessageId: string): boolean;
  /** A new version of a user message beside it, answered (pending until stored). */
  edit(userMessageId: string, text: string): string;
  /** Shows the branch through a stored message, in every tab. */
  switchTo(messageId: string): Promise<void>;
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
  /** The message it follows; null for the conversation's first. */
  parent_id: string | null;
  /** User messages: the id their reply takes. */
  reply_id?: string;
  /** History items: the ids of the messages with the same parent, oldest first. */
  siblings?: string[];
}

export type ServerFrame =
  | { type: "auth_ok"; conversation_id: string; user_id: string; last_seq: number; head_id: string | null }
  | {
      type: "head";
      conversation_id: string;
      head_id: string | null;
      /** When the head is a user message whose reply has not started: the id it will take. */
      reply_id?: string;
    }
  | { type: "replay"; messages: StoredMessage[]; recovered: boolean; more: boolean }
  | {
      type: "ack";
      conversation_id: string;
      message_id: string;
      client_message_id: string | null;
      seq: number;
      parent_id: string | null;
      reply_id: string;
    }
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
      parent_id: string | null;
      reply_id: string;
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
  | { type: "regenerate"; reply_to: string }
  | { type: "edit"; message_id: string; text: string; client_message_id?: string }
  | { type: "head"; message_id: string }
  | { type: "ping" };
