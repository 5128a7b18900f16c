#!/usr/bin/env bash
# `make bench`: release builds, then the cold-start and end-to-end benchmarks against the
# project's own Postgres and Redis (the `bench` instances). Prints the figures and writes them to
# tests/bench/results.json with the machine they came from. Nothing passes or fails.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
export KONSTRUCT_LOCAL_DIR=$root/.local/bench KONSTRUCT_PG_PORT=61349 KONSTRUCT_REDIS_PORT=63819
target=${CARGO_TARGET_DIR:-$root/target}

# Counted on the wire by the integration test (AWS mode, its own services), before the bench
# services start.
echo "== round trips per message (tests/tests/integration/round_trips.rs)"
round_trips=$(infra/local/test.sh round_trips --no-capture 2>&1 |
  sed -n 's/^round trips per message (echo, AWS mode): //p' || true)
echo "${round_trips:-the counting test did not report}"
echo

moto_pid=
stop() {
  [ -n "$moto_pid" ] && kill "$moto_pid" 2>/dev/null
  infra/local/services.sh down
}
trap stop EXIT
services_env=$(infra/local/services.sh up)
eval "$services_env"
tools_env=$(infra/local/tools.sh python)
eval "$tools_env"
. infra/local/moto.sh
start_moto "$KONSTRUCT_LOCAL_DIR"
cargo build --release --workspace --bins
mkdir -p tests/bench

echo "== cold start (release binaries, $(uname -m); zips from make package when present)"
"$target/release/coldstart" "$target/release" "$target/lambda" --runs 20 --json tests/bench/coldstart.json
echo
echo "== end to end (konstruct-local, echo agent)"
KONSTRUCT_LOCAL_BIN=$target/release/konstruct-local "$target/release/loadgen" \
  --conversations 50 --listeners 1 --rate 1000 --seconds 10 --burst 60 --json tests/bench/loadgen.json

echo
KONSTRUCT_BIN_DIR=$target/release "$target/release/aws_sim" bench --json tests/bench/aws.json

machine=$(printf '%s, %s cores, %s' "$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)" "$(nproc)" \
  "$(free -g | awk '/Mem:/ {print $2 " GiB"}')")
python3 - "$machine" "$round_trips" <<'PY'
import json, re, sys, datetime
counted = [int(n) for n in re.findall(r"\d+", sys.argv[2])]
results = {
    "machine": sys.argv[1],
    "date": datetime.date.today().isoformat(),
    "round_trips_per_message": dict(zip(["statements", "preparing", "bare_syncs"], counted)),
    "coldstart": json.load(open("tests/bench/coldstart.json")),
    "end_to_end": json.load(open("tests/bench/loadgen.json")),
    "aws_path_simulated": json.load(open("tests/bench/aws.json")),
}
json.dump(results, open("tests/bench/results.json", "w"), indent=2)
PY
rm -f tests/bench/coldstart.json tests/bench/loadgen.json tests/bench/aws.json
echo
echo "results: tests/bench/results.json ($machine)"
