#!/usr/bin/env bash
# `make package`: one Lambda zip per function (cargo-lambda, which cross-links with zig for
# Amazon Linux 2023), and their sizes. Builds for arm64 when the aarch64 Rust target is
# installed (or can be), else for x86_64 with a warning before and after the build: then deploy
# with Architecture=x86_64 (the warning gives the command).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
# cargo-lambda only: packaging needs none of the browser test's tools.
tools_env=$(infra/local/tools.sh python)
eval "$tools_env"
export PATH="$(dirname "$CARGO_LAMBDA"):$PATH"

# The template's Architecture defaults to arm64; zips built for x86_64 deploy only with
# --parameter-overrides Architecture=x86_64, so that fallback is said before and after the build.
fallback_notice() {
  cat >&2 <<'NOTICE'
package: ======================================================================
package: WARNING: building x86_64, NOT arm64 (template.yaml's default): the
package: aarch64 Rust target is not installed here and could not be added.
package: These zips deploy only with:
package:   sam deploy --config-file infra/samconfig.toml --config-env dev \
package:     --parameter-overrides Architecture=x86_64
package: (or install the target: rustup target add aarch64-unknown-linux-gnu)
package: ======================================================================
NOTICE
}

if rustup target list --installed 2>/dev/null | grep -q '^aarch64-unknown-linux-gnu$' \
  || rustup target add aarch64-unknown-linux-gnu >/dev/null 2>&1; then
  arch=--arm64 architecture=arm64
else
  arch=--x86-64 architecture=x86_64
  fallback_notice
fi

functions=$(ls -d functions/*/ | xargs -n1 basename | grep -v '^konstruct-local$')
packages=()
for f in $functions; do packages+=(--package "$f"); done
cargo lambda build --release "$arch" --output-format zip "${packages[@]}"

target=${CARGO_TARGET_DIR:-$root/target}
# Each function holds only the clients it uses; a zip past 5 MiB means one grew a dependency it
# should not have (or the release profile lost its size settings).
max_bytes=$((5 * 1024 * 1024))
too_big=()
echo "Lambda packages ($architecture; deploy with Architecture=$architecture):"
for f in $functions; do
  zip=$target/lambda/$f/bootstrap.zip
  [ -f "$zip" ] || { echo "package: $zip is missing" >&2; exit 1; }
  bytes=$(stat -c %s "$zip")
  printf '  %-16s %8s bytes  %s\n' "$f" "$bytes" "$zip"
  [ "$bytes" -le "$max_bytes" ] || too_big+=("$f")
done
[ "$architecture" = arm64 ] || fallback_notice
if [ ${#too_big[@]} -gt 0 ]; then
  echo "package: over 5 MiB: ${too_big[*]}" >&2
  exit 1
fi
