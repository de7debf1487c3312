#!/usr/bin/env bash
# A real two-node Ray cluster on one machine: a head node and a second worker node, each with its own
# resources (Ray treats them as separate nodes: separate raylets and object stores).
#
#   cluster/local.sh start     # prints the address; also written to $STEMQA_CLUSTER_DIR/address
#   cluster/local.sh status
#   cluster/local.sh stop
#
# Settings (env): STEMQA_CLUSTER_DIR (/tmp/stemqa-cluster), STEMQA_RAY_PORT (6390),
# STEMQA_DASHBOARD_PORT (8266), STEMQA_HEAD_CPUS (1), STEMQA_WORKER_CPUS (1), STEMQA_OBJECT_STORE_MB (1024).
# Everything binds 127.0.0.1; the dashboard is not exposed beyond this machine.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RAY="${RAY:-$here/.venv/bin/ray}"
[ -x "$RAY" ] || RAY="$(command -v ray)"
dir="${STEMQA_CLUSTER_DIR:-/tmp/stemqa-cluster}"
port="${STEMQA_RAY_PORT:-6390}"
dash="${STEMQA_DASHBOARD_PORT:-8266}"
head_cpus="${STEMQA_HEAD_CPUS:-1}"
worker_cpus="${STEMQA_WORKER_CPUS:-1}"
store=$(( ${STEMQA_OBJECT_STORE_MB:-1024} * 1024 * 1024 ))
addr="127.0.0.1:$port"
export RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2 RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 \
       TOKENIZERS_PARALLELISM=false

start() {
  mkdir -p "$dir"
  if "$RAY" status --address "$addr" >/dev/null 2>&1; then
    echo "$addr"; echo "$addr" > "$dir/address"; return 0
  fi
  "$RAY" start --head --node-ip-address 127.0.0.1 --port "$port" --num-cpus "$head_cpus" \
    --object-store-memory "$store" --dashboard-host 127.0.0.1 --dashboard-port "$dash" \
    --ray-client-server-port "$((port + 1))" --min-worker-port 20000 --max-worker-port 20999 \
    --resources '{"head": 1}' --temp-dir "$dir/ray" --disable-usage-stats >"$dir/head.log" 2>&1 \
    || { cat "$dir/head.log" >&2; exit 1; }
  "$RAY" start --address "$addr" --node-ip-address 127.0.0.1 --num-cpus "$worker_cpus" \
    --object-store-memory "$store" --min-worker-port 21000 --max-worker-port 21999 \
    --resources '{"worker_node": 1}' --disable-usage-stats >"$dir/worker.log" 2>&1 \
    || { cat "$dir/worker.log" >&2; exit 1; }
  # wait until both nodes are registered
  for _ in $(seq 1 60); do
    n=$("$RAY" list nodes --address "$addr" --filter "state=ALIVE" --format json 2>/dev/null | grep -o '"node_id"' | wc -l || true)
    [ "${n:-0}" -ge 2 ] && break
    sleep 1
  done
  echo "$addr" > "$dir/address"
  echo "http://127.0.0.1:$dash" > "$dir/dashboard"
  echo "$addr"
}

cluster_pids() {
  # This cluster's processes: those naming its temp dir or its ports, and all their descendants.
  local roots all=""
  roots=$(pgrep -f "$dir/ray|:$port( |$)|--port=$((port + 1))( |$)|--dashboard-port=$dash" || true)
  while [ -n "$roots" ]; do
    all="$all $roots"
    roots=$(for p in $roots; do pgrep -P "$p" || true; done)
  done
  echo $all
}

stop() {
  local pids
  pids=$(cluster_pids)
  [ -n "$pids" ] && kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 20); do [ -z "$(cluster_pids)" ] && break; sleep 0.5; done
  pids=$(cluster_pids)
  [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
  rm -f "$dir/address" "$dir/dashboard"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) "$RAY" status --address "$addr" ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
