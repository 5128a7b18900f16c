//! One integration-test binary against real Postgres and Redis (started by `make test`).

mod helpers;

mod abuse;
mod api;
mod aws;
mod chat_api_lambda;
mod connections;
mod conversations;
mod hostile;
mod llm;
mod local;
mod messages;
mod migrate;
mod migrations;
mod orchestrator;
mod pressure;
mod rbac;
mod reliability;
mod resume;
mod rls;
mod roles;
mod round_trips;
mod schemathesis;
mod secrets;
mod telemetry;
mod template;
mod text;
mod tokens;
mod worker;
mod ws;
mod ws_fixtures;
