#!/usr/bin/env bash
# Start the local stack: store service, demo orders service, Envoy with the idempotency filter.
# Run through `make run` (which builds first). Ctrl-C stops everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY="${ENVOY:-.venv/bin/envoy}"
STORE="${STORE:-embedded}"
STORE_TOKEN="${STORE_TOKEN:-dev-token}"   # must match store_token in envoy/envoy.yaml
LOG_DIR="${LOG_DIR:-data/logs}"
mkdir -p "$LOG_DIR"

for port in 8080 8081 8082 9901 10000; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "error: 127.0.0.1:$port is already in use; stop whatever listens there first." >&2
    exit 1
  fi
done

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo
  echo "stopping..."
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped."
}
trap 'cleanup; exit 0' INT TERM
trap cleanup EXIT

# 8082: the replay listener (gRPC replays, ticket-checked, nothing else): envoy.yaml's replay route.
store_args=(--listen 127.0.0.1:8081 --replay-listen 127.0.0.1:8082 --token "$STORE_TOKEN" --log-format text)
case "$STORE" in
  embedded) store_args+=(--storage embedded --data-path data/idempotency) ;;
  mongodb)
    if [ -z "${MONGODB_URI:-}" ]; then
      echo "error: STORE=mongodb needs MONGODB_URI, e.g. make run STORE=mongodb MONGODB_URI=mongodb://127.0.0.1:27017" >&2
      exit 1
    fi
    store_args+=(--storage mongodb --mongodb-uri "$MONGODB_URI") ;;
  *) echo "error: STORE must be embedded or mongodb, not '$STORE'" >&2; exit 1 ;;
esac

target/release/idempotency-store "${store_args[@]}" >"$LOG_DIR/store.log" 2>&1 &
pids+=($!)
target/release/demo-orders --listen 127.0.0.1:8080 --executions-log data/executions.jsonl >"$LOG_DIR/demo.log" 2>&1 &
pids+=($!)
"$ENVOY" -c envoy/envoy.yaml --concurrency 1 --disable-hot-restart --log-level warn \
  --component-log-level wasm:info >"$LOG_DIR/envoy.log" 2>&1 &
pids+=($!)

wait_for() { # name url
  for _ in $(seq 1 200); do
    if curl -fsS -o /dev/null "$2" 2>/dev/null; then return 0; fi
    for pid in "${pids[@]}"; do
      if ! kill -0 "$pid" 2>/dev/null; then
        echo "error: a process exited during start-up; logs in $LOG_DIR:" >&2
        tail -n 20 "$LOG_DIR"/*.log >&2
        exit 1
      fi
    done
    sleep 0.1
  done
  echo "error: $1 did not become ready at $2; logs in $LOG_DIR" >&2
  exit 1
}
wait_for "store service" http://127.0.0.1:8081/readyz
wait_for "demo orders service" http://127.0.0.1:8080/healthz
wait_for "Envoy" http://127.0.0.1:9901/ready

cat <<EOT

Running (logs in $LOG_DIR/):
  Envoy + idempotency filter  http://127.0.0.1:10000   (admin http://127.0.0.1:9901, stats at /stats/prometheus)
  demo orders service         http://127.0.0.1:8080    (executions: GET /_demo/executions)
  store service ($STORE)   http://127.0.0.1:8081    (/healthz /readyz /metrics; /v1 needs "Authorization: Bearer $STORE_TOKEN")
                            http://127.0.0.1:8082    (replays only: Envoy's replay route leads here)

Try it (run it twice: the second answer is replayed, with Idempotent-Replayed: true):
  curl -i -X POST http://127.0.0.1:10000/api/v1/orders -H 'Idempotency-Key: order-123' -H 'Content-Type: application/json' -d '{"customerId":"CUST-001","items":[{"sku":"SKU-001","quantity":2}]}'
  curl -s http://127.0.0.1:8080/_demo/executions

Ctrl-C stops everything.
EOT

# Exit (and clean up) as soon as any process dies, or on Ctrl-C.
wait -n "${pids[@]}" || true
# Ctrl-C reaches the children too, and one of them may exit before this shell runs its trap:
# give the trap that moment, so a Ctrl-C is not reported as a process dying.
sleep 0.2
echo "a process exited; see $LOG_DIR/" >&2
