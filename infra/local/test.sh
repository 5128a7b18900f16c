#!/usr/bin/env bash
# `make test`: fresh throwaway services on the test ports, the whole test suite against them,
# services stopped again; exits with the tests' status.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
export KONSTRUCT_LOCAL_DIR=${KONSTRUCT_TEST_DIR:-$root/.local/test}
export KONSTRUCT_PG_PORT=${KONSTRUCT_TEST_PG_PORT:-61339}
export KONSTRUCT_REDIS_PORT=${KONSTRUCT_TEST_REDIS_PORT:-63809}

# A free port, so a moto left over from an interrupted run cannot stand in the way.
moto_port=${KONSTRUCT_TEST_MOTO_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
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

# The SQS emulator (moto's server mode); each test makes queues of its own names on it.
mkdir -p "$KONSTRUCT_LOCAL_DIR"
"$MOTO_SERVER" -H 127.0.0.1 -p "$moto_port" >"$KONSTRUCT_LOCAL_DIR/moto.log" 2>&1 &
moto_pid=$!
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$moto_port") 2>/dev/null && break
  kill -0 "$moto_pid" 2>/dev/null || { cat "$KONSTRUCT_LOCAL_DIR/moto.log" >&2; exit 1; }
  sleep 0.1
done
export MOTO_ENDPOINT=http://127.0.0.1:$moto_port
# The AWS SDK signs every request; emulators accept any credentials.
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1

# Every binary: the end-to-end tests start konstruct-local, the template test each function.
cargo build --workspace --bins
export KONSTRUCT_BIN_DIR=${CARGO_TARGET_DIR:-$root/target}/debug
export KONSTRUCT_LOCAL_BIN=$KONSTRUCT_BIN_DIR/konstruct-local

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
