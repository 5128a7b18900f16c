#!/usr/bin/env bash
# `make soak`: the randomized soak (tests/src/soak.rs) for as long as asked: headless Chromium,
# four tabs over two conversations, people's doings and the server's faults, then every tab
# checked against the database. Its servers are its own (a Postgres and a Redis on free ports,
# konstruct-local as gateway and worker), so it runs beside anything else.
#
#   infra/local/soak.sh [--minutes M] [--seed S]    default 10 minutes; prints the seed
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
tools_env=$(infra/local/tools.sh)
eval "$tools_env"
cargo build --workspace --bins
export KONSTRUCT_BIN_DIR=${CARGO_TARGET_DIR:-$root/target}/debug
export KONSTRUCT_LOCAL_BIN=$KONSTRUCT_BIN_DIR/konstruct-local
"$KONSTRUCT_BIN_DIR/soak" "$@"
