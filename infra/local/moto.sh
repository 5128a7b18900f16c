# Sourced by the scripts that need AWS emulated: starts moto's server (SQS, Secrets Manager) on a
# free port, logging to $1/moto.log, and exports MOTO_ENDPOINT and the credentials the SDK signs
# with (emulators accept any). MOTO_SERVER must name the binary (infra/local/tools.sh prints
# it); the caller stops moto with `kill "$moto_pid"`.
start_moto() {
  local dir=$1 port
  # A free port, so a moto left over from an interrupted run cannot stand in the way.
  port=${KONSTRUCT_TEST_MOTO_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
  mkdir -p "$dir"
  "$MOTO_SERVER" -H 127.0.0.1 -p "$port" >"$dir/moto.log" 2>&1 &
  moto_pid=$!
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    kill -0 "$moto_pid" 2>/dev/null || { cat "$dir/moto.log" >&2; return 1; }
    sleep 0.1
  done
  export MOTO_ENDPOINT=http://127.0.0.1:$port
  export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1
}
