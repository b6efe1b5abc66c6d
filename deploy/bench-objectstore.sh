#!/usr/bin/env bash
# Ingest and replay on an s3:// location against the same runs on a local
# directory, and ingest on a 3-node JetStream cluster (R3) against one
# server (R1); each whole command timed as a user would time it.
#
#   bash deploy/bench-objectstore.sh [TALLY_BINARY]
#
# Needs nats-server and SeaweedFS (deploy/install-nats-server.sh,
# deploy/install-seaweedfs.sh; sourced here) and a release-like build
# (`cargo build --profile fast --bin tally`). Everything runs on this
# machine, in a scratch directory, on fixed loopback ports 1842x/2842x.
# Prints one line per measurement.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/install-nats-server.sh >/dev/null
. deploy/install-seaweedfs.sh >/dev/null
TALLY="${1:-${CARGO_TARGET_DIR:-$HOME/.cache/tally-target}/fast/tally}"
work="$(mktemp -d /tmp/tally-bench-s3.XXXXXX)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1
export AWS_ENDPOINT_URL=http://127.0.0.1:18420 AWS_ALLOW_HTTP=true RUST_LOG=warn
mkdir -p "$work/weed/data" "$work/weed/logs"
"$WEED_BIN" -logdir="$work/weed/logs" mini -dir="$work/weed/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
  -master.telemetry=false -admin.ui=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 \
  -s3.autoCreateBucket=false -master.volumeSizeLimitMB=64 \
  -s3.port=18420 -s3.port.grpc=28420 -master.port=18421 -master.port.grpc=28421 \
  -volume.port=18422 -volume.port.grpc=28422 -filer.port=18423 -filer.port.grpc=28423 \
  -admin.port=18424 -admin.port.grpc=28424 -webdav.port=18425 >"$work/weed.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  curl -sf -o /dev/null --aws-sigv4 "aws:amz:us-east-1:s3" --user bench:bench-secret http://127.0.0.1:18420/ && break
  sleep 0.2
done
curl -sf -o /dev/null --aws-sigv4 "aws:amz:us-east-1:s3" --user bench:bench-secret -X PUT http://127.0.0.1:18420/bench

start_nats() { # name port [cluster routes...]
  local name=$1 port=$2; shift 2
  "$NATS_SERVER_BIN" -js -a 127.0.0.1 -p "$port" -sd "$work/$name" -n "$name" "$@" >"$work/$name.log" 2>&1 &
  pids+=($!)
}
seconds() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>"$work/last.err" || { cat "$work/last.err" >&2; exit 1; }; e=$(date +%s.%N); echo "$e - $s" | bc; }

measure() { # label events-file
  local label=$1 file=$2
  export TALLY_NATS_URL=nats://127.0.0.1:18430
  start_nats "r1-$label" 18430; sleep 1
  "$TALLY" publish "$file" >/dev/null
  local n; n=$("$TALLY" --data "$work/none" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"]["stream_last_seq"])' || true)
  local tl ts rl rs
  tl=$(seconds "$TALLY" --data "$work/local-$label" run --until-idle)
  ts=$(seconds "$TALLY" --data "s3://bench/$label" run --until-idle)
  rl=$(seconds "$TALLY" --data "$work/local-$label" replay)
  rs=$(seconds "$TALLY" --data "s3://bench/$label" replay)
  local views; views=$(du -sb "$work/local-$label/views" | cut -f1)
  echo "$label: $n messages; run local ${tl}s s3 ${ts}s; replay local ${rl}s s3 ${rs}s; views ${views} bytes"
  # Per batch: the push's own time, from its debug line.
  RUST_LOG=tally::store::remote=debug "$TALLY" --data "s3://bench/$label-batches" run --until-idle 2>&1 \
    | sed 's/\x1b\[[0-9;]*m//g' | { grep -o ' ms=[0-9]*' || true; } | cut -d= -f2 | awk -v l="$label" '{s+=$1; n++} END {if (n) printf "%s: %d pushes, %.1f ms each on average\n", l, n, s/n}'
  kill -9 "${pids[-1]}"; unset 'pids[-1]'; sleep 0.5
}

"$TALLY" generate --tenants "${BENCH_TENANTS:-300}" --months 12 --seed 7 >"$work/small.jsonl"
"$TALLY" generate --tenants "${BENCH_MANY_TENANTS:-10000}" --months 24 --seed 7 --no-activity >"$work/many.jsonl"
measure small "$work/small.jsonl"
measure many "$work/many.jsonl"

# R3 on a 3-node cluster against R1 on one server, the same events.
routes="nats-route://127.0.0.1:18441,nats-route://127.0.0.1:18442,nats-route://127.0.0.1:18443"
for i in 1 2 3; do start_nats "c$i" "1843$((i + 1))" --cluster_name bench --cluster "nats://127.0.0.1:1844$i" --routes "$routes"; done
export TALLY_NATS_URL=nats://127.0.0.1:18432,nats://127.0.0.1:18433,nats://127.0.0.1:18434
# The cluster elects its JetStream meta leader first.
for _ in $(seq 60); do "$TALLY" --replicas 3 publish "$work/small.jsonl" >/dev/null 2>&1 && break; sleep 1; done
t3=$(seconds "$TALLY" --replicas 3 --data "$work/r3" run --until-idle)
echo "small on an R3 cluster: run ${t3}s"
