#!/usr/bin/env bash
# The newcomer's first command. Installs nats-server if missing (pinned),
# builds tally, starts a local nats-server with a temporary store, generates
# a synthetic SaaS, publishes it, ingests it until idle, and prints queries.
#
#   bash deploy/quickstart.sh [TENANTS] [MONTHS]
set -euo pipefail
cd "$(dirname "$0")/.."
tenants="${1:-200}"
months="${2:-12}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tally-target}"

. deploy/install-nats-server.sh
echo "== building tally (first build takes a few minutes: DataFusion is large)"
cargo build --quiet --bin tally
tally="$CARGO_TARGET_DIR/debug/tally"

work="$(mktemp -d "${TMPDIR:-/tmp}/tally-quickstart.XXXXXX")"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$NATS_SERVER_BIN" -c deploy/nats-server.conf -a 127.0.0.1 -p "$port" -sd "$work/jetstream" >"$work/nats-server.log" 2>&1 &
nats_pid=$!
trap 'kill "$nats_pid" 2>/dev/null || true' EXIT
up=""
for _ in $(seq 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then up=1; break; fi
  sleep 0.1
done
if [ -z "$up" ]; then
  echo "ERROR: nats-server did not start on port $port; its log:" >&2
  cat "$work/nats-server.log" >&2
  exit 1
fi

export TALLY_NATS_URL="nats://127.0.0.1:$port"
export TALLY_DATA_DIR="$work/data"
export RUST_LOG="${RUST_LOG:-warn}"

echo "== nats-server on $TALLY_NATS_URL, store $work/jetstream"
echo "== generating $tenants tenants x $months months of SaaS events"
"$tally" generate --tenants "$tenants" --months "$months" --seed 42 >"$work/events.jsonl"
echo "== publishing"
"$tally" publish "$work/events.jsonl"
echo "== tally run --until-idle"
"$tally" run --until-idle
echo "== tally status"
"$tally" status
echo "== events per month and family"
"$tally" sql "SELECT date_trunc('month', time) AS month,
                     count(*) FILTER (WHERE type = 'usage.recorded') AS usage,
                     count(*) FILTER (WHERE type LIKE 'subscription.%') AS subscription,
                     count(*) FILTER (WHERE type LIKE 'invoice.%') AS invoice,
                     count(*) FILTER (WHERE type LIKE 'auth.%' OR type LIKE 'org.%') AS auth_and_org,
                     count(*) AS all_events
              FROM events GROUP BY 1 ORDER BY 1"
echo "== daily api_calls of the last days (usage view)"
"$tally" sql "SELECT window_start AS day, count(DISTINCT tenant) AS tenants, sum(sum) AS api_calls
              FROM usage WHERE granularity = 'day' AND metric = 'api_calls'
              GROUP BY window_start ORDER BY window_start DESC LIMIT 5"
echo "== tenants over their plan in the last month (overages view)"
"$tally" sql "SELECT tenant, period, metric, plan, used, included, overage_amount, currency, threshold
              FROM overages WHERE overage_quantity > 0 AND period = (SELECT max(period) FROM overages)
              ORDER BY overage_amount DESC NULLS LAST, tenant LIMIT 8"
echo "== busiest tenants"
"$tally" sql "SELECT tenant, count(*) AS events, min(time) AS first_seen, max(time) AS last_seen
              FROM events WHERE tenant <> '_system' GROUP BY tenant ORDER BY events DESC, tenant LIMIT 5"
echo
echo "Views are in $TALLY_DATA_DIR. The server stops now; to query again:"
echo "  TALLY_DATA_DIR=$TALLY_DATA_DIR $tally sql \"SELECT type, count(*) FROM events GROUP BY type\""
