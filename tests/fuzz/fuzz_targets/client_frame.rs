#![no_main]
//! Any bytes as a browser frame: parsed, or refused with bad_request / too_large.

use libfuzzer_sys::fuzz_target;
use shared::ErrorCode;
use shared::frame::ClientFrame;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Err(e) = ClientFrame::parse(text)
    {
        assert!(matches!(e.code(), ErrorCode::BadRequest | ErrorCode::TooLarge));
    }
});
