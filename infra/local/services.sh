#!/usr/bin/env bash
# Throwaway Postgres and Redis for this project, on their own ports and in a project-local
# directory, so nothing depends on what else runs on the machine.
#
#   infra/local/services.sh up      start both (installs the Debian packages if missing), wait
#                                   until they answer, print the environment to use them
#   infra/local/services.sh env     print that environment (DATABASE_URL, REDIS_URL, ...)
#   infra/local/services.sh down    stop both; the data stays for the next `up` (a Redis found
#                                   answering on the port, not started here, is used and left alone)
#   infra/local/services.sh reset   stop both and delete their data
#   infra/local/services.sh up-postgres | restart-postgres | reset-postgres
#                                   the same for Postgres alone (the fault tests restart it)
#   infra/local/services.sh psql ARGS...
#                                   psql against that Postgres (quiet, stops at the first error)
#
# PgBouncer in transaction mode runs in front of that Postgres (`up` starts it too), standing
# in for RDS Proxy: it multiplexes transactions over at most KONSTRUCT_POOL_SIZE (20) server
# connections and cannot carry a named prepared statement from one transaction to the next,
# where RDS Proxy would pin the session. `up` prints its URL as POOLED_DATABASE_URL.
#
# Settings: KONSTRUCT_LOCAL_DIR (default .local/dev under the project), KONSTRUCT_PG_PORT
# (default 61329), KONSTRUCT_REDIS_PORT (default 63799), KONSTRUCT_POOLER_PORT (default the
# Postgres port + 100):
# above the kernel's ephemeral range, so no outgoing connection can hold them. Every command is
# safe to repeat.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dir=${KONSTRUCT_LOCAL_DIR:-$root/.local/dev}
pg_port=${KONSTRUCT_PG_PORT:-61329}
redis_port=${KONSTRUCT_REDIS_PORT:-63799}
# PgBouncer 100 above its Postgres: the dev, test and bench instances never share a port.
pooler_port=${KONSTRUCT_POOLER_PORT:-$((pg_port + 100))}
pool_size=${KONSTRUCT_POOL_SIZE:-20}
# Two roles, as deployed (infra/README.md): the migrator owns the database and its schema; the
# functions connect as the runtime role, which owns nothing and gets data privileges through
# the group role konstruct_runtime (granted by the migrations).
migrator_role=konstruct_migrator
runtime_role=konstruct_app
app_db=konstruct

log() { echo "services: $*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# initdb and postgres refuse to run as root: as root, the server runs as the postgres OS user.
pg_user() {
  if [ "$(id -u)" = 0 ]; then echo postgres; else id -un; fi
}

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_bindir() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/initdb" ] && { echo "$d"; return; }
  done
  if command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ]; then
    pg_config --bindir
  fi
}

