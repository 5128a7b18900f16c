//! What a transaction may see: the settings row-level security reads, set in the transaction's
//! first round trip, and the advisory locks that order a user's or a conversation's work.

use crate::auth::PlatformAdmin;
use crate::call;
use crate::config::TxTimeouts;
use crate::db::Call;
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
    /// simple query, each checked at build time (`call!`) and its values written in as
    /// literals (a simple query takes no parameters).
    pub(super) fn settings(&self, timeouts: TxTimeouts) -> String {
        let millis = |timeout: std::time::Duration| timeout.as_millis().to_string();
        let mut statements = vec![
            call!(
                "select set_config('lock_timeout', $1::text, true)",
                millis(timeouts.lock)
            ),
            call!(
                "select set_config('statement_timeout', $1::text, true)",
                millis(timeouts.statement)
            ),
        ];
        let set = |name: &str, value: &str| {
            call!("select set_config($1::text, $2::text, true)", name, value)
        };
        match self {
            Self::Tenant(id) => statements.push(set("app.current_tenant", &id.to_string())),
            Self::AllTenants(_) => statements.push(set("app.platform_admin", "on")),
            Self::Conversation(id) => {
                statements.push(set("app.current_conversation", &id.to_string()));
            }
            Self::Connection(id) => statements.push(set("app.current_connection", id.as_str())),
            Self::Unauthenticated => statements.push(set("app.sweep", "on")),
            // The tenant is read from the row the connection key has just made visible: a
            // later statement of the same query sees the earlier one's setting. (Settings are
            // read `missing_ok`, which changes nothing here, since the statement before always
            // sets them, and lets the build-time check describe the statement.)
            Self::BoundConnection(id) => statements.extend([
                set("app.current_connection", id.as_str()),
                call!(
                    "select set_config('app.current_tenant', coalesce(( \
                         select tenant_id::text from ws_connections \
                         where connection_id \
                             = current_setting('app.current_connection', true)), ''), true)"
                ),
                call!(
                    "select pg_advisory_xact_lock($1::int4, hashtext(coalesce(( \
                         select user_id::text from ws_connections \
                         where connection_id \
                             = current_setting('app.current_connection', true)), '')))",
                    USER_LOCKS
                ),
            ]),
            Self::Binding { connection, user } => {
                statements.extend(connecting(connection));
                statements.extend([
                    call!(
                        "select pg_advisory_xact_lock($1::int4, hashtext($2::text))",
                        USER_LOCKS,
                        user.to_string()
                    ),
                    call!(
                        "select pg_advisory_xact_lock($1::int4, \
                             hashtext(current_setting('app.current_conversation', true)))",
                        CONVERSATION_LOCKS
                    ),
                ]);
            }
            Self::CatchingUp(connection) => {
                statements.extend(connecting(connection));
                statements.push(call!(
                    "select 1 as locked from web_conversations \
                     where id = nullif(current_setting('app.current_conversation', true), '')::uuid \
                     for share"
                ));
            }
        }
        statements
            .iter()
            .map(Call::sql)
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// The advisory locks' namespaces (the first key of `pg_advisory_xact_lock(int, int)`).
const USER_LOCKS: i32 = 1;
const CONVERSATION_LOCKS: i32 = 2;

/// The settings that make one connection row, the conversation it named at `$connect`, and
/// that conversation's tenant visible, each setting making the next row visible.
fn connecting(id: &ConnectionId) -> [Call; 3] {
    [
        call!(
            "select set_config('app.current_connection', $1::text, true)",
            id
        ),
        call!(
            "select set_config('app.current_conversation', coalesce(( \
                 select conversation_id::text from ws_connections \
                 where connection_id \
                     = current_setting('app.current_connection', true)), ''), true)"
        ),
        call!(
            "select set_config('app.current_tenant', coalesce(( \
                 select tenant_id::text from web_conversations \
                 where id \
                     = nullif(current_setting('app.current_conversation', true), '')::uuid), ''), \
                 true)"
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_opens_in_one_simple_query_with_its_values_written_in() {
        let tenant = TenantId::new();
        assert_eq!(
            Scope::Tenant(tenant).begin_statement(TxTimeouts::default()),
            format!(
                "begin; select set_config('lock_timeout', E'3000'::text, true); \
                 select set_config('statement_timeout', E'5000'::text, true); \
                 select set_config(E'app.current_tenant'::text, E'{tenant}'::text, true)"
            )
        );
        let id = ConnectionId::parse("L0SM9cOFvHcCIhw=").unwrap();
        let bound = Scope::BoundConnection(&id).begin_statement(TxTimeouts::default());
        assert!(bound.contains(
            "; select set_config(E'app.current_connection'::text, E'L0SM9cOFvHcCIhw='::text, \
             true); "
        ));
        assert!(bound.contains("set_config('app.current_tenant'"));
        assert!(bound.contains("pg_advisory_xact_lock(1::int4,"));
    }
}
