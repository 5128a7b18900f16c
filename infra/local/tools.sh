#!/usr/bin/env bash
# The Python tools the tests drive (infra/requirements-test.txt), in a virtualenv outside the
# clone so repeated runs reuse it. Reinstalls only when the requirements change. Prints the
# environment that points the tests at the tools.
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

echo "export SCHEMATHESIS=$venv/bin/st"
echo "export MOTO_SERVER=$venv/bin/moto_server"
