//! Everything of Konstruct web chat that is not process start-up.
//!
//! Handlers are plain async functions over a state struct and typed events, so a Lambda, the
//! local runtime and a test all call the very same code. Raw input becomes a domain type once,
//! at the edge (`domain`), and every failure is one [`Error`] with the contract's error code.

pub mod agent;
pub mod api;
pub mod asyncapi;
pub mod auth;
pub mod config;
pub mod db;
pub mod delivery;
pub mod domain;
pub mod error;
pub mod frame;
pub mod job;
pub mod konstruct_message;
pub mod lambda;
pub mod migrate;
pub mod orchestrator;
pub mod queue;
pub mod rbac;
pub mod redis_connection;
pub mod redis_keys;
pub mod registry;
pub mod secrets;
pub mod telemetry;
pub mod worker;
pub mod ws;

pub use error::{Error, ErrorCode};
