#!/usr/bin/env bash
# A real two-node Ray cluster on one machine: a head node and a second worker node, each with its own
# resources (Ray treats them as separate nodes: separate raylets and object stores).
#
#   cluster/local.sh start     # prints the address; also written to $STEMQA_CLUSTER_DIR/address
#   cluster/local.sh status
#   cluster/local.sh stop
#   cluster/local.sh stop-worker   # stop only the worker node (fault-tolerance tests); start-worker brings it back
#
# Settings (env): STEMQA_CLUSTER_DIR (/tmp/stemqa-cluster), STEMQA_RAY_PORT (6390),
# STEMQA_DASHBOARD_PORT (8266), STEMQA_HEAD_CPUS (1), STEMQA_WORKER_CPUS (1), STEMQA_OBJECT_STORE_MB (1024).
# STEMQA_RAY_AUTH (token): Ray 2.60 token authentication with a token of this cluster's own; 'disabled' turns it
# off (tests on an isolated machine only).
# Everything binds 127.0.0.1 where Ray lets it (the dashboard is not exposed beyond this machine; the GCS port
# listens on all interfaces, which is why the token is on by default).
#
# Clients (ray CLI, ray.init, JobSubmissionClient) need the auth settings: `source $STEMQA_CLUSTER_DIR/env`
# (written by start), or load its KEY=VALUE lines; `stemqa submit` does that for the local cluster.
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
# Jobs run `python ...`: make that the project's venv (the raylets and job supervisors inherit this PATH).
[ -x "$here/.venv/bin/python" ] && export PATH="$here/.venv/bin:$PATH"
auth="${STEMQA_RAY_AUTH:-token}"
# Several clusters (and private ray.init instances) share this machine: every port a node opens is derived from
# STEMQA_RAY_PORT, since Ray's fixed defaults (dashboard agent 52365, ...) collide across instances and a node
# whose agent cannot bind never accepts jobs ("No available agent to submit job").
# Head: port (GCS), +1 client server, +3..+6 agents/metrics; worker node: +2 node manager, +7..+10.
# Worker processes: 1000 ports from STEMQA_WORKER_PORT_BASE, first half for the head, second for the worker.
wbase="${STEMQA_WORKER_PORT_BASE:-$(( 20000 + (port / 10 % 40) * 1000 ))}"
worker_nm_port=$((port + 2))  # fixed, so stop-worker can find the worker node's raylet
# On a loaded machine a raylet can take over a minute to register (Ray's default wait is 60 s, then it gives up)
export RAY_raylet_start_wait_time_s="${RAY_raylet_start_wait_time_s:-300}"
export RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2 RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 \
       TOKENIZERS_PARALLELISM=false

