//! A call of one of the schema's functions, or a scope's setting, as one simple query (no
//! prepare round trip).

use uuid::Uuid;

use crate::domain::{
    AgentId, ClientMessageId, ConnectionId, ConversationId, MessageId, TenantId, UserId,
};

/// Any text as an SQL literal whatever `standard_conforming_strings` says: an escape string
/// (`E'…'`), its backslashes and quotes doubled. A NUL (which no Postgres text can hold) ends
/// a simple query's text early, inside the literal: the statement then fails to parse.
fn escaped(value: &str) -> String {
    format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// A value written into a [`Call`]'s text as an SQL literal.
pub trait Literal {
    fn literal(&self) -> String;
}

impl<T: Literal + ?Sized> Literal for &T {
    fn literal(&self) -> String {
        (**self).literal()
    }
}

impl<T: Literal> Literal for Option<T> {
    fn literal(&self) -> String {
        self.as_ref()
            .map_or_else(|| "null".to_owned(), Literal::literal)
    }
}

/// Text, and the domain's ids (their `Display` is the UUID's), as escaped strings.
macro_rules! escaped_literal {
    ($($type:ty),+) => {
        $(impl Literal for $type {
            fn literal(&self) -> String {
                escaped(&self.to_string())
            }
        })+
    };
}

escaped_literal!(
    str,
    String,
    ConnectionId,
    Uuid,
    TenantId,
    UserId,
    AgentId,
    ConversationId
);
escaped_literal!(MessageId, ClientMessageId);

macro_rules! written_literal {
    ($($type:ty),+) => {
        $(impl Literal for $type {
            fn literal(&self) -> String {
                self.to_string()
            }
        })+
    };
}

written_literal!(i64, i32, bool);

/// A finite number (Rust writes it in full, which Postgres parses exactly).
impl Literal for f64 {
    fn literal(&self) -> String {
        escaped(&self.to_string())
    }
}

/// A call of one of the schema's functions for [`Db::call`](super::Db::call), built by
/// [`call!`](crate::call): `select * from f($1::text, $2::uuid)` with each `$n` replaced by
/// its argument as an SQL literal. The casts stay, so the call resolves to the function the
/// migration declares. The text is the macro's literal, whose only `$` are its parameters.
#[derive(Debug, Clone)]
pub struct Call {
    sql: &'static str,
    arguments: Vec<String>,
}

impl Call {
    pub fn new(sql: &'static str) -> Self {
        Self {
            sql,
            arguments: Vec::new(),
        }
    }

    /// The next parameter's argument.
    pub fn arg(mut self, value: impl Literal) -> Self {
        self.arguments.push(value.literal());
        self
    }

    pub(super) fn sql(&self) -> String {
        let mut sql = String::with_capacity(
            self.sql.len() + self.arguments.iter().map(String::len).sum::<usize>(),
        );
        let mut rest = self.sql;
        while let Some(at) = rest.find('$') {
            sql.push_str(&rest[..at]);
            let digits = rest[at + 1..]
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len() - at - 1);
            let argument = rest[at + 1..at + 1 + digits]
                .parse::<usize>()
                .ok()
                .and_then(|n| self.arguments.get(n.checked_sub(1)?));
            match argument {
                Some(literal) => sql.push_str(literal),
                None => sql.push_str(&rest[at..at + 1 + digits]),
            }
            rest = &rest[at + 1 + digits..];
        }
        sql.push_str(rest);
        sql
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_writes_each_argument_as_a_literal_in_its_parameter_place() {
        let id = Uuid::nil();
        let call = Call::new(
            "select * from f($1::text, $2::uuid, $3::uuid, $4::bigint, $5::text, $6::float8, \
             $7::bool, $8::text, $9::text, $10::bigint)",
        )
        .arg(r"it's a \ back\slash")
        .arg(id)
        .arg(None::<MessageId>)
        .arg(-3)
        .arg(None::<&str>)
        .arg(2.5)
        .arg(true)
        .arg("$1")
        .arg("9")
        .arg(10);
        assert_eq!(
            call.sql(),
            format!(
                "select * from f(E'it''s a \\\\ back\\\\slash'::text, E'{id}'::uuid, null::uuid, \
                 -3::bigint, null::text, E'2.5'::float8, true::bool, E'$1'::text, E'9'::text, \
                 10::bigint)"
            )
        );
    }
}
