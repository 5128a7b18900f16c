//! Hostile input, generated: whatever reaches an edge (frames, API Gateway events, job bodies,
//! tokens, REST paths and queries) ends in a contract error, never a panic or a 5xx; and what is
//! valid survives its round trip (a message frame parses to what was sent, a job's body to the
//! job, a minted token verifies to its claims and not once altered).

use axum::body::Body;
use http::{Request, StatusCode};
use proptest::prelude::*;
use serde_json::json;
use shared::ErrorCode;
use shared::api::{self, ApiState};
use shared::auth::issue_token;
use shared::domain::{ConversationId, MessageId, MessageText, Role, TenantId, UserId};
use shared::frame::ClientFrame;
use shared::job::Job;
use shared::konstruct_message::{WebEvent, normalize_web_event};
use shared::ws::RouteEvent;
use tower::ServiceExt;

use crate::helpers::{TestDb, auth_config, seed, token, verifier};

fn contract_error(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::BadRequest | ErrorCode::TooLarge)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn any_text_as_a_frame_is_parsed_or_refused(raw in "\\PC{0,300}") {
        if let Err(e) = ClientFrame::parse(&raw) {
            prop_assert!(contract_error(e.code()), "{e:?}");
        }
    }

    #[test]
    fn any_fields_in_a_frame_are_parsed_or_refused(
        kind in prop_oneof![Just("auth".to_owned()), Just("message".to_owned()), Just("ping".to_owned()), "\\PC{0,12}"],
        text in proptest::option::of("\\PC{0,40}"),
        padding in 0usize..9000,
        client_id in proptest::option::of(prop_oneof![Just(uuid::Uuid::new_v4().to_string()), "\\PC{0,40}"]),
        token in proptest::option::of("\\PC{0,40}"),
    ) {
        let mut frame = json!({ "type": kind });
        if let Some(text) = &text { frame["text"] = json!(format!("{text}{}", "x".repeat(padding))); }
        if let Some(id) = &client_id { frame["client_message_id"] = json!(id); }
        if let Some(token) = &token { frame["token"] = json!(token); }
        match ClientFrame::parse(&frame.to_string()) {
            Ok(ClientFrame::Message { text, .. }) => {
                let chars = text.as_str().chars().count();
                prop_assert!((1..=8000).contains(&chars));
            }
            Ok(_) => {}
            Err(e) => prop_assert!(contract_error(e.code()), "{e:?}"),
        }
    }

    /// What the route sends the orchestrator is what it receives.
    #[test]
    fn a_job_survives_its_body(
        text in "\\PC{1,300}",
        seconds in 0i64..4_000_000_000,
    ) {
        let Ok(text) = MessageText::parse(&text) else { return Ok(()) };
        let (tenant, conversation, user, message) =
            (TenantId::new(), ConversationId::new(), UserId::new(), MessageId::new());
        let job = Job {
            tenant_id: tenant,
            conversation_id: conversation,
            portal_user_id: user,
            message_id: message,
            reply_id: Some(MessageId::new()),
            message: normalize_web_event(WebEvent {
                tenant_id: tenant,
                conversation_id: conversation,
                portal_user_id: user,
                message_id: message,
                text: &text,
                display_name: None,
                timestamp: chrono::DateTime::from_timestamp(seconds, 0).unwrap(),
            }),
        };
        prop_assert_eq!(Job::from_body(&job.to_body()).unwrap(), job);
    }

    /// A message frame a client may send parses to its text (trimmed) and its id.
    #[test]
    fn a_valid_message_frame_parses_to_what_was_sent(
        text in "[ \t]{0,3}\\PC{1,200}[ \t]{0,3}",
        id in proptest::option::of(any::<u128>()),
    ) {
        let Ok(expected) = MessageText::parse(&text) else { return Ok(()) };
        let id = id.map(|n| uuid::Uuid::from_u128(n).to_string());
        let mut frame = json!({ "type": "message", "text": text });
        if let Some(id) = &id { frame["client_message_id"] = json!(id); }
        match ClientFrame::parse(&frame.to_string()) {
            Ok(ClientFrame::Message { text, client_message_id }) => {
                prop_assert_eq!(text.as_str(), expected.as_str());
                prop_assert_eq!(client_message_id.map(|c| c.to_string()), id);
            }
            other => prop_assert!(false, "{other:?}"),
        }
    }

    /// A token the portal minted verifies to its user and role; one altered character anywhere
    /// in it is refused.
    #[test]
    fn a_minted_token_verifies_to_its_claims_and_not_once_altered(
        admin in any::<bool>(),
        ttl in 60u64..100_000,
        at in any::<prop::sample::Index>(),
        replacement in "[A-Za-z0-9_-]",
    ) {
        let user = UserId::new();
        let role = if admin { Role::PlatformAdmin } else { Role::CustomerOperator };
        let minted = issue_token(&auth_config(), user, role, std::time::Duration::from_secs(ttl)).unwrap();
        let caller = verifier().verify(&minted).unwrap();
        prop_assert_eq!((caller.user_id(), caller.role()), (user, role));
        let position = at.index(minted.len());
        let original = &minted[position..=position];
        prop_assume!(original != "." && original != replacement);
        let altered = format!("{}{replacement}{}", &minted[..position], &minted[position + 1..]);
        prop_assert!(verifier().verify(&altered).is_err(), "{altered}");
    }

    /// Garbage never panics the job parser.
    #[test]
    fn any_job_body_is_parsed_or_refused(raw in "\\PC{0,400}") {
        if let Err(e) = Job::from_body(&raw) {
            prop_assert_eq!(e.code(), ErrorCode::BadRequest);
        }
    }

    #[test]
    fn any_websocket_event_is_parsed_or_refused(
        connection in proptest::option::of("\\PC{0,200}"),
        domain in proptest::option::of("\\PC{0,60}"),
        stage in proptest::option::of("\\PC{0,20}"),
        body in proptest::option::of("\\PC{0,100}"),
        base64 in any::<bool>(),
    ) {
        let raw = json!({
            "requestContext": { "connectionId": connection, "domainName": domain, "stage": stage },
            "body": body,
            "isBase64Encoded": base64,
        });
        if let Ok(event) = serde_json::from_value(raw)
            && let Err(e) = RouteEvent::parse(&event, None)
        {
            prop_assert_eq!(e.code(), ErrorCode::BadRequest);
        }
    }

    #[test]
    fn any_token_is_verified_or_refused(raw in "\\PC{0,2000}") {
        if let Err(e) = verifier().verify(&raw) {
            prop_assert_eq!(e.code(), ErrorCode::Unauthenticated);
        }
    }
}

