#!/usr/bin/env bash
# The offline cache of the SQL the compiler checks (`shared/.sqlx`): sqlx's `query!` macros
# describe each statement to a database built by the migrations, and builds read the cache, so
# no build needs a database.
#
#   infra/local/sqlx.sh prepare   write shared/.sqlx again (after changing a statement or a
#                                 migration; commit it with the change)
#   infra/local/sqlx.sh check     fail if shared/.sqlx is not what the schema gives now (CI)
#
# What `cargo sqlx prepare [--check]` does, with cargo alone: a throwaway Postgres on its own
# ports (KONSTRUCT_SQLX_PG_PORT, default 61359), the migrations applied to an empty database,
# then konstruct-shared compiled with KONSTRUCT_SQLX_DATABASE_URL set (shared/sqlx.toml names
# that variable) and SQLX_OFFLINE_DIR where the macros write what they described.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
mode=${1:-}
case "$mode" in
  prepare | check) ;;
  *) echo "usage: $0 prepare|check" >&2; exit 2 ;;
esac

export KONSTRUCT_LOCAL_DIR=${KONSTRUCT_SQLX_DIR:-$root/.local/sqlx}
export KONSTRUCT_PG_PORT=${KONSTRUCT_SQLX_PG_PORT:-61359}
trap 'infra/local/services.sh down >/dev/null 2>&1 || true' EXIT
infra/local/services.sh up-postgres

psql() { infra/local/services.sh psql "$@"; }
db=konstruct_sqlx
psql -U postgres -d postgres -c "drop database if exists $db" -c "create database $db owner konstruct_migrator" >/dev/null
# The ledger sqlx's migrator keeps (a migration revokes it from the runtime role).
psql -U konstruct_migrator -d "$db" -c "create table _sqlx_migrations (version bigint primary key,
  description text not null, installed_on timestamptz not null default now(),
  success boolean not null, checksum bytea not null, execution_time bigint not null)" >/dev/null
for migration in migrations/*.up.sql; do
  psql -U konstruct_migrator -d "$db" -f "$migration" >/dev/null
done

out=$(mktemp -d)
trap 'rm -rf "$out"; infra/local/services.sh down >/dev/null 2>&1 || true' EXIT
# The macros run when the crate compiles: touching it makes cargo compile it again.
touch shared/src/lib.rs
KONSTRUCT_SQLX_DATABASE_URL=postgres://konstruct_migrator@127.0.0.1:$KONSTRUCT_PG_PORT/$db \
  SQLX_OFFLINE=false SQLX_OFFLINE_DIR=$out cargo build --workspace --lib
# Compiled once more from the cache, so the next build does not run the macros online again.
touch shared/src/lib.rs

if [ "$mode" = prepare ]; then
  rm -rf shared/.sqlx
  mkdir -p shared/.sqlx
  cp "$out"/query-*.json shared/.sqlx/
  echo "sqlx: wrote $(ls shared/.sqlx | wc -l) statements to shared/.sqlx" >&2
elif ! diff -r -q "$out" shared/.sqlx; then
  echo "sqlx: shared/.sqlx is not what the schema and the statements give; run \`make sqlx-prepare\` and commit it" >&2
  exit 1
else
  echo "sqlx: shared/.sqlx holds every statement, as the schema describes it ($(ls "$out" | wc -l))" >&2
fi
