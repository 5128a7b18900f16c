#!/usr/bin/env bash
# `make test`: fresh throwaway services on the test ports, the whole test suite against them,
# services stopped again; exits with the tests' status.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
export KONSTRUCT_LOCAL_DIR=${KONSTRUCT_TEST_DIR:-$root/.local/test}
export KONSTRUCT_PG_PORT=${KONSTRUCT_TEST_PG_PORT:-61339}
export KONSTRUCT_REDIS_PORT=${KONSTRUCT_TEST_REDIS_PORT:-63809}

moto_pid=
stop() {
  [ -n "$moto_pid" ] && kill "$moto_pid" 2>/dev/null
  infra/local/services.sh down
}

infra/local/services.sh reset
trap stop EXIT
services_env=$(infra/local/services.sh up)
eval "$services_env"
tools_env=$(infra/local/tools.sh)
eval "$tools_env"

# The SQS and Secrets Manager emulator (moto's server mode); each test makes queues of its own
# names on it.
. infra/local/moto.sh
start_moto "$KONSTRUCT_LOCAL_DIR"

# Every binary: the end-to-end tests start konstruct-local, the template test each function.
cargo build --workspace --bins
export KONSTRUCT_BIN_DIR=${CARGO_TARGET_DIR:-$root/target}/debug
export KONSTRUCT_LOCAL_BIN=$KONSTRUCT_BIN_DIR/konstruct-local

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
