#!/usr/bin/env bash
# Refreshes docs/dashboard.png and docs/tenant.png (shown in the README):
# a generated SaaS through nats-server and `tally run`, `tally serve`, and
# headless Chromium. Run it after changing the pages.
#
#   bash deploy/screenshots.sh [TENANTS] [MONTHS]
set -euo pipefail
cd "$(dirname "$0")/.."
tenants="${1:-60}"
months="${2:-12}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tally-target}"
. deploy/install-nats-server.sh
. deploy/install-clients.sh
if [ -z "${TALLY_BIN:-}" ]; then cargo build --quiet --bin tally; fi
tally="${TALLY_BIN:-$CARGO_TARGET_DIR/debug/tally}"
work="$(mktemp -d "${TMPDIR:-/tmp}/tally-shots.XXXXXX")"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
nport="$(free_port)"; http="$(free_port)"
"$NATS_SERVER_BIN" -js -a 127.0.0.1 -p "$nport" -sd "$work/js" >/dev/null 2>&1 &
pids=($!)
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
sleep 1
export TALLY_NATS_URL="nats://127.0.0.1:$nport" TALLY_DATA_DIR="$work/data" TALLY_USERS_FILE="$work/users.toml" RUST_LOG=warn
"$tally" generate --tenants "$tenants" --months "$months" --seed 42 >"$work/events.jsonl"
"$tally" publish "$work/events.jsonl" >/dev/null
"$tally" run --until-idle
TALLY_PASSWORD=shots "$tally" users add ops --all-tenants >/dev/null
"$tally" serve --pg-listen off --flight-listen off --http-listen "127.0.0.1:$http" &
pids+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$http") 2>/dev/null && break; sleep 0.1; done
tenant="$("$tally" sql --format csv "SELECT tenant FROM over_quota ORDER BY overage_amount DESC NULLS LAST LIMIT 1" | sed -n 2p)"
shoot() {
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --virtual-time-budget=15000 \
    --window-size="$3" --screenshot="$2" "http://ops:shots@127.0.0.1:$http$1" 2>/dev/null
  echo "wrote $2"
}
shoot / docs/dashboard.png 1280,2600
shoot "/tenants/${tenant:-t0001}" docs/tenant.png 1280,2200
shoot / docs/dashboard-phone.png 390,2400
