//! The WebSocket routes as API Gateway invokes them, against real Postgres, moto's SQS and a
//! wire-level connection-management API.

use futures::FutureExt;
use serde_json::{Value, json};
use shared::config::routes::RateLimit;
use shared::delivery::Posted;
use shared::domain::{ClientMessageId, ConnectionId};
use shared::frame::ServerFrame;
use shared::job::Job;
use shared::queue::{JobQueue, RedisQueue};
use shared::ws::Route;

use crate::helpers::aws::{ManagementApi, depth, drain, sdk_config};
use crate::helpers::harness::{Harness, event};
use crate::helpers::harness::{assert_nothing_stored_or_queued, message_frame};

/// The original system's `test_typing_indicator_sent`.
#[tokio::test]
async fn typing_goes_out_before_the_job_is_queued_and_the_message_is_stored_once() {
    let h = Harness::new().await;
    let queue = h.queue.clone();
    h.api.probe_with(move || {
        let queue = queue.clone();
        async move { json!(depth(&queue).await) }.boxed()
    });
    h.open_session("c1").await;

    let ack = h.send("c1", &message_frame("  Hello agent  ")).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["conversation_id"], json!(h.seed.conversation));
    assert_eq!(ack["client_message_id"], Value::Null);

    let posts = h.api.posts();
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert_eq!(posts[0].connection, "c1");
    assert_eq!(
        posts[0].frame,
        json!({ "type": "typing", "conversation_id": h.seed.conversation })
    );
    assert_eq!(
        posts[0].probe,
        json!(0),
        "typing arrived while the queue was still empty"
    );

    let queued = drain(&h.queue).await;
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].group_id, h.seed.conversation.to_string());
    // One job per request: deduplicated on the id its reply will take.
    assert_eq!(queued[0].dedup_id, ack["reply_id"].as_str().unwrap());
    let job: Job = serde_json::from_value(queued[0].body.clone()).unwrap();
    assert_eq!(job.tenant_id, h.seed.tenant);
    assert_eq!(job.portal_user_id, h.seed.user);
    assert_eq!(job.message.content.text, "Hello agent");
    assert_eq!(job.message.thread_id, Some(h.seed.conversation.to_string()));
    assert_eq!(
        job.message_id.to_string(),
        ack["message_id"].as_str().unwrap()
    );
    assert_eq!(h.stored_messages().await, 1);
}

#[tokio::test]
async fn a_repeated_client_message_id_is_stored_and_queued_once_and_acked_twice() {
    let h = Harness::new().await;
    h.open_session("c1").await;
    let id = ClientMessageId::new();
    let frame = json!({ "type": "message", "text": "once", "client_message_id": id }).to_string();
    let first = h.send("c1", &frame).await;
    let second = h.send("c1", &frame).await;
    for ack in [&first, &second] {
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["client_message_id"], json!(id));
    }
    assert_eq!(first["message_id"], second["message_id"]);
    assert_eq!(h.stored_messages().await, 1);
    assert_eq!(drain(&h.queue).await.len(), 1);
}

#[tokio::test]
async fn a_message_before_auth_is_unauthenticated() {
    let h = Harness::new().await;
    h.connect("c1").await;
    let answer = h.send("c1", &message_frame("hi")).await;
    assert_eq!(answer["type"], "error");
    assert_eq!(answer["code"], "unauthenticated");
    let answer = h.send("never-connected", &message_frame("hi")).await;
    assert_eq!(answer["code"], "unauthenticated");
    assert_nothing_stored_or_queued(&h).await;
    assert!(h.api.posts().is_empty(), "no typing for a refused message");
}

