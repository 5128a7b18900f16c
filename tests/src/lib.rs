//! What the reliability tests and the benchmarks share: a local stack to run against, a load
//! driver that accounts for every message, and the AWS pieces no emulator has (Lambda's SQS
//! event source).

pub mod event_source;
pub mod load;
pub mod stack;
pub mod streaming;
