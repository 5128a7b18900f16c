//! What the functions' role may do to each table: what the code does, no more
//! (`migrations/20261203000011_runtime_grants.up.sql`). A test compares the database's grants
//! with this list; a statement that needs more fails there first.

/// Each table, with the operations the runtime role is granted on it.
pub const RUNTIME_GRANTS: &[(&str, &[&str])] = &[
    // The portal's tables: read to authorize and to answer.
    ("agents", &["SELECT"]),
    ("channel_connections", &["SELECT"]),
    ("portal_users", &["SELECT"]),
    ("tenants", &["SELECT"]),
    ("user_tenant_roles", &["SELECT"]),
    // Conversations are created (get-or-create) and touched (`updated_at`, `head_id`, `last_seq`).
    ("web_conversations", &["INSERT", "SELECT", "UPDATE"]),
    // Messages are stored, updated as replies stream, deleted by a reset.
    (
        "web_conversation_messages",
        &["DELETE", "INSERT", "SELECT", "UPDATE"],
    ),
    // `auth` frames counted per user.
    ("user_auth_windows", &["INSERT", "SELECT", "UPDATE"]),
    // Sockets are recorded, bound, counted and forgotten.
    ("ws_connections", &["DELETE", "INSERT", "SELECT", "UPDATE"]),
];
