//! The REST API's message history (PROTOCOL §3): pages, `seq`, `status` and `after_seq`.

use http::{Method, StatusCode};
use serde_json::{Value, json};
use shared::domain::Role;

use crate::helpers::rest::{Response, add_messages, assert_error, call, history_uri};
use crate::helpers::{TestDb, seed, token};

/// The original system's `test_list_conversation_history`.
#[tokio::test]
async fn history_pages_oldest_first_with_a_cursor() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let texts: Vec<String> = (0..7).map(|i| format!("message {i}")).collect();
    let ids = add_messages(
        &db,
        &s,
        &texts.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let t = token(s.user, Role::CustomerOperator);
    let get = |query: String| {
        let db = db.clone();
        let t = t.clone();
        async move {
            call(
                &db,
                Method::GET,
                &history_uri(s.conversation, &query),
                Some(&t),
                None,
            )
            .await
        }
    };
    let ids_of = |r: &Response| -> Vec<String> {
        r.body
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };

    let all = get(String::new()).await;
    assert_eq!(all.status, StatusCode::OK);
    assert_eq!(ids_of(&all), ids, "ascending created_at");
    let first = &all.body[0];
    assert_eq!(first["role"], "user");
    assert_eq!(first["content"], "message 0");
    assert!(first["created_at"].is_string());

    let newest = get("?limit=3".into()).await;
    assert_eq!(ids_of(&newest), ids[4..7]);
    let older = get(format!("?limit=3&before={}", ids[4])).await;
    assert_eq!(ids_of(&older), ids[1..4]);
    let rest = get(format!("?limit=3&before={}", ids[1])).await;
    assert_eq!(ids_of(&rest), ids[0..1]);

    for bad in [
        "?limit=0",
        "?limit=1000",
        "?limit=-1",
        "?limit=ten",
        "?before=nope",
    ] {
        let response = get(bad.into()).await;
        assert_error(&response, StatusCode::BAD_REQUEST, "bad_request");
    }
    let response = get(format!("?before={}", uuid::Uuid::new_v4())).await;
    assert_error(&response, StatusCode::BAD_REQUEST, "bad_request");
}

/// History by `seq`: each message carries it with its status; `after_seq` catches up from a
/// `seq`, and a bad one or one beside `before` is a 400.
#[tokio::test]
async fn history_carries_seq_and_status_and_catches_up_after_a_seq() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let ids = add_messages(&db, &s, &["one", "two", "three", "four", "five"]).await;
    let t = token(s.user, Role::CustomerOperator);
    let history = |query: String| {
        let uri = history_uri(s.conversation, &query);
        let (db, t) = (db.clone(), t.clone());
        async move { call(&db, Method::GET, &uri, Some(&t), None).await }
    };
    let field = |r: &Response, name: &str| -> Vec<Value> {
        r.body
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m[name].clone())
            .collect()
    };

    let all = history(String::new()).await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.body);
    assert_eq!(field(&all, "seq"), [1, 2, 3, 4, 5].map(|n| json!(n)));
    assert!(field(&all, "status").iter().all(|s| s == "complete"));
    assert!(field(&all, "reply_to").iter().all(Value::is_null));

    let after = history("?after_seq=2&limit=2".into()).await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.body);
    assert_eq!(
        field(&after, "content"),
        [json!("three"), json!("four")],
        "just after seq 2"
    );

    for query in [
        "?after_seq=-1".to_owned(),
        "?after_seq=x".to_owned(),
        format!("?after_seq=1&before={}", ids[3]),
    ] {
        assert_error(
            &history(query).await,
            StatusCode::BAD_REQUEST,
            "bad_request",
        );
    }
}

/// 200 long messages (8,000 four-byte characters each: 6.4 MB) would pass Lambda's 6 MB
/// response limit in one page: a page is cut by bytes too, and its cursor stays exact, so
/// paging back with `before` (or forward with `after_seq`) reads every message once, in order.
#[tokio::test]
async fn a_page_of_long_messages_is_cut_by_size_and_the_cursor_stays_exact() {
    let (_test, db) = TestDb::migrated().await;
    let s = seed(&db, "acme").await;
    let texts: Vec<String> = (0..200)
        .map(|i| format!("{i:04}{}", "😀".repeat(7_996)))
        .collect();
    let ids = add_messages(
        &db,
        &s,
        &texts.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let t = token(s.user, Role::CustomerOperator);
    let get = |query: String| {
        let (db, t) = (db.clone(), t.clone());
        async move {
            let response = call(
                &db,
                Method::GET,
                &history_uri(s.conversation, &query),
                Some(&t),
                None,
            )
            .await;
            assert_eq!(response.status, StatusCode::OK);
            assert!(response.body.to_string().len() < 6_000_000);
            response.body.as_array().unwrap().clone()
        }
    };

    let mut back: Vec<String> = Vec::new();
    let mut query = "?limit=200".to_owned();
    let mut pages = 0;
    loop {
        let page = get(query).await;
        assert!(!page.is_empty(), "a page holds a message at least");
        pages += 1;
        let page_ids: Vec<String> = page
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect();
        query = format!("?limit=200&before={}", page_ids[0]);
        back.splice(0..0, page_ids);
        if back.len() >= ids.len() || pages > 50 {
            break;
        }
    }
    assert!(pages > 1, "the first page was cut");
    assert_eq!(back, ids, "every message once, in order, paging back");

    let mut forward: Vec<String> = Vec::new();
    let mut after = 0;
    while forward.len() < ids.len() {
        let page = get(format!("?limit=200&after_seq={after}")).await;
        assert!(!page.is_empty());
        after = page.last().unwrap()["seq"].as_i64().unwrap();
        forward.extend(page.iter().map(|m| m["id"].as_str().unwrap().to_owned()));
    }
    assert_eq!(forward, ids, "and paging forward");
}
