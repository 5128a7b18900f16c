//! What the reliability tests and the benchmarks share: a local stack to run against and a load
//! driver that accounts for every message.

pub mod load;
pub mod stack;
pub mod streaming;
