//! What the reliability tests and the benchmarks share: a local stack to run against, a load
//! driver that accounts for every message, and the AWS pieces no emulator has (Lambda's SQS
//! event source, a Lambda runtime for the function binaries, a latency proxy).

pub mod aws_sim;
pub mod event_source;
pub mod lambda;
pub mod latency;
pub mod load;
pub mod services;
pub mod soak;
pub mod stack;
pub mod streaming;
