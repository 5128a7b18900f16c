#!/usr/bin/env bash
# `make aws-sim`: the AWS path on this machine (tests/src/aws_sim.rs): the function binaries
# under a Lambda emulator, the orchestrator on Lambda's SQS FIFO event source over moto,
# PgBouncer in transaction mode in front of Postgres, konstruct-local standing in for API
# Gateway, and a round trip added on every hop. Prints where to connect; Ctrl-C stops it.
#
#   infra/local/aws-sim.sh [serve]        one seeded conversation (the dev services)
#   infra/local/aws-sim.sh bench [--json] the AWS path's figures (`make bench` runs this)
#
# Settings: KONSTRUCT_LOCAL_DIR, KONSTRUCT_PG_PORT, KONSTRUCT_REDIS_PORT as services.sh takes
# them (default: the dev instances); AWS_SIM_PROFILE=release for optimized binaries.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
export KONSTRUCT_LOCAL_DIR=${KONSTRUCT_LOCAL_DIR:-$root/.local/dev}
profile=${AWS_SIM_PROFILE:-debug}

moto_pid=
stop() {
  [ -n "$moto_pid" ] && kill "$moto_pid" 2>/dev/null
  return 0
}
trap stop EXIT
services_env=$(infra/local/services.sh up)
eval "$services_env"
tools_env=$(infra/local/tools.sh python)
eval "$tools_env"
. infra/local/moto.sh
start_moto "$KONSTRUCT_LOCAL_DIR"

if [ "$profile" = release ]; then
  cargo build --release --workspace --bins
else
  cargo build --workspace --bins
fi
export KONSTRUCT_BIN_DIR=${CARGO_TARGET_DIR:-$root/target}/$profile
"$KONSTRUCT_BIN_DIR/aws_sim" "$@"
