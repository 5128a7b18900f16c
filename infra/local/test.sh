#!/usr/bin/env bash
# `make test`: fresh throwaway services on the test ports, the whole test suite against them,
# services stopped again; exits with the tests' status.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
export KONSTRUCT_LOCAL_DIR=${KONSTRUCT_TEST_DIR:-$root/.local/test}
export KONSTRUCT_PG_PORT=${KONSTRUCT_TEST_PG_PORT:-54339}
export KONSTRUCT_REDIS_PORT=${KONSTRUCT_TEST_REDIS_PORT:-63809}

infra/local/services.sh reset
trap 'infra/local/services.sh down' EXIT
services_env=$(infra/local/services.sh up)
eval "$services_env"
tools_env=$(infra/local/tools.sh)
eval "$tools_env"

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
