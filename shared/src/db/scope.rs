//! What a transaction may see: the settings row-level security reads, set in the transaction's
//! first round trip, and the advisory locks that order a user's or a conversation's work.

use crate::auth::PlatformAdmin;
use crate::config::TxTimeouts;
use crate::domain::{ConnectionId, ConversationId, TenantId, UserId};

/// What a transaction may see. Each variant sets one setting that the row-level security
/// policies read.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// One tenant's rows: the scope of almost all work.
    Tenant(TenantId),
    /// Every tenant's rows, read-only; only for a verified platform admin.
    AllTenants(PlatformAdmin),
    /// Exactly one conversation row, to learn its tenant before checking access to it.
    Conversation(ConversationId),
    /// Exactly one WebSocket connection row, which the route Lambdas find by the id API
    /// Gateway gives them.
    Connection(&'a ConnectionId),
    /// One connection row and the tenant it is bound to (none before `auth`): what the message
    /// route needs to check the socket, count it and store its message in one transaction.
    /// The user's other such transactions wait for this one (an advisory lock taken in the
    /// `BEGIN` round trip, before the first statement's snapshot), so the per-user limit
    /// counts every message committed before and holds under concurrency.
    BoundConnection(&'a ConnectionId),
    /// One connection row, the conversation it named at `$connect`, and that conversation's
    /// tenant: what `auth` needs to check the caller and bind the socket in one transaction.
    /// The user's other binds and the conversation's wait for this one, as for
    /// `BoundConnection`, so the caps on open sockets hold under concurrency.
    Binding {
        connection: &'a ConnectionId,
        user: UserId,
    },
    /// `Binding`'s rows, with the conversation locked `for share` before the first statement:
    /// what `auth` reads to catch a socket up, knowing no writer of the conversation is
    /// between storing a message and listing its recipients.
    CatchingUp(&'a ConnectionId),
    /// The connection rows that never authenticated (they carry no tenant), to read and
    /// delete, and the replies still `streaming` of every tenant, to read: the sweeper's
    /// scope, and nothing else.
    Unauthenticated,
}

impl Scope<'_> {
    /// The statements that open a transaction in this scope, sent as one simple query: one
    /// round trip for `BEGIN` and the settings together.
    pub(super) fn begin_statement(&self, timeouts: TxTimeouts) -> String {
        format!("begin; {}", self.settings(timeouts))
    }

    /// The transaction's timeouts and this scope's settings (and locks), as statements of a
    /// simple query. Values are quoted literals (a simple query takes no parameters); every one
    /// of them is a parsed UUID or connection id.
    pub(super) fn settings(&self, timeouts: TxTimeouts) -> String {
        let set = |name: &str, value: &str| {
            format!("select set_config('{name}', {}, true)", literal(value))
        };
        let setting = match self {
            Self::Tenant(id) => set("app.current_tenant", &id.to_string()),
            Self::AllTenants(_) => set("app.platform_admin", "on"),
            Self::Conversation(id) => set("app.current_conversation", &id.to_string()),
            Self::Connection(id) => set("app.current_connection", id.as_str()),
            Self::Unauthenticated => set("app.sweep", "on"),
            // The tenant is read from the row the connection key has just made visible: a
            // later statement of the same query sees the earlier one's setting.
            Self::BoundConnection(id) => format!(
                "{}; select set_config('app.current_tenant', coalesce((\
                     select tenant_id::text from ws_connections \
                     where connection_id = current_setting('app.current_connection')), ''), true); \
                 select pg_advisory_xact_lock({USER_LOCKS}, hashtext(coalesce((\
                     select user_id::text from ws_connections \
                     where connection_id = current_setting('app.current_connection')), '')))",
                set("app.current_connection", id.as_str())
            ),
            Self::Binding { connection, user } => format!(
                "{}; select pg_advisory_xact_lock({USER_LOCKS}, hashtext({})); \
                 select pg_advisory_xact_lock({CONVERSATION_LOCKS}, \
                     hashtext(current_setting('app.current_conversation')))",
                connecting(connection),
                literal(&user.to_string())
            ),
            Self::CatchingUp(connection) => format!(
                "{}; select 1 from web_conversations \
                     where id = nullif(current_setting('app.current_conversation'), '')::uuid \
                     for share",
                connecting(connection)
            ),
        };
        format!(
            "set local lock_timeout = {}; set local statement_timeout = {}; {setting}",
            timeouts.lock.as_millis(),
            timeouts.statement.as_millis()
        )
    }
}

/// The advisory locks' namespaces (the first key of `pg_advisory_xact_lock(int, int)`).
const USER_LOCKS: i32 = 1;
const CONVERSATION_LOCKS: i32 = 2;

/// The settings that make one connection row, the conversation it named at `$connect`, and
/// that conversation's tenant visible, each setting making the next row visible.
fn connecting(id: &ConnectionId) -> String {
    format!(
        "select set_config('app.current_connection', {}, true); \
         select set_config('app.current_conversation', coalesce((\
             select conversation_id::text from ws_connections \
             where connection_id = current_setting('app.current_connection')), ''), true); \
         select set_config('app.current_tenant', coalesce((\
             select tenant_id::text from web_conversations \
             where id = nullif(current_setting('app.current_conversation'), '')::uuid), ''), \
             true)",
        literal(id.as_str())
    )
}

/// A string as an SQL literal (`standard_conforming_strings` is on, as it is by default).
fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_opens_in_one_simple_query_with_quoted_values() {
        let tenant = TenantId::new();
        assert_eq!(
            Scope::Tenant(tenant).begin_statement(TxTimeouts::default()),
            format!(
                "begin; set local lock_timeout = 3000; set local statement_timeout = 5000; \
                 select set_config('app.current_tenant', '{tenant}', true)"
            )
        );
        let id = ConnectionId::parse("L0SM9cOFvHcCIhw=").unwrap();
        let bound = Scope::BoundConnection(&id).begin_statement(TxTimeouts::default());
        assert!(
            bound.contains(
                "; select set_config('app.current_connection', 'L0SM9cOFvHcCIhw=', true); "
            )
        );
        assert!(bound.contains("set_config('app.current_tenant'"));
        assert_eq!(literal("it's"), "'it''s'");
    }
}
