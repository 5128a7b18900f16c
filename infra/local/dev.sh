#!/usr/bin/env bash
# `make dev`: the whole chat on this machine. Starts the project's Postgres and Redis (installing
# them if missing), migrates, seeds a demo tenant/user/echo agent/conversation, prints the page's
# URL with a token, and runs `konstruct-local serve` until Ctrl-C.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
listen=${KONSTRUCT_LISTEN:-127.0.0.1:8080}

services_env=$(infra/local/services.sh up)
eval "$services_env"
export KONSTRUCT_MODE=local
# The AWS SDK looks for a region at start-up; naming one keeps it from asking EC2's metadata
# service, which a laptop does not have.
export AWS_REGION=${AWS_REGION:-us-east-1}
export PORTAL_JWT_SECRET=${PORTAL_JWT_SECRET:-konstruct-local-development-secret-0123456789}

cargo build -q -p konstruct-local
bin=${CARGO_TARGET_DIR:-$root/target}/debug/konstruct-local

# Migrations and the demo data are written as the migrator (the schema's owner); the server connects as the
# runtime role, which owns nothing.
"$bin" migrate
# The binary prints the demo's fields as shell assignments: url, token, conversation_id, ...
eval "$("$bin" seed-demo --url "http://$listen" --shell)"
cat <<MSG

  Konstruct web chat is starting.
  Open:          $url
  Token:         $token
  Conversation:  $conversation_id  (tenant $tenant_id, user $user_id)

  Ctrl-C stops the server; \`make services-down\` stops Postgres and Redis.

MSG
exec "$bin" serve --listen "$listen"
