//! The browser client module (`konstruct-chat.js`) alone: its behaviour against a scripted
//! server, and its TypeScript declarations (`konstruct-chat.d.ts`) against what a portal
//! developer writes and against every frame the server sends, as the server serializes them.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use chrono::Utc;
use serde_json::json;
use shared::Error;
use shared::db::messages::{MessageRole, MessageStatus, MessageView, StopReason, Usage};
use shared::domain::{ClientMessageId, ConversationId, MessageId, UserId};
use shared::frame::{ChunkOf, ServerFrame};
use tokio::process::Command;

/// Runs `program` with `args`, failing the test with all it said unless it succeeds.
async fn run(program: &Path, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    assert!(
        output.status.success(),
        "{} {args:?} failed:\n{}\n{}",
        program.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// `tsc` from the packages `infra/local/tools.sh` installs.
fn tsc() -> PathBuf {
    let node_path = std::env::var("NODE_PATH").expect(
        "NODE_PATH is not set: run the tests through `make test`, which installs typescript",
    );
    Path::new(&node_path).join(".bin/tsc")
}

/// Type-checks `file` strictly, as a portal's TypeScript build would.
async fn type_check(file: &Path) {
    let file = file.to_str().expect("a UTF-8 path");
    run(
        &tsc(),
        &[
            "--strict",
            "--noEmit",
            "--target",
            "es2022",
            "--module",
            "es2022",
            "--moduleResolution",
            "bundler",
            "--lib",
            "es2022,dom",
            file,
        ],
    )
    .await;
}

/// Resumed streams, token renewal, refusals, replays and reloads, frame by frame
/// (`tests/browser/client.test.mjs`, Node's test runner).
#[tokio::test]
async fn the_client_module_keeps_in_step_with_a_scripted_server() {
    let script = browser_dir().join("client.test.mjs");
    run(
        Path::new("node"),
        &["--test", "--test-reporter=spec", script.to_str().unwrap()],
    )
    .await;
}

/// What a portal developer writes against the module (`tests/browser/types.ts`) type-checks.
#[tokio::test]
async fn the_client_declarations_type_check_a_portals_use() {
    type_check(&browser_dir().join("types.ts")).await;
}

/// One of every kind of frame the server sends, optional fields present and absent.
fn server_frames() -> Vec<ServerFrame> {
    let (conversation_id, message_id, reply_to) =
        (ConversationId::new(), MessageId::new(), MessageId::new());
    let stored = |role, status, client_message_id, author_id| MessageView {
        seq: 7,
        id: MessageId::new(),
        role,
        content: "text".into(),
        status,
        reply_to: None,
        created_at: Utc::now(),
        author_id,
        client_message_id,
        parent_id: Some(MessageId::new()),
        reply_id: Some(MessageId::new()),
        siblings: Some(vec![MessageId::new()]),
    };
    let chunks = ChunkOf {
        conversation_id,
        message_id,
        reply_to,
    };
    let mut frames = vec![
        ServerFrame::AuthOk {
            conversation_id,
            user_id: UserId::new(),
            last_seq: 3,
            head_id: Some(MessageId::new()),
        },
        ServerFrame::AuthOk {
            conversation_id,
            user_id: UserId::new(),
            last_seq: 0,
            head_id: None,
        },
        ServerFrame::Head {
            conversation_id,
            head_id: Some(message_id),
            reply_id: Some(MessageId::new()),
        },
        ServerFrame::Head {
            conversation_id,
            head_id: Some(message_id),
            reply_id: None,
        },
        ServerFrame::Replay {
            messages: vec![
                stored(
                    MessageRole::User,
                    MessageStatus::Complete,
                    Some(ClientMessageId::new()),
                    Some(UserId::new()),
                ),
                stored(MessageRole::Assistant, MessageStatus::Streaming, None, None),
            ],
            recovered: true,
            more: false,
        },
        ServerFrame::Replay {
            messages: vec![],
            recovered: false,
            more: false,
        },
        ServerFrame::Ack {
            conversation_id,
            message_id,
            client_message_id: Some(ClientMessageId::new()),
            seq: 4,
            parent_id: Some(MessageId::new()),
            reply_id: MessageId::new(),
        },
        ServerFrame::Ack {
            conversation_id,
            message_id,
            client_message_id: None,
            seq: 4,
            parent_id: None,
            reply_id: MessageId::new(),
        },
        ServerFrame::Typing { conversation_id },
        ServerFrame::Response {
            text: Some("whole".into()),
            conversation_id,
            message_id,
            reply_to,
            seq: 5,
            stop_reason: StopReason::End,
            usage: Some(Usage {
                input_tokens: 1,
                output_tokens: 2,
            }),
        },
        ServerFrame::Response {
            text: None,
            conversation_id,
            message_id,
            reply_to,
            seq: 5,
            stop_reason: StopReason::Length,
            usage: None,
        },
        ServerFrame::error(&Error::RateLimited("slow down".into())),
        ServerFrame::refusal(
            &Error::BadRequest("bad".into()),
            Some(ClientMessageId::new()),
        ),
        ServerFrame::Pong,
    ];
    for content in [Some("hi".to_owned()), None] {
        frames.push(ServerFrame::Message {
            conversation_id,
            message_id,
            seq: 6,
            role: MessageRole::User,
            content,
            created_at: Utc::now(),
            client_message_id: None,
            parent_id: Some(MessageId::new()),
            reply_id: MessageId::new(),
        });
    }
    frames.extend(chunks.chunks(0, "from the start", true));
    frames.extend(chunks.chunks(14, " and on", false));
    frames
}

/// Every kind of frame the server sends, serialized by the server's own types, is a
/// `ServerFrame` of the declarations: no field missing from them, none they require absent.
#[tokio::test]
async fn the_client_declarations_accept_every_frame_the_server_sends() {
    let literals: Vec<String> = server_frames()
        .iter()
        .map(|f| serde_json::to_string(f).unwrap())
        .collect();
    let module = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../functions/konstruct-local/static/konstruct-chat.js");
    let file = std::env::temp_dir().join(format!("frames-{}.ts", uuid::Uuid::new_v4().simple()));
    std::fs::write(
        &file,
        format!(
            "import type {{ ServerFrame }} from {module:?};\n\
             // Object literals: a field the declarations lack is an error too.\n\
             export const frames: ServerFrame[] = [\n{}\n];\n",
            literals.join(",\n")
        ),
    )
    .unwrap();
    type_check(&file).await;
    let _ = std::fs::remove_file(&file);
}

fn asyncapi_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/asyncapi.json")
}

/// `docs/asyncapi.json` is the document the frame types make (`make docs` writes it again).
#[test]
fn the_asyncapi_document_is_the_frame_types_own() {
    let built = shared::asyncapi::document();
    if std::env::var_os("KONSTRUCT_WRITE_DOCS").is_some() {
        let text = serde_json::to_string_pretty(&built).unwrap() + "\n";
        std::fs::write(asyncapi_path(), text).unwrap();
    }
    let committed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(asyncapi_path()).expect("docs/asyncapi.json"),
    )
    .unwrap();
    assert!(
        committed == built,
        "docs/asyncapi.json is not what the frame types make: run `make docs` and commit it"
    );
}