install_missing() {
  local packages=()
  [ -n "$(pg_bindir)" ] || packages+=(postgresql)
  command -v redis-server >/dev/null || packages+=(redis-server)
  [ -x /usr/sbin/pgbouncer ] || packages+=(pgbouncer)
  [ ${#packages[@]} -eq 0 ] && return
  log "installing ${packages[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${packages[@]}" >/dev/null
}

# Statement statistics, planning and statements inside SQL functions included: the AWS bench
# reads Postgres's time per message from them.
stat_statements="-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all -c pg_stat_statements.track_planning=on"

pg_up() {
  local bin data=$dir/postgres
  bin=$(pg_bindir)
  mkdir -p "$dir"
  if [ ! -s "$data/PG_VERSION" ]; then
    log "initdb $data"
    mkdir -p "$data"
    [ "$(id -u)" = 0 ] && chown postgres: "$data"
    chmod 700 "$data"
    as_pg test -w "$data" || {
      log "the $(pg_user) user cannot write $data; set KONSTRUCT_LOCAL_DIR to a directory it can reach"
      exit 1
    }
    as_pg "$bin/initdb" -D "$data" -U postgres --auth=trust --encoding=UTF8 --no-locale >/dev/null
  fi
  if ! as_pg "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    log "postgres on 127.0.0.1:$pg_port"
    as_pg "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 start \
      -o "-p $pg_port -k '' -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200 $stat_statements" >/dev/null \
      || { tail -n 20 "$data/server.log" >&2; exit 1; }
  fi
  local i
  for i in $(seq 1 60); do
    "$bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port" && break
    sleep 0.5
  done
  "$bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port" || { log "postgres did not answer"; exit 1; }
  # Neither role is superuser or BYPASSRLS, so row-level security holds for everything they do.
  # The migrator may create databases (the tests make one each).
  "$bin/psql" -q -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres -v ON_ERROR_STOP=1 <<SQL >/dev/null
select 'create role konstruct_runtime nologin'
where not exists (select from pg_roles where rolname = 'konstruct_runtime') \gexec
select 'create role $migrator_role login'
where not exists (select from pg_roles where rolname = '$migrator_role') \gexec
alter role $migrator_role nosuperuser nobypassrls createdb nocreaterole;
select 'create role $runtime_role login'
where not exists (select from pg_roles where rolname = '$runtime_role') \gexec
alter role $runtime_role nosuperuser nobypassrls nocreatedb nocreaterole;
grant konstruct_runtime to $runtime_role;
select 'create database $app_db owner $migrator_role'
where not exists (select from pg_database where datname = '$app_db') \gexec
SQL
  # A data directory from before the two roles: hand what the single role owned (the database
  # and, in it, the schema) to the migrator.
  "$bin/psql" -q -h 127.0.0.1 -p "$pg_port" -U postgres -d "$app_db" -v ON_ERROR_STOP=1 <<SQL >/dev/null
select 'reassign owned by konstruct to $migrator_role'
where exists (select from pg_roles where rolname = 'konstruct') \gexec
SQL
}

# PgBouncer (Debian's 1.18, which has no protocol-level prepared statements) in transaction
# mode, every database of the Postgres above under its own name. It refuses to run as root, so
# as root it runs as the postgres OS user, like Postgres.
pooler_up() {
  local conf=$dir/pgbouncer
  mkdir -p "$conf"
  cat >"$conf/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=$pg_port

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $pooler_port
unix_socket_dir =
auth_type = trust
auth_file = $conf/users.txt
pool_mode = transaction
default_pool_size = $pool_size
max_db_connections = $pool_size
max_client_conn = 2000
server_reset_query =
logfile = $conf/pgbouncer.log
pidfile = $conf/pgbouncer.pid
INI
  printf '"%s" ""\n"%s" ""\n' "$runtime_role" "$migrator_role" >"$conf/users.txt"
  [ "$(id -u)" = 0 ] && chown -R postgres: "$conf"
  if [ -s "$conf/pgbouncer.pid" ] && kill -0 "$(cat "$conf/pgbouncer.pid")" 2>/dev/null; then
    return
  fi
  log "pgbouncer (transaction mode, pool $pool_size) on 127.0.0.1:$pooler_port"
  # A descriptor per client: the AWS-shaped stack at 200 conversations opens over a thousand
  # (every Lambda environment its own), past the 1024 a login shell (runuser) starts with.
  as_pg sh -c 'ulimit -n "$(ulimit -Hn)"; exec /usr/sbin/pgbouncer "$@"' pgbouncer \
    -d "$conf/pgbouncer.ini" >/dev/null \
    || { tail -n 20 "$conf/pgbouncer.log" >&2; exit 1; }
  local i
  for i in $(seq 1 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$pooler_port") 2>/dev/null && return
    sleep 0.1
  done
  log "pgbouncer did not answer"; exit 1
}

pooler_down() {
  local pidfile=$dir/pgbouncer/pgbouncer.pid
  [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
}

# The Redis this script started, if it runs.
redis_ours() {
  local pidfile=$dir/redis/redis.pid
  [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

redis_up() {
  mkdir -p "$dir/redis"
  if redis-cli -h 127.0.0.1 -p "$redis_port" ping >/dev/null 2>&1; then
    redis_ours || log "a Redis not started here answers on 127.0.0.1:$redis_port; using it (it will not be stopped)"
    return
  fi
  log "redis on 127.0.0.1:$redis_port"
  redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize yes --dir "$dir/redis" --pidfile "$dir/redis/redis.pid" \
    --logfile "$dir/redis/redis.log"
  local i
  for i in $(seq 1 60); do
    redis-cli -h 127.0.0.1 -p "$redis_port" ping >/dev/null 2>&1 && return
    sleep 0.2
  done
  log "redis did not answer"; exit 1
}

pg_down() {
  local bin data=$dir/postgres
  bin=$(pg_bindir)
  [ -n "$bin" ] && [ -s "$data/PG_VERSION" ] || return 0
  as_pg "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
}

# Stops only the Redis this script started: one found on the port belongs to someone else.
redis_down() {
  redis_ours || return 0
  redis-cli -h 127.0.0.1 -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
}

print_env() {
  cat <<ENV
export DATABASE_URL=postgres://$runtime_role@127.0.0.1:$pg_port/$app_db
export MIGRATOR_DATABASE_URL=postgres://$migrator_role@127.0.0.1:$pg_port/$app_db
export REDIS_URL=redis://127.0.0.1:$redis_port
export POOLED_DATABASE_URL=postgres://$runtime_role@127.0.0.1:$pooler_port/$app_db
ENV
}

case "${1:-}" in
  up) install_missing; pg_up; pooler_up; redis_up; print_env ;;
  env) print_env ;;
  down) pooler_down; pg_down; redis_down ;;
  reset) pooler_down; pg_down; redis_down; rm -rf "$dir" ;;
  up-postgres) install_missing; pg_up ;;
  restart-postgres) pg_down; pg_up ;;
  reset-postgres) pg_down; rm -rf "$dir" ;;
  psql) shift; "$(pg_bindir)/psql" -q -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" "$@" ;;
  *) echo "usage: $0 up|env|down|reset|up-postgres|restart-postgres|reset-postgres|psql" >&2; exit 2 ;;
esac
