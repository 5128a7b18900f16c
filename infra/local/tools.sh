#!/usr/bin/env bash
# The Python tools the tests drive (infra/requirements-test.txt), in a virtualenv outside the
# clone so repeated runs reuse it. Reinstalls only when the requirements change. Prints the
# environment that points the tests at the tools.
#
#   infra/local/tools.sh          everything the tests need
#   infra/local/tools.sh python   the Python tools only (cargo-lambda for `make package`)
#
# Settings: KONSTRUCT_VENV (default ~/.cache/konstruct-webchat/venv).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
venv=${KONSTRUCT_VENV:-$HOME/.cache/konstruct-webchat/venv}
requirements=$root/infra/requirements-test.txt
stamp=$venv/.requirements.sha256
want=$(sha256sum "$requirements" | cut -d' ' -f1)

log() { echo "tools: $*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

if [ ! -x "$venv/bin/python" ]; then
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    log "installing python3-venv"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq python3-venv >/dev/null
  fi
  log "creating $venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
fi

if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing $(grep -cv '^\s*\(#\|$\)' "$requirements") pinned packages"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$requirements" >&2
  echo "$want" > "$stamp"
fi

if [ "${1:-}" = python ]; then
  echo "export MOTO_SERVER=$venv/bin/moto_server"
  echo "export CARGO_LAMBDA=$venv/bin/cargo-lambda"
  echo "export KONSTRUCT_PYTHON=$venv/bin/python"
  exit 0
fi

# The chat page's browser test: Debian's Chromium, driven by playwright-core from npm (no
# browser download of its own).
if [ ! -x /usr/bin/chromium ]; then
  log "installing chromium"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq chromium >/dev/null
fi
node_dir=${KONSTRUCT_NODE_DIR:-$HOME/.cache/konstruct-webchat/node}
node_want=$(sha256sum "$root/tests/browser/package.json" | cut -d' ' -f1)
if [ "$(cat "$node_dir/.package.sha256" 2>/dev/null)" != "$node_want" ]; then
  command -v npm >/dev/null || {
    log "installing nodejs and npm"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq nodejs npm >/dev/null
  }
  log "installing the browser test's npm packages"
  mkdir -p "$node_dir"
  cp "$root/tests/browser/package.json" "$node_dir/package.json"
  (cd "$node_dir" && npm install --silent --no-audit --no-fund >&2)
  echo "$node_want" > "$node_dir/.package.sha256"
fi

echo "export SCHEMATHESIS=$venv/bin/st"
echo "export NODE_PATH=$node_dir/node_modules"
echo "export CHROMIUM=/usr/bin/chromium"
echo "export MOTO_SERVER=$venv/bin/moto_server"
echo "export CARGO_LAMBDA=$venv/bin/cargo-lambda"
echo "export KONSTRUCT_PYTHON=$venv/bin/python"
