#![no_main]
//! Any bytes as an API Gateway WebSocket event: a route event, or bad_request.

use aws_lambda_events::apigw::ApiGatewayWebsocketProxyRequest;
use libfuzzer_sys::fuzz_target;
use shared::ErrorCode;
use shared::ws::RouteEvent;

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = serde_json::from_slice::<ApiGatewayWebsocketProxyRequest>(data)
        && let Err(e) = RouteEvent::parse(&event, None)
    {
        assert_eq!(e.code(), ErrorCode::BadRequest);
    }
});
