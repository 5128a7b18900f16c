//! SQL the compiler checks.
//!
//! Every statement is written once, as a literal, through [`checked!`](crate::checked) or
//! [`call!`](crate::call), or, when it is long, in a `.sql` file beside its module, through
//! [`checked_file!`](crate::checked_file). At build time sqlx's `query!` describes it to the
//! schema the migrations build (from `shared/.sqlx`, the committed offline cache; `make sqlx-prepare`
//! writes it, `make sqlx-check` in CI fails when it is stale): a table, column or function that
//! is not there, a syntax error, a wrong number of arguments, or an argument of the wrong type
//! fails the build. At run time the same text runs, decoded by the row types' `FromRow`.
//!
//! Why the check does not also run the statement: `query!` returns a `Map` whose statement is
//! always prepared under a name, which a pooler that multiplexes transactions cannot carry
//! (see [`super::query`]; sqlx has no switch for it), and the message path's steps are simple
//! queries with their arguments written in ([`super::Call`]), which `query!` cannot send.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::db::agents::Provider;
use crate::domain::{
    AgentId, ClientMessageId, ConnectionId, ConversationId, MessageId, Role, TenantId, TenantRole,
    UserId,
};

/// What an argument is to sqlx's build-time check: the Rust type sqlx expects for its SQL type
/// (a domain id is a `uuid`, a role `text`).
pub trait Checked {
    type As;
}

/// An argument as the check sees it. Only named inside the check, which never runs.
pub fn checked<T: Checked>(_: &T) -> T::As {
    unreachable!("named only by sqlx's build-time check, which never runs")
}

impl<T: Checked + ?Sized> Checked for &T {
    type As = T::As;
}

impl<T: Checked> Checked for Option<T> {
    type As = Option<T::As>;
}

macro_rules! checked_as {
    ($as:ty: $($type:ty),+) => {
        $(impl Checked for $type {
            type As = $as;
        })+
    };
}

checked_as!(Uuid: Uuid, TenantId, UserId, AgentId, ConversationId, MessageId, ClientMessageId);
checked_as!(String: str, String, ConnectionId, Role, TenantRole, Provider);
checked_as!(i64: i64);
checked_as!(i32: i32);
checked_as!(f64: f64);
checked_as!(bool: bool);
checked_as!(DateTime<Utc>: DateTime<Utc>);
checked_as!(Value: Value);
checked_as!(&'static [Uuid]: Vec<Uuid>);

/// sqlx's build-time check of a statement (or of a file's, `file "path"`), in code that never
/// runs: what [`checked!`], [`checked_file!`] and [`call!`] share.
#[doc(hidden)]
#[macro_export]
macro_rules! check_sql {
    ([$($sql:tt)+] $(, $arg:expr)*) => {
        #[allow(unreachable_code, clippy::diverging_sub_expression)]
        if false {
            let _ = ::sqlx::query!($($sql)+ $(, $crate::db::checked::checked(&($arg)))*);
        }
    };
    (file $path:literal $(, $arg:expr)*) => {
        #[allow(unreachable_code, clippy::diverging_sub_expression)]
        if false {
            let _ = ::sqlx::query_file!($path $(, $crate::db::checked::checked(&($arg)))*);
        }
    };
}

/// A statement of one literal, checked at build time (see the module), as one of
/// [`super::query`], [`super::query_as`] or [`super::query_scalar`] with its arguments bound:
/// `checked!(query_as, "select * from tenants where id = $1", id)`. A statement written in
/// pieces gives them in brackets; the pieces are joined as they are.
#[macro_export]
macro_rules! checked {
    ($kind:ident $(::<$out:ty>)?, [$sql:tt $(, $more:tt)*] $(, $arg:expr)* $(,)?) => {{
        $crate::check_sql!([$sql $(+ $more)*] $(, $arg)*);
        $crate::db::$kind$(::<$out>)?(concat!($sql $(, $more)*))$(.bind($arg))*
    }};
    ($kind:ident $(::<$out:ty>)?, $sql:tt $(, $arg:expr)* $(,)?) => {
        $crate::checked!($kind$(::<$out>)?, [$sql] $(, $arg)*)
    };
}

/// A statement long enough for a file of its own, beside its module, checked as
/// [`checked!`]'s are (sqlx's `query_file!`) and compiled in: `checked_file!(query_as,
/// "src/db/message_path/bind.sql", connection, user)`, the path from the crate's root.
#[macro_export]
macro_rules! checked_file {
    ($kind:ident $(::<$out:ty>)?, $path:literal $(, $arg:expr)* $(,)?) => {{
        $crate::check_sql!(file $path $(, $arg)*);
        $crate::db::$kind$(::<$out>)?(include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/", $path)))
            $(.bind($arg))*
    }};
}

/// A call of one of the schema's functions for [`Db::call`](super::Db::call), checked at build
/// time (see the module): `call!("select * from f($1::text, $2::uuid)", name, id)`. Each
/// parameter is cast to its type in the text, so the call resolves to the function the
/// migration declares; at run time each is replaced by its argument written as an SQL literal.
#[macro_export]
macro_rules! call {
    ($sql:literal $(, $arg:expr)* $(,)?) => {{
        $crate::check_sql!([$sql] $(, $arg)*);
        $crate::db::Call::new($sql)$(.arg($arg))*
    }};
}
