//! The WebSocket API's route table: every route key API Gateway selects, the handler that
//! serves it and the function deployed for that handler. The Lambdas (their names), the local
//! gateway (route selection, events, dispatch) and the template check (through
//! [`crate::registry`]: `infra/validate_template.py` fails when template.yaml deploys other
//! routes) all read this table. Adding a route: a row here, a `Route` if it needs a handler of its own, and the
//! template's `AWS::ApiGatewayV2::Route`.

use crate::frame::ClientFrame;

/// The handlers, each deployed as its own function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Connect,
    Auth,
    /// `message`, `ping`, `cancel` (through `$default`) and anything unknown.
    Message,
    Disconnect,
}

/// Route key → handler, as template.yaml deploys them (route selection on
/// `$request.body.type`).
pub const ROUTES: [(&str, Route); 6] = [
    ("$connect", Route::Connect),
    ("$disconnect", Route::Disconnect),
    ("auth", Route::Auth),
    ("message", Route::Message),
    ("ping", Route::Message),
    ("$default", Route::Message),
];

impl Route {
    /// The function (crate and binary under `functions/`) deployed for this handler.
    pub const fn function(self) -> &'static str {
        match self {
            Self::Connect => "ws-connect",
            Self::Auth => "ws-auth",
            Self::Message => "ws-message",
            Self::Disconnect => "ws-disconnect",
        }
    }

    /// The handler of a route key; an unknown key is `$default`'s.
    pub fn for_key(key: &str) -> Self {
        ROUTES
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(Self::Message, |(_, route)| *route)
    }

    /// The `eventType` API Gateway gives this handler's events.
    pub const fn event_type(self) -> &'static str {
        match self {
            Self::Connect => "CONNECT",
            Self::Disconnect => "DISCONNECT",
            Self::Auth | Self::Message => "MESSAGE",
        }
    }
}

/// The route key API Gateway selects for a frame (`$request.body.type`): the frame's `type`
/// when a route has that key, else `$default`. Keys starting with `$` are never selected by a
/// frame.
pub fn route_key(raw: &str) -> &'static str {
    let kind = ClientFrame::route_of(raw);
    ROUTES
        .iter()
        .map(|(key, _)| *key)
        .find(|key| !key.starts_with('$') && kind.as_deref() == Some(*key))
        .unwrap_or("$default")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::CLIENT_FRAME_TYPES;

    #[test]
    fn frames_select_their_route_and_anything_else_goes_to_default() {
        assert_eq!(route_key(r#"{"type":"auth","token":"t"}"#), "auth");
        assert_eq!(route_key(r#"{"type":"message","text":"hi"}"#), "message");
        assert_eq!(route_key(r#"{"type":"ping"}"#), "ping");
        for raw in [
            r#"{"type":"cancel","reply_to":"x"}"#,
            r#"{"type":"$connect"}"#,
            r#"{"type":"$disconnect"}"#,
            r#"{"type":"nope"}"#,
            r#"{"type":1}"#,
            "not json",
        ] {
            assert_eq!(route_key(raw), "$default", "{raw}");
        }
    }

    #[test]
    fn every_client_frame_reaches_a_handler_that_parses_it() {
        for kind in CLIENT_FRAME_TYPES {
            let route = Route::for_key(route_key(&format!(r#"{{"type":"{kind}"}}"#)));
            let expected = if kind == "auth" {
                Route::Auth
            } else {
                Route::Message
            };
            assert_eq!(route, expected, "{kind}");
        }
        assert_eq!(Route::for_key("$connect"), Route::Connect);
        assert_eq!(Route::for_key("$disconnect"), Route::Disconnect);
    }

    #[test]
    fn every_route_key_is_unique() {
        let mut keys: Vec<&str> = ROUTES.iter().map(|(key, _)| *key).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), ROUTES.len());
    }
}