setup_auth() {
  # Both nodes and every client must agree: with a token in ~/.ray/auth_token (Ray's ray.init writes one) a head
  # started with RAY_AUTH_MODE unset turns token auth on, while `ray start --address` does not, and the worker
  # node is then refused (InvalidAuthToken). So the mode is always explicit, and the token is this cluster's.
  if [ "$auth" = "token" ]; then
    [ -s "$dir/auth_token" ] || { (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$dir/auth_token"); }
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$dir/auth_token"
  else
    export RAY_AUTH_MODE=disabled
    unset RAY_AUTH_TOKEN_PATH
  fi
  unset RAY_AUTH_TOKEN
  { echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE"
    [ "$auth" = "token" ] && echo "export RAY_AUTH_TOKEN_PATH=$dir/auth_token"; true; } > "$dir/env"
}

start() {
  mkdir -p "$dir"
  setup_auth
  if "$RAY" status --address "$addr" >/dev/null 2>&1; then
    echo "$addr"; echo "$addr" > "$dir/address"; return 0
  fi
  "$RAY" start --head --node-ip-address 127.0.0.1 --port "$port" --num-cpus "$head_cpus" \
    --object-store-memory "$store" --dashboard-host 127.0.0.1 --dashboard-port "$dash" \
    --ray-client-server-port "$((port + 1))" --min-worker-port "$wbase" --max-worker-port "$((wbase + 499))" \
    --dashboard-agent-listen-port "$((port + 3))" --dashboard-agent-grpc-port "$((port + 4))" \
    --runtime-env-agent-port "$((port + 5))" --metrics-export-port "$((port + 6))" \
    --resources '{"head": 1}' --temp-dir "$dir/ray" --disable-usage-stats >"$dir/head.log" 2>&1 \
    || { cat "$dir/head.log" >&2; exit 1; }
  start_worker
  # `ray start` returns once the GCS has registered its node, so both nodes are in; this only confirms it
  # through the dashboard's state API, briefly (curl is cheap; `ray list nodes` costs a Python start-up, 8+ s
  # each on a loaded 2-CPU machine, where the dashboard may also answer late)
  local deadline=$(( $(date +%s) + ${STEMQA_START_TIMEOUT_S:-30} )) n=0 hdr=()
  [ "$auth" = "token" ] && hdr=(-H "Authorization: Bearer $(cat "$dir/auth_token")")
  while [ "$(date +%s)" -lt "$deadline" ]; do
    n=$(curl -s -m 5 "${hdr[@]}" "http://127.0.0.1:$dash/api/v0/nodes?limit=100" 2>/dev/null \
        | grep -o '"state": *"ALIVE"' | wc -l || true)
    [ "${n:-0}" -ge 2 ] && break
    sleep 1
  done
  [ "${n:-0}" -ge 2 ] || echo "note: the dashboard did not list 2 alive nodes within ${STEMQA_START_TIMEOUT_S:-30} s" >&2
  echo "$addr" > "$dir/address"
  echo "http://127.0.0.1:$dash" > "$dir/dashboard"
  echo "$addr"
}

start_worker() {
  "$RAY" start --address "$addr" --node-ip-address 127.0.0.1 --num-cpus "$worker_cpus" \
    --object-store-memory "$store" --min-worker-port "$((wbase + 500))" --max-worker-port "$((wbase + 999))" \
    --node-manager-port "$worker_nm_port" --dashboard-agent-listen-port "$((port + 7))" \
    --dashboard-agent-grpc-port "$((port + 8))" --runtime-env-agent-port "$((port + 9))" \
    --metrics-export-port "$((port + 10))" --temp-dir "$dir/rw" \
    --resources '{"worker_node": 1}' --disable-usage-stats >"$dir/worker.log" 2>&1 \
    || { cat "$dir/worker.log" >&2; exit 1; }
}

tree_pids() {  # the given pids and all their descendants
  local roots="$*" all=""
  while [ -n "$roots" ]; do
    all="$all $roots"
    roots=$(for p in $roots; do pgrep -P "$p" || true; done)
  done
  echo $all
}

stop_worker() {
  # The worker node = its raylet (found by its fixed node-manager port) and everything the raylet started
  # (workers, agents). SIGTERM lets the raylet tell the GCS it is leaving, so Ray sees the node dead at once.
  local pids
  pids=$(tree_pids $(pgrep -f "raylet .*--node_manager_port=$worker_nm_port( |$)" || true))
  [ -z "$pids" ] && { echo "no worker node running on node-manager port $worker_nm_port" >&2; return 1; }
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 20); do
    alive=$(for p in $pids; do if kill -0 "$p" 2>/dev/null; then echo "$p"; fi; done)
    [ -z "$alive" ] && break
    sleep 0.5
  done
  if [ -n "${alive:-}" ]; then kill -KILL $alive 2>/dev/null || true; fi
  echo "worker node stopped"
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
  rm -f "$dir/address" "$dir/dashboard" "$dir/env" "$dir/auth_token"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  stop-worker) stop_worker ;;
  start-worker) setup_auth; start_worker; echo "$addr" ;;
  status) setup_auth; "$RAY" status --address "$addr" ;;
  *) echo "usage: $0 start|stop|status|stop-worker|start-worker" >&2; exit 2 ;;
esac
