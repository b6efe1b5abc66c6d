#!/usr/bin/env bash
# Runs every test: unit tests, the contract corpus, and the system tests
# against a real nats-server (installed first if missing, pinned 2.15.1).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tally-target}"
. deploy/install-nats-server.sh
cargo test --workspace "$@"
