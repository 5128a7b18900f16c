#![no_main]
//! Any bytes as a portal token: a caller only with a valid signature, else unauthenticated.

use libfuzzer_sys::fuzz_target;
use shared::ErrorCode;
use shared::auth::TokenVerifier;
use shared::config::AuthConfig;

fuzz_target!(|data: &[u8]| {
    let config = AuthConfig::from_lookup(|name| {
        (name == "PORTAL_JWT_SECRET").then(|| "fuzzing-secret-0123456789abcdef0123456789".to_owned())
    })
    .unwrap();
    if let Ok(token) = std::str::from_utf8(data)
        && let Err(e) = TokenVerifier::new(&config).verify(token)
    {
        assert_eq!(e.code(), ErrorCode::Unauthenticated);
    }
});
