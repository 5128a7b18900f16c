#!/usr/bin/env bash
# `make soak`: the randomized soak (tests/src/soak.rs) for as long as asked: headless Chromium,
# four tabs over two conversations, people's doings and the server's faults, then every tab
# checked against the database. Its servers are its own (a Postgres and a Redis on free ports,
# konstruct-local as gateway and worker), so it runs beside anything else.
#
#   infra/local/soak.sh [--minutes M] [--seed S] [--aws]   default 10 minutes; prints the seed
#
# --aws: on the AWS-shaped stack (tests/src/aws_sim.rs), over the dev services (Postgres,
# PgBouncer, Redis) and a moto of its own.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
tools_env=$(infra/local/tools.sh)
eval "$tools_env"
moto_pid=
if [[ " $* " == *" --aws "* ]]; then
  export KONSTRUCT_LOCAL_DIR=${KONSTRUCT_LOCAL_DIR:-$root/.local/dev}
  services_env=$(infra/local/services.sh up)
  eval "$services_env"
  . infra/local/moto.sh
  trap '[ -n "$moto_pid" ] && kill "$moto_pid" 2>/dev/null; true' EXIT
  start_moto "$KONSTRUCT_LOCAL_DIR"
fi
cargo build --workspace --bins
export KONSTRUCT_BIN_DIR=${CARGO_TARGET_DIR:-$root/target}/debug
export KONSTRUCT_LOCAL_BIN=$KONSTRUCT_BIN_DIR/konstruct-local
"$KONSTRUCT_BIN_DIR/soak" "$@"