#[tokio::test]
async fn bad_frames_get_their_error_and_nothing_is_stored_or_queued() {
    let h = Harness::new().await;
    h.open_session("c1").await;
    let over_length = message_frame(&"x".repeat(8001));
    let over_128k = format!(
        r#"{{"type":"message","text":"{}"}}"#,
        "x".repeat(128 * 1024)
    );
    let cases = [
        ("{not json", "bad_request"),
        ("[]", "bad_request"),
        (r#"{"text":"no type"}"#, "bad_request"),
        (r#"{"type":"shout","text":"x"}"#, "bad_request"),
        (r#"{"type":"message"}"#, "bad_request"),
        (r#"{"type":"message","text":""}"#, "bad_request"),
        (r#"{"type":"message","text":" \n\t "}"#, "bad_request"),
        (
            r#"{"type":"message","text":"x","client_message_id":"nope"}"#,
            "bad_request",
        ),
        (over_length.as_str(), "too_large"),
        (over_128k.as_str(), "too_large"),
    ];
    for (frame, code) in cases {
        let answer = h.send("c1", frame).await;
        assert_eq!(answer["type"], "error", "{}", &frame[..frame.len().min(60)]);
        assert_eq!(answer["code"], code, "{}", &frame[..frame.len().min(60)]);
    }
    assert_nothing_stored_or_queued(&h).await;
    assert!(h.api.posts().is_empty(), "no typing for a refused frame");
    // The socket stays open: a good message still goes through.
    assert_eq!(h.send("c1", &message_frame("fine")).await["type"], "ack");
}

#[tokio::test]
async fn ping_gets_pong_even_before_auth() {
    let h = Harness::new().await;
    h.connect("c1").await;
    assert_eq!(
        h.send("c1", r#"{"type":"ping"}"#).await,
        json!({ "type": "pong" })
    );
}

#[tokio::test]
async fn a_flood_from_one_connection_is_rate_limited() {
    let mut h = Harness::new().await;
    h.state.message.limits.connection = RateLimit {
        messages: 3,
        window_seconds: 60,
    };
    h.open_session("c1").await;
    h.open_session("c2").await;
    for i in 0..3 {
        assert_eq!(
            h.send("c1", &message_frame(&format!("m{i}"))).await["type"],
            "ack"
        );
    }
    let limited = h.send("c1", &message_frame("one too many")).await;
    assert_eq!(limited["code"], "rate_limited");
    assert_eq!(h.stored_messages().await, 3);
    assert_eq!(
        h.send("c2", &message_frame("another socket")).await["type"],
        "ack",
        "others unaffected"
    );
}

#[tokio::test]
async fn disconnect_forgets_the_connection() {
    let h = Harness::new().await;
    h.open_session("c1").await;
    let response = Route::Disconnect
        .handle(&h.state, event("c1", "$disconnect", None, json!(null)))
        .await;
    assert_eq!(response.status_code, 200);
    assert!(h.connection("c1").await.is_none());
    assert_eq!(
        h.send("c1", &message_frame("hi")).await["code"],
        "unauthenticated"
    );
}

#[tokio::test]
async fn a_gone_connection_is_forgotten_and_only_that_one() {
    let h = Harness::new().await;
    h.open_session("stale").await;
    h.open_session("live").await;
    // The browser went away without API Gateway's $disconnect reaching us yet.
    h.api.deletes();
    let stale = ConnectionId::parse("stale").unwrap();
    let live = ConnectionId::parse("live").unwrap();
    reqwest_delete(&h.api, "stale").await;

    let frame = ServerFrame::Typing {
        conversation_id: h.seed.conversation,
    };
    assert_eq!(
        h.state
            .edge()
            .post(&h.api.endpoint, &stale, &frame)
            .await
            .unwrap(),
        Posted::Gone
    );
    assert_eq!(
        h.state
            .edge()
            .post(&h.api.endpoint, &live, &frame)
            .await
            .unwrap(),
        Posted::Delivered
    );
    assert!(
        h.connection("stale").await.is_none(),
        "the stale one is forgotten"
    );
    assert!(h.connection("live").await.is_some(), "the live one stays");

    // The same through the message route: the sender's own stale socket goes, the message stays.
    h.open_session("leaving").await;
    reqwest_delete(&h.api, "leaving").await;
    assert_eq!(
        h.send("leaving", &message_frame("bye")).await["type"],
        "ack"
    );
    assert!(h.connection("leaving").await.is_none());
    assert_eq!(h.stored_messages().await, 1);
}

/// Closes a socket from the outside, as a browser tab would.
async fn reqwest_delete(api: &ManagementApi, connection: &str) {
    let delivery = shared::delivery::ManagementApi::new(sdk_config());
    use shared::delivery::Delivery;
    delivery
        .close(&api.endpoint, &ConnectionId::parse(connection).unwrap())
        .await
        .unwrap();
}

#[tokio::test]
async fn the_redis_queue_keeps_one_job_per_message_in_order() {
    let prefix = crate::helpers::redis_prefix();
    let queue = RedisQueue::new(&std::env::var("REDIS_URL").unwrap(), &prefix).unwrap();
    let h = Harness::new().await;
    h.open_session("c1").await;
    let mut jobs = Vec::new();
    for text in ["one", "two"] {
        h.send("c1", &message_frame(text)).await;
    }
    for q in drain(&h.queue).await {
        jobs.push(serde_json::from_value::<Job>(q.body).unwrap());
    }
    for job in [&jobs[0], &jobs[0], &jobs[1], &jobs[0]] {
        queue.enqueue(job).await.unwrap();
    }
    let mut conn = queue.connection().await.unwrap();
    let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(queue.stream_key())
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let bodies: Vec<Job> = entries
        .ids
        .iter()
        .map(|e| Job::from_body(&e.get::<String>("body").unwrap()).unwrap())
        .collect();
    assert_eq!(bodies, vec![jobs[0].clone(), jobs[1].clone()]);
    assert_eq!(
        entries.ids[0].get::<String>("group").unwrap(),
        h.seed.conversation.to_string()
    );
}
