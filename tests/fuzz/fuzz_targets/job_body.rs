#![no_main]
//! Any bytes as an SQS job body: a job, or bad_request (the record is then reported failed).

use libfuzzer_sys::fuzz_target;
use shared::ErrorCode;
use shared::job::Job;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Err(e) = Job::from_body(text)
    {
        assert_eq!(e.code(), ErrorCode::BadRequest);
    }
});
