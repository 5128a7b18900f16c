//! Every event fixture under `tests/fixtures/events/ws-*` is parsed by the route handler it is
//! meant for, in the order a socket's life would send them. The fixtures name fixed ids and
//! carry tokens signed with the development secret, so `cargo lambda invoke ws-… --data-file`
//! works against a database seeded the same way.

use aws_lambda_events::apigw::ApiGatewayWebsocketProxyRequest;
use shared::db::Scope;
use shared::ws::Route;

use crate::helpers::fixtures::{AGENT, TENANT, USER, fixture_verifier, seed_fixture_ids};
use crate::helpers::harness::{Harness, frame_of};

const CONNECTION: &str = "L0SM9cOFvHcCIhw=";
const CONVERSATION: &str = "c2f6a1de-4b7e-4f0a-9c3d-5e8b1a2d3f04";

enum Expect {
    /// The route answers with this status and no frame.
    Status(i64),
    /// The route answers with this status and an `error` frame of this code.
    Refused(i64, &'static str),
    /// The route answers with a frame of this type (and, for `error`, this code).
    Frame(&'static str, Option<&'static str>),
    /// The error went to the socket, which was then closed.
    Closed(&'static str),
}

const SEQUENCE: [(&str, Route, Expect); 11] = [
    (
        "ws-connect/connect-missing-conversation.json",
        Route::Connect,
        Expect::Refused(400, "bad_request"),
    ),
    (
        "ws-connect/connect-malformed-conversation.json",
        Route::Connect,
        Expect::Refused(400, "bad_request"),
    ),
    (
        "ws-connect/connect.json",
        Route::Connect,
        Expect::Status(200),
    ),
    (
        "ws-message/message.json",
        Route::Message,
        Expect::Frame("error", Some("unauthenticated")),
    ),
    (
        "ws-auth/auth-expired.json",
        Route::Auth,
        Expect::Closed("unauthenticated"),
    ),
    (
        "ws-auth/auth.json",
        Route::Auth,
        Expect::Frame("auth_ok", None),
    ),
    (
        "ws-message/ping.json",
        Route::Message,
        Expect::Frame("pong", None),
    ),
    (
        "ws-message/message.json",
        Route::Message,
        Expect::Frame("ack", None),
    ),
    (
        "ws-message/message-empty.json",
        Route::Message,
        Expect::Frame("error", Some("bad_request")),
    ),
    (
        "ws-message/message-malformed.json",
        Route::Message,
        Expect::Frame("error", Some("bad_request")),
    ),
    (
        "ws-message/unknown-type.json",
        Route::Message,
        Expect::Frame("error", Some("bad_request")),
    ),
];

fn fixture(path: &str) -> ApiGatewayWebsocketProxyRequest {
    let full = format!("{}/fixtures/events/{path}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&full).unwrap())
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[tokio::test]
async fn every_ws_fixture_is_handled_by_its_route() {
    let mut h = Harness::new().await;
    h.state.auth.tokens = fixture_verifier();
    seed_fixture_ids(&h.db).await;
    let mut tx =
        h.db.begin(Scope::Tenant(TENANT.parse().unwrap()))
            .await
            .unwrap();
    sqlx::query(
        "insert into web_conversations (id, tenant_id, agent_id, user_id)
         values ($1::uuid, $2::uuid, $3::uuid, $4::uuid)",
    )
    .bind(CONVERSATION)
    .bind(TENANT)
    .bind(AGENT)
    .bind(USER)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    h.api.open(CONNECTION);

    let mut covered = std::collections::HashSet::new();
    for (path, route, expect) in SEQUENCE {
        covered.insert(path);
        let response = route.handle(&h.state, fixture(path)).await;
        let frame = frame_of(&response);
        match expect {
            Expect::Status(status) => {
                assert_eq!(response.status_code, status, "{path}");
                assert_eq!(frame, None, "{path}");
            }
            Expect::Refused(status, code) => {
                assert_eq!(response.status_code, status, "{path}");
                assert_eq!(frame.unwrap()["code"], code, "{path}");
            }
            Expect::Frame(kind, code) => {
                let frame = frame.unwrap_or_else(|| panic!("{path}: no frame"));
                assert_eq!(frame["type"], kind, "{path}: {frame}");
                if let Some(code) = code {
                    assert_eq!(frame["code"], code, "{path}: {frame}");
                }
            }
            Expect::Closed(code) => {
                assert_eq!(frame, None, "{path}");
                let sent = h.api.frames_to(CONNECTION);
                assert_eq!(sent.last().unwrap()["code"], code, "{path}");
                assert!(h.api.deletes().contains(&CONNECTION.to_owned()), "{path}");
                // The browser would reconnect; reopen the socket for the rest of the sequence.
                h.api.open(CONNECTION);
            }
        }
    }
    let response = Route::Disconnect
        .handle(&h.state, fixture("ws-disconnect/disconnect.json"))
        .await;
    assert_eq!(response.status_code, 200);
    assert!(h.connection(CONNECTION).await.is_none());
    covered.insert("ws-disconnect/disconnect.json");

    let root = format!("{}/fixtures/events", env!("CARGO_MANIFEST_DIR"));
    for dir in ["ws-connect", "ws-auth", "ws-message", "ws-disconnect"] {
        for entry in std::fs::read_dir(format!("{root}/{dir}")).unwrap() {
            let name = format!("{dir}/{}", entry.unwrap().file_name().to_string_lossy());
            assert!(covered.contains(name.as_str()), "{name} is not exercised");
        }
    }
}
