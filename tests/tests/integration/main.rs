//! One integration-test binary against real Postgres and Redis (started by `make test`).

mod helpers;

mod connections;
mod conversations;
mod messages;
mod migrations;
mod rbac;
mod redis_keys;
mod rls;
mod tokens;
