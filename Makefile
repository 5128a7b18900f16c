.PHONY: dev test test-unit soak bench aws-sim package services-up services-down fmt lint docs sqlx-prepare sqlx-check

# The whole chat on this machine: services, migrations, demo data, then the server on :8080.
dev:
	infra/local/dev.sh

# Starts the project's own Postgres and Redis, runs every test against them, stops them.
test:
	infra/local/test.sh

# The tests that need no service: the crates' unit tests and the browser client module against
# its scripted server (Node). Seconds once built; `make test` runs these too.
test-unit:
	cargo test --workspace --lib --bins
	node --test tests/browser/client.test.mjs

# The randomized soak in headless Chromium, ten minutes (SOAK_ARGS="--minutes 30 --seed 7").
soak:
	infra/local/soak.sh $(SOAK_ARGS)

# The AWS path on this machine: function binaries under a Lambda emulator, the SQS FIFO event
# source over moto, PgBouncer, round trips on every hop; prints where to connect.
aws-sim:
	infra/local/aws-sim.sh

# Cold start and end-to-end figures (release builds); writes tests/bench/results.json.
bench:
	infra/local/bench.sh

# One Lambda zip per function, for `sam deploy`; prints their sizes.
package:
	infra/package.sh

services-up:
	infra/local/services.sh up

services-down:
	infra/local/services.sh down

fmt:
	cargo fmt --all

# Writes docs/asyncapi.json again from the frame types (a test checks the committed one).
docs:
	KONSTRUCT_WRITE_DOCS=1 cargo test -p tests --test integration -- the_asyncapi_document_is_the_frame_types_own

# The SQL the compiler checks: after changing a statement or a migration, write the offline
# cache (shared/.sqlx) again from a throwaway database the migrations build, and commit it.
sqlx-prepare:
	infra/local/sqlx.sh prepare

# Fails when shared/.sqlx is not what the statements and the migrations give now (CI runs it).
sqlx-check:
	infra/local/sqlx.sh check

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
