//! Domain types, parsed once at the edge: what passes the parser is valid everywhere inside.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Error;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
            sqlx::Type, utoipa::ToSchema,
        )]
        #[serde(transparent)]
        #[sqlx(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh, time-ordered id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }

        impl FromStr for $name {
            type Err = Error;

            fn from_str(s: &str) -> Result<Self, Error> {
                Uuid::try_parse(s)
                    .map(Self)
                    .map_err(|_| Error::BadRequest(concat!($what, " must be a UUID").to_owned()))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

uuid_id!(TenantId, "tenant_id");
uuid_id!(
    /// A portal user (`portal_users.id`, the token's `sub`).
    UserId,
    "user_id"
);
uuid_id!(AgentId, "agent_id");
uuid_id!(ConversationId, "conversation_id");
uuid_id!(
    /// A stored message (`web_conversation_messages.id`).
    MessageId,
    "message_id"
);
uuid_id!(
    /// The browser's own id for a user message, which makes a repeated frame idempotent.
    ClientMessageId,
    "client_message_id"
);

/// The roles a portal token may carry (PROTOCOL §1).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum Role {
    PlatformAdmin,
    CustomerAdmin,
    CustomerOperator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PlatformAdmin => "platform_admin",
            Self::CustomerAdmin => "customer_admin",
            Self::CustomerOperator => "customer_operator",
        }
    }
}

impl FromStr for Role {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "platform_admin" => Ok(Self::PlatformAdmin),
            "customer_admin" => Ok(Self::CustomerAdmin),
            "customer_operator" => Ok(Self::CustomerOperator),
            other => Err(Error::BadRequest(format!("unknown role `{other}`"))),
        }
    }
}

/// A user's role inside one tenant (`user_tenant_roles.role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum TenantRole {
    CustomerAdmin,
    CustomerOperator,
}

/// An API Gateway WebSocket connection id (for example `L0SM9cOFvHcCIhw=`), or the local
/// gateway's equivalent. It is used in URLs of the connection-management API, so only URL-safe
/// characters of API Gateway's alphabet are accepted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[serde(try_from = "String", into = "String")]
#[sqlx(transparent)]
pub struct ConnectionId(String);

