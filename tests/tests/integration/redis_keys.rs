use futures::StreamExt;
use redis::AsyncCommands;
use shared::domain::{ConversationId, TenantId};
use shared::redis_keys::webchat_response_key;

use crate::helpers::{redis, redis_client, redis_prefix};

#[test]
fn webchat_response_key_follows_the_tenant_pattern() {
    let tenant = TenantId::new();
    let conversation = ConversationId::new();
    let key = webchat_response_key(tenant, conversation);
    assert_eq!(key, format!("{tenant}:webchat:response:{conversation}"));
    assert_ne!(
        webchat_response_key(TenantId::new(), conversation),
        key,
        "another tenant never shares the channel"
    );
}

#[tokio::test]
async fn a_subscriber_on_the_response_key_receives_what_is_published() {
    let (tenant, conversation) = (TenantId::new(), ConversationId::new());
    let channel = webchat_response_key(tenant, conversation);
    let mut pubsub = redis_client().get_async_pubsub().await.unwrap();
    pubsub.subscribe(&channel).await.unwrap();
    let other = webchat_response_key(TenantId::new(), conversation);

    let mut conn = redis().await;
    let _: i64 = conn.publish(&other, "not for us").await.unwrap();
    let receivers: i64 = conn
        .publish(&channel, r#"{"type":"response"}"#)
        .await
        .unwrap();
    assert_eq!(receivers, 1);

    let message = pubsub.on_message().next().await.unwrap();
    assert_eq!(message.get_channel_name(), channel);
    assert_eq!(
        message.get_payload::<String>().unwrap(),
        r#"{"type":"response"}"#
    );
}

#[tokio::test]
async fn prefixes_keep_tests_apart() {
    let mut conn = redis().await;
    let (a, b) = (redis_prefix(), redis_prefix());
    let _: () = conn.set(format!("{a}probe"), "a").await.unwrap();
    let seen: Option<String> = conn.get(format!("{b}probe")).await.unwrap();
    assert_eq!(seen, None);
}