/// Every byte but unreserved ones percent-encoded: arbitrary text as a path segment or query.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[test]
fn any_rest_path_and_query_gets_a_contract_answer() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (_test, db, bearer) = runtime.block_on(async {
        let (test, db) = TestDb::migrated().await;
        let s = seed(&db, "acme").await;
        let bearer = token(s.user, Role::CustomerOperator);
        (test, db, bearer)
    });
    let router = api::router(ApiState {
        db,
        tokens: verifier(),
        delivery: std::sync::Arc::new(shared::delivery::ManagementApi::new(
            crate::helpers::aws::sdk_config(),
        )),
    });
    proptest!(ProptestConfig::with_cases(200), |(
        segment in "\\PC{0,50}",
        key in prop_oneof![Just("limit".to_owned()), Just("before".to_owned()), Just("tenant_id".to_owned()), "\\PC{0,10}"],
        value in "\\PC{0,50}",
        list in any::<bool>(),
        method in prop_oneof![Just("GET"), Just("DELETE"), Just("POST")],
    )| {
        let uri = if list {
            format!("/api/portal/chat/conversations?{}={}", encode(&key), encode(&value))
        } else {
            format!("/api/portal/chat/conversations/{}/messages?{}={}", encode(&segment), encode(&key), encode(&value))
        };
        let request = Request::builder()
            .method(method)
            .uri(&uri)
            .header("authorization", format!("Bearer {bearer}"))
            .body(Body::empty())
            .unwrap();
        let response = runtime.block_on(router.clone().oneshot(request)).unwrap();
        let status = response.status();
        prop_assert!(!status.is_server_error(), "{method} {uri} → {status}");
        if status != StatusCode::OK && status != StatusCode::NO_CONTENT {
            let body = runtime.block_on(axum::body::to_bytes(response.into_body(), 1 << 20)).unwrap();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            prop_assert!(body["code"].is_string() && body["detail"].is_string(), "{uri}: {body}");
        }
    });
}
