//! Redis key names, all of the form `{tenant_id}:{key_type}:{discriminator}` so that one
//! tenant's keys can be listed, expired or forgotten together.

use crate::domain::{ConversationId, TenantId};

fn tenant_key(tenant_id: TenantId, key_type: &str, discriminator: &str) -> String {
    format!("{tenant_id}:{key_type}:{discriminator}")
}

/// The pub-sub channel on which a conversation's replies are published in local mode; the
/// gateways that hold sockets of that conversation subscribe to it.
pub fn webchat_response_key(tenant_id: TenantId, conversation_id: ConversationId) -> String {
    tenant_key(tenant_id, "webchat:response", &conversation_id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webchat_response_key_format() {
        let tenant: TenantId = "11111111-1111-4111-8111-111111111111".parse().unwrap();
        let conversation: ConversationId = "22222222-2222-4222-8222-222222222222".parse().unwrap();
        assert_eq!(
            webchat_response_key(tenant, conversation),
            "11111111-1111-4111-8111-111111111111:webchat:response:22222222-2222-4222-8222-222222222222"
        );
    }
}
