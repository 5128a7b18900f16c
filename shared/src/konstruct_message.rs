//! The platform's channel-neutral message model, as in the original system, and the web
//! channel's normalizer into it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::domain::{ConversationId, MessageId, MessageText, TenantId, UserId};

/// The channels a message can come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelType {
    Slack,
    Whatsapp,
    Mattermost,
    Rocketchat,
    Teams,
    Telegram,
    Signal,
    Web,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SenderInfo {
    pub user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default)]
    pub is_bot: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageContent {
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    #[serde(default)]
    pub attachments: Vec<Value>,
    #[serde(default)]
    pub mentions: Vec<String>,
}

/// One inbound message, whatever its channel. Ids are strings because other channels' ids are
/// not UUIDs; `thread_id` scopes the agent's memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KonstructMessage {
    pub id: String,
    pub tenant_id: Option<String>,
    pub channel: ChannelType,
    #[serde(default)]
    pub channel_metadata: Map<String, Value>,
    pub sender: SenderInfo,
    pub content: MessageContent,
    pub timestamp: DateTime<Utc>,
    #[serde(default)]
    pub thread_id: Option<String>,
    #[serde(default)]
    pub reply_to: Option<String>,
    #[serde(default)]
    pub context: Map<String, Value>,
}

/// A user message accepted on the web channel, already checked and stored.
#[derive(Debug, Clone)]
pub struct WebEvent<'a> {
    pub tenant_id: TenantId,
    pub conversation_id: ConversationId,
    pub portal_user_id: UserId,
    /// The stored user message's id.
    pub message_id: MessageId,
    pub text: &'a MessageText,
    pub display_name: Option<String>,
    pub timestamp: DateTime<Utc>,
}

/// Turns a web chat message into the platform's message: channel `web`, the conversation as the
/// thread (so the agent's memory is per conversation), the portal user as the sender, and the
/// ids a reply needs to find its way back in `channel_metadata`.
pub fn normalize_web_event(event: WebEvent<'_>) -> KonstructMessage {
    let channel_metadata = json!({
        "portal_user_id": event.portal_user_id,
        "tenant_id": event.tenant_id,
        "conversation_id": event.conversation_id,
    });
    let Value::Object(channel_metadata) = channel_metadata else {
        unreachable!("json! of an object literal is an object")
    };
    KonstructMessage {
        id: event.message_id.to_string(),
        tenant_id: Some(event.tenant_id.to_string()),
        channel: ChannelType::Web,
        channel_metadata,
        sender: SenderInfo {
            user_id: event.portal_user_id.to_string(),
            display_name: event.display_name,
            is_bot: false,
        },
        content: MessageContent {
            text: event.text.as_str().to_owned(),
            html: None,
            attachments: Vec::new(),
            mentions: Vec::new(),
        },
        timestamp: event.timestamp,
        thread_id: Some(event.conversation_id.to_string()),
        reply_to: None,
        context: Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_normalize_web_event() {
        let tenant_id = TenantId::new();
        let conversation_id = ConversationId::new();
        let portal_user_id = UserId::new();
        let message_id = MessageId::new();
        let text = MessageText::parse("  Hello agent  ").unwrap();
        let timestamp = Utc::now();

        let msg = normalize_web_event(WebEvent {
            tenant_id,
            conversation_id,
            portal_user_id,
            message_id,
            text: &text,
            display_name: Some("Ada".into()),
            timestamp,
        });

        assert_eq!(msg.channel, ChannelType::Web);
        assert_eq!(msg.id, message_id.to_string());
        assert_eq!(msg.tenant_id, Some(tenant_id.to_string()));
        assert_eq!(msg.thread_id, Some(conversation_id.to_string()));
        assert_eq!(msg.sender.user_id, portal_user_id.to_string());
        assert_eq!(msg.sender.display_name.as_deref(), Some("Ada"));
        assert!(!msg.sender.is_bot);
        assert_eq!(msg.content.text, "Hello agent");
        assert_eq!(msg.timestamp, timestamp);
        assert_eq!(msg.reply_to, None);
        assert_eq!(
            Value::Object(msg.channel_metadata.clone()),
            json!({
                "portal_user_id": portal_user_id.to_string(),
                "tenant_id": tenant_id.to_string(),
                "conversation_id": conversation_id.to_string(),
            })
        );

        let wire = serde_json::to_value(&msg).unwrap();
        assert_eq!(wire["channel"], "web");
        let back: KonstructMessage = serde_json::from_value(wire).unwrap();
        assert_eq!(back, msg);
    }
}
