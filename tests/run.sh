#!/usr/bin/env bash
# Runs every test: unit tests, the contract corpus, and the system tests
# against a real nats-server (installed first if missing, pinned 2.15.1), a
# real S3 server (SeaweedFS `weed mini`, installed first if missing, pinned
# 4.48, by deploy/install-seaweedfs.sh) and, for `tally serve`, real clients
# (psql, psycopg, pgjdbc, ADBC; installed first if missing by
# deploy/install-clients.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tally-target}"
. deploy/install-nats-server.sh
. deploy/install-seaweedfs.sh
. deploy/install-clients.sh
cargo test --workspace "$@"
