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
echo "== MRR waterfall (queries/mrr_waterfall.sql over the mrr view)"
"$tally" sql "SELECT month, currency, mrr_start, new_mrr, expansion_mrr, reactivation_mrr,
                     contraction_mrr, churned_mrr, mrr_end, paying_tenants
              FROM mrr_waterfall ORDER BY currency, month"
echo "== churn and LTV of the last months (queries/churn.sql, queries/ltv.sql)"
"$tally" sql "SELECT c.month, c.currency, c.customers_start, c.customers_churned,
                     round(c.logo_churn_rate, 4) AS logo_churn, round(c.net_mrr_churn_rate, 4) AS net_mrr_churn,
                     round(c.nrr, 4) AS nrr, round(l.arpa / 100, 2) AS arpa, round(l.ltv / 100, 2) AS ltv
              FROM churn c JOIN ltv l ON l.month = c.month AND l.currency = c.currency
              WHERE c.currency = 'USD' ORDER BY c.month DESC LIMIT 6"
echo "== top tenants by MRR (queries/top_tenants.sql over the tenants view)"
"$tally" sql "SELECT rank, tenant, name, plan, billing_cycle, mrr, currency FROM top_tenants
              WHERE currency = 'USD' ORDER BY rank LIMIT 5"
echo "== over quota this billing period (queries/over_quota.sql over the overages view)"
"$tally" sql "SELECT tenant, metric, plan, used, included, overage_amount, currency
              FROM over_quota ORDER BY overage_amount DESC NULLS LAST, tenant LIMIT 8"
echo "== open invoices: anniversary-billed tenants' periods (queries/invoice_preview.sql)"
"$tally" sql "SELECT tenant, period_start, period_end, metric, aggregation, used, included
              FROM invoice_preview WHERE period_start <> date_trunc('month', period_start)
              ORDER BY tenant, metric LIMIT 6"
echo "== api_calls by region, per month (queries/usage_by_region.sql over usage_by_dimension)"
"$tally" sql "SELECT \"group\", window_start, events, total, tenants FROM usage_by_region
              ORDER BY window_start DESC, \"group\" LIMIT 6"
echo "== daily api_calls of the last days (usage view)"
"$tally" sql "SELECT window_start AS day, count(DISTINCT tenant) AS tenants, sum(sum) AS api_calls
              FROM usage WHERE granularity = 'day' AND metric = 'api_calls'
              GROUP BY window_start ORDER BY window_start DESC LIMIT 5"
echo "== corrections: voided events (counted nowhere but the archive) and what they hit"
"$tally" sql "SELECT tenant, target_id, reason, targets FROM corrections ORDER BY stream_seq DESC LIMIT 5"
echo "== restatements: final numbers that changed after a billing job could have used them"
"$tally" sql "SELECT view, cause, count(*) AS rows, count(DISTINCT tenant) AS tenants
              FROM restatements GROUP BY view, cause ORDER BY view, cause"
echo "== tally replay: every view rebuilt from the stream, then switched atomically"
before="$("$tally" sql --format csv "SELECT * FROM mrr ORDER BY month, tenant, currency" | cksum)"
"$tally" replay
after="$("$tally" sql --format csv "SELECT * FROM mrr ORDER BY month, tenant, currency" | cksum)"
if [ "$before" = "$after" ]; then echo "mrr after replay: identical rows"; else echo "ERROR: mrr differs after replay" >&2; exit 1; fi

echo "== tally serve: the views for psql, drivers, BI tools and Flight SQL"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
pg_port="$(free_port)"; flight_port="$(free_port)"; http_port="$(free_port)"
password="$(python3 -c 'import secrets; print(secrets.token_urlsafe(12))')"
export TALLY_USERS_FILE="$work/tally-users.toml"
TALLY_PASSWORD="$password" "$tally" users add analyst --all-tenants
TALLY_PASSWORD="$password-acme" "$tally" users add t0001 --tenant t0001
RUST_LOG=info "$tally" serve --pg-listen "127.0.0.1:$pg_port" --flight-listen "127.0.0.1:$flight_port" \
  --http-listen "127.0.0.1:$http_port" >"$work/serve.log" 2>&1 &
# (tally serve's HTTP listener carries the dashboard, /healthz and /metrics.)
serve_pid=$!
trap 'kill "$serve_pid" 2>/dev/null || true; kill "$nats_pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$pg_port") 2>/dev/null; then break; fi
  sleep 0.1
done
dsn="host=127.0.0.1 port=$pg_port dbname=tally user=analyst"
if command -v psql >/dev/null 2>&1; then
  echo "== psql: the MRR waterfall over the Postgres wire protocol"
  PGPASSWORD="$password" psql "$dsn" -X -c "SELECT month, currency, mrr_start, new_mrr, churned_mrr, mrr_end FROM mrr_waterfall WHERE currency = 'USD' ORDER BY month DESC LIMIT 3"
  echo "== psql as tenant t0001 (an account scoped to one tenant sees only its rows)"
  PGPASSWORD="$password-acme" psql "host=127.0.0.1 port=$pg_port dbname=tally user=t0001" -X -c "SELECT tenant, count(*) AS usage_rows FROM usage GROUP BY tenant"
fi
echo
echo "tally serve is up (log: $work/serve.log). Connect with:"
echo "  psql:        PGPASSWORD='$password' psql \"$dsn\""
echo "  Python:      psycopg.connect(\"$dsn password=$password\")"
echo "  JDBC:        jdbc:postgresql://127.0.0.1:$pg_port/tally  (user analyst, password $password)"
echo "  Flight SQL:  grpc://127.0.0.1:$flight_port  (ADBC: username analyst, password $password)"
echo "  Health:      curl http://127.0.0.1:$http_port/healthz"
echo "  Dashboard:   http://127.0.0.1:$http_port/   (log in as analyst, password $password)"
echo "  Tenant page: http://127.0.0.1:$http_port/tenants/t0001   (as t0001, password $password-acme)"
echo "  Tenant t0001 logs in as user t0001, password $password-acme, and sees only its own rows."
echo "Views are in $TALLY_DATA_DIR; accounts in $TALLY_USERS_FILE."
if [ -t 0 ]; then
  echo "Serving until Ctrl-C."
  wait "$serve_pid" || true
else
  echo "(not a terminal: stopping the server and nats-server now)"
fi
