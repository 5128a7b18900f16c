//! The WebSocket API as an AsyncAPI 3 document (`docs/asyncapi.json`), built from the frame types
//! themselves: the same `utoipa` schemas the OpenAPI document of the REST API uses (a stored
//! message is one schema in both), one JSON Schema per frame.

use serde_json::{Map, Value, json};
use utoipa::ToSchema;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::Schema;

use crate::frame::{RawFrame, ServerFrame};

/// The document, as committed in `docs/asyncapi.json` (a test keeps the two equal).
pub fn document() -> Value {
    let mut schemas = Map::new();
    let client = frames::<RawFrame>(&mut schemas);
    let server = frames::<ServerFrame>(&mut schemas);
    let mut messages = Map::new();
    let mut receive = Vec::new();
    let mut send = Vec::new();
    for (list, refs) in [(&client, &mut receive), (&server, &mut send)] {
        for (name, kind, description) in list {
            messages.insert(
                name.clone(),
                json!({
                    "name": kind,
                    "title": format!("`{kind}`"),
                    "summary": description,
                    "contentType": "application/json",
                    "payload": { "$ref": format!("#/components/schemas/{name}") },
                }),
            );
            refs.push(json!({ "$ref": format!("#/channels/conversation/messages/{name}") }));
        }
    }
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "Konstruct web chat: WebSocket API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "One socket per open conversation: the client authenticates, sends \
                user messages and cancels, and receives acknowledgements, the agent's streamed \
                reply and the other tabs' messages. docs/protocol.md tells the rules (resume by \
                `seq`, chunk offsets, refusals, limits); every frame is JSON text of at most \
                32 KiB with a string `type`.",
        },
        "servers": {
            "aws": {
                "host": "{apiId}.execute-api.{region}.amazonaws.com",
                "pathname": "/{stage}",
                "protocol": "wss",
                "description": "API Gateway's WebSocket API; route selection on `$request.body.type`.",
                "variables": {
                    "apiId": { "description": "the WebSocket API's id" },
                    "region": { "default": "eu-west-1" },
                    "stage": { "default": "dev" },
                },
            },
            "local": {
                "host": "127.0.0.1:8080",
                "protocol": "ws",
                "description": "konstruct-local (also at /chat/ws/{conversation_id}).",
            },
        },
        "channels": {
            "conversation": {
                "address": "/ws",
                "title": "A conversation",
                "description": "Every authorized socket of the conversation receives its replies \
                    and its other sockets' messages.",
                "bindings": {
                    "ws": {
                        "query": {
                            "type": "object",
                            "required": ["conversation_id"],
                            "properties": {
                                "conversation_id": { "type": "string", "format": "uuid" },
                            },
                        },
                    },
                },
                "messages": messages
                    .keys()
                    .map(|name| (name.clone(), json!({ "$ref": format!("#/components/messages/{name}") })))
                    .collect::<Map<_, _>>(),
            },
        },
        "operations": {
            "receiveClientFrame": {
                "action": "receive",
                "channel": { "$ref": "#/channels/conversation" },
                "summary": "What the client sends.",
                "messages": receive,
            },
            "sendServerFrame": {
                "action": "send",
                "channel": { "$ref": "#/channels/conversation" },
                "summary": "What the server sends.",
                "messages": send,
            },
        },
        "components": {
            "schemas": schemas,
            "messages": messages,
        },
    })
}

/// Adds one schema per variant of the internally tagged frame enum `T` to `schemas` (named
/// `{T}.{type}`), with the schemas they refer to; returns (schema name, `type`, description)
/// for each.
fn frames<T: ToSchema>(schemas: &mut Map<String, Value>) -> Vec<(String, String, String)> {
    let mut referred = Vec::new();
    T::schemas(&mut referred);
    for (name, schema) in referred {
        schemas.insert(name, to_value(&schema));
    }
    let whole = to_value(&T::schema());
    let enum_name = T::name();
    let variants = whole["oneOf"].as_array().cloned().unwrap_or_default();
    let mut out = Vec::new();
    for mut variant in variants {
        let kind = variant["properties"]["type"]["enum"][0]
            .as_str()
            .expect("a tagged frame names its type")
            .to_owned();
        let description = variant
            .as_object_mut()
            .and_then(|v| v.remove("description"))
            .and_then(|d| d.as_str().map(str::to_owned))
            .unwrap_or_default();
        let name = format!("{enum_name}.{kind}");
        if let Some(v) = variant.as_object_mut() {
            v.insert("title".into(), json!(format!("`{kind}` frame")));
            if !description.is_empty() {
                v.insert("description".into(), json!(description));
            }
        }
        schemas.insert(name.clone(), variant);
        out.push((name, kind, description));
    }
    out
}

fn to_value(schema: &RefOr<Schema>) -> Value {
    serde_json::to_value(schema).expect("a schema serializes")
}