/// Every frame the server sends, and every frame a client may send, validates against its own
/// JSON Schema in the AsyncAPI document (Python's `jsonschema`, draft 2020-12); a frame without a
/// required field, or with a wrong type, does not.
#[tokio::test]
async fn every_frame_matches_its_schema_in_the_asyncapi_document() {
    let mut cases: Vec<serde_json::Value> = server_frames()
        .iter()
        .map(|f| {
            let frame = serde_json::to_value(f).unwrap();
            let kind = frame["type"].as_str().unwrap().to_owned();
            json!({ "schema": format!("ServerFrame.{kind}"), "frame": frame, "valid": true })
        })
        .collect();
    let client = [
        json!({"type": "auth", "token": "jwt"}),
        json!({"type": "auth", "token": "jwt", "resume_after": 12}),
        json!({"type": "message", "text": "hi"}),
        json!({"type": "message", "text": "hi", "client_message_id": ClientMessageId::new()}),
        json!({"type": "cancel", "reply_to": MessageId::new()}),
        json!({"type": "ping"}),
    ];
    for frame in client {
        let kind = frame["type"].as_str().unwrap().to_owned();
        cases.push(
            json!({ "schema": format!("ClientFrame.{kind}"), "frame": frame, "valid": true }),
        );
    }
    for (schema, frame) in [
        (
            "ServerFrame.ack",
            json!({"type": "ack", "conversation_id": ConversationId::new()}),
        ),
        (
            "ServerFrame.chunk",
            json!({"type": "chunk", "conversation_id": ConversationId::new(),
            "message_id": MessageId::new(), "reply_to": MessageId::new(), "offset": "0", "delta": ""}),
        ),
        ("ClientFrame.auth", json!({"type": "auth"})),
        ("ClientFrame.message", json!({"type": "message", "text": 5})),
    ] {
        cases.push(json!({ "schema": schema, "frame": frame, "valid": false }));
    }
    let input = json!({ "document": shared::asyncapi::document(), "cases": cases });
    let file = std::env::temp_dir().join(format!("frames-{}.json", uuid::Uuid::new_v4().simple()));
    std::fs::write(&file, input.to_string()).unwrap();
    let python = std::env::var("KONSTRUCT_PYTHON").expect(
        "KONSTRUCT_PYTHON is not set: run the tests through `make test`, which installs jsonschema",
    );
    let script = r##"
import json, sys
from jsonschema import Draft202012Validator
data = json.load(open(sys.argv[1]))
components = data["document"]["components"]
wrong = []
for case in data["cases"]:
    schema = {"$ref": "#/components/schemas/" + case["schema"], "components": components}
    errors = list(Draft202012Validator(schema).iter_errors(case["frame"]))
    if bool(errors) == case["valid"]:
        wrong.append((case["schema"], case["frame"], [e.message for e in errors]))
for w in wrong:
    print("wrong:", json.dumps(w))
sys.exit(1 if wrong else 0)
"##;
    run(Path::new(&python), &["-c", script, file.to_str().unwrap()]).await;
    let _ = std::fs::remove_file(&file);
}