impl ConnectionId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(raw: &str) -> Result<Self, Error> {
        let valid = !raw.is_empty()
            && raw.len() <= Self::MAX_LEN
            && raw.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'=' | b'+' | b'/' | b'_' | b'-')
            });
        if valid {
            Ok(Self(raw.to_owned()))
        } else {
            Err(Error::BadRequest("malformed connection id".to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ConnectionId {
    type Error = Error;

    fn try_from(raw: String) -> Result<Self, Error> {
        Self::parse(&raw)
    }
}

impl From<ConnectionId> for String {
    fn from(id: ConnectionId) -> Self {
        id.0
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The text of a user message: trimmed, 1..=8000 characters (PROTOCOL §2), storable, and
/// showing something.
///
/// - U+0000 is refused: Postgres `text` cannot hold it (every other character can; JSON cannot
///   carry a lone surrogate, and Rust strings hold none).
/// - Text made only of whitespace and default-ignorable characters (zero-width spaces and
///   joiners, the word joiner, the byte order mark, bidi and other format controls, variation
///   selectors, …) shows nothing, and counts as empty.
/// - Everything else is kept byte for byte: emoji, combining marks, right-to-left marks inside
///   visible text, control characters other than NUL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageText(String);

impl MessageText {
    pub const MAX_CHARS: usize = 8000;

    pub fn parse(raw: &str) -> Result<Self, Error> {
        let text = raw.trim();
        if text.contains('\0') {
            return Err(Error::BadRequest(
                "text must not contain the NUL character (U+0000)".to_owned(),
            ));
        }
        if text
            .chars()
            .all(|c| c.is_whitespace() || is_default_ignorable(c))
        {
            return Err(Error::BadRequest(
                "text must not be empty (whitespace and invisible characters alone count as empty)"
                    .to_owned(),
            ));
        }
        // Counting stops one past the limit, so a huge text costs no more than a legal one.
        if text.chars().take(Self::MAX_CHARS + 1).count() > Self::MAX_CHARS {
            return Err(Error::TooLarge(format!(
                "text is longer than {} characters",
                Self::MAX_CHARS
            )));
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Unicode's `Default_Ignorable_Code_Point` (DerivedCoreProperties.txt, Unicode 16): characters
/// a renderer shows nothing for unless it supports them specially.
pub fn is_default_ignorable(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFF8}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}

/// Agent output made storable: Postgres `text` cannot hold U+0000, so NUL characters are
/// removed (not replaced: they show nothing). Applied to every streamed piece and to the whole
/// reply alike, so the chunks a client saw and the stored reply agree.
pub fn storable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', ""))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// A number of rows to return, `1..=MAX`, `DEFAULT` when not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit<const MAX: u16, const DEFAULT: u16>(u16);

/// How many messages one history page holds (PROTOCOL §3).
pub type PageLimit = Limit<200, 50>;

/// How many conversations one list holds.
pub type ListLimit = Limit<500, 100>;

impl<const MAX: u16, const DEFAULT: u16> Limit<MAX, DEFAULT> {
    pub const MAX: u16 = MAX;

    pub fn new(limit: i64) -> Result<Self, Error> {
        match u16::try_from(limit) {
            Ok(n) if (1..=MAX).contains(&n) => Ok(Self(n)),
            _ => Err(Error::BadRequest(format!(
                "limit must be between 1 and {MAX}"
            ))),
        }
    }

    /// Parses an optional query-string value.
    pub fn parse(raw: Option<&str>) -> Result<Self, Error> {
        match raw {
            None => Ok(Self::default()),
            Some(raw) => Self::new(
                raw.trim()
                    .parse()
                    .map_err(|_| Error::BadRequest(format!("limit must be between 1 and {MAX}")))?,
            ),
        }
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

impl<const MAX: u16, const DEFAULT: u16> Default for Limit<MAX, DEFAULT> {
    fn default() -> Self {
        Self(DEFAULT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_only_uuids_and_name_the_field() {
        let id: ConversationId = "0b9a2b1e-4f6f-4c4e-9d0e-2a8f3c1d5e7f".parse().unwrap();
        assert_eq!(id.to_string(), "0b9a2b1e-4f6f-4c4e-9d0e-2a8f3c1d5e7f");
        let err = "not-a-uuid".parse::<ConversationId>().unwrap_err();
        assert_eq!(err.code(), crate::ErrorCode::BadRequest);
        assert!(err.to_string().contains("conversation_id"));
    }

    #[test]
    fn message_text_is_trimmed_and_bounded() {
        assert_eq!(MessageText::parse("  hi \n").unwrap().as_str(), "hi");
        assert_eq!(
            MessageText::parse(" \t\n ").unwrap_err().code(),
            crate::ErrorCode::BadRequest
        );
        let max = "é".repeat(MessageText::MAX_CHARS);
        assert!(MessageText::parse(&max).is_ok());
        let over = "a".repeat(MessageText::MAX_CHARS + 1);
        assert_eq!(
            MessageText::parse(&over).unwrap_err().code(),
            crate::ErrorCode::TooLarge
        );
    }

    #[test]
    fn text_that_cannot_be_stored_or_shows_nothing_is_refused() {
        for bad in [
            "a\0b",
            "\0",
            "\u{200B}\u{2060}\u{FEFF}",
            " \u{200D} \u{00AD}\n",
            "\u{E0001}",
        ] {
            let err = MessageText::parse(bad).unwrap_err();
            assert_eq!(err.code(), crate::ErrorCode::BadRequest, "{bad:?}");
        }
        assert!(
            MessageText::parse("a\0b")
                .unwrap_err()
                .to_string()
                .contains("NUL")
        );
        for good in [
            "👋🏽",
            "e\u{301}",
            "\u{200F}שלום",
            "bell\u{7}",
            "a\u{200B}b",
            "\u{1F468}\u{200D}\u{1F469}",
        ] {
            assert_eq!(MessageText::parse(good).unwrap().as_str(), good, "{good:?}");
        }
        assert_eq!(storable("Hello wor\0ld!"), "Hello world!");
        assert!(matches!(storable("clean"), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn connection_ids_are_url_safe_and_bounded() {
        assert!(ConnectionId::parse("L0SM9cOFvHcCIhw=").is_ok());
        assert!(ConnectionId::parse("").is_err());
        assert!(ConnectionId::parse("a b").is_err());
        assert!(ConnectionId::parse("../x?y").is_err());
        assert!(ConnectionId::parse(&"a".repeat(ConnectionId::MAX_LEN + 1)).is_err());
    }

    #[test]
    fn page_limit_accepts_1_to_200() {
        assert_eq!(PageLimit::default().get(), 50);
        assert_eq!(PageLimit::new(1).unwrap().get(), 1);
        assert_eq!(PageLimit::new(200).unwrap().get(), 200);
        for bad in [0, -1, 201, 1000, i64::MAX] {
            assert!(PageLimit::new(bad).is_err(), "{bad}");
        }
        assert_eq!(PageLimit::parse(None).unwrap().get(), 50);
        assert_eq!(PageLimit::parse(Some("7")).unwrap().get(), 7);
        for bad in ["", "x", "1.5", "0", "201", "99999999999999999999"] {
            assert!(PageLimit::parse(Some(bad)).is_err(), "{bad}");
        }
        assert_eq!(ListLimit::default().get(), 100);
    }

    #[test]
    fn roles_use_the_protocol_words() {
        for role in [
            Role::PlatformAdmin,
            Role::CustomerAdmin,
            Role::CustomerOperator,
        ] {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
        }
        assert!("root".parse::<Role>().is_err());
    }
}
