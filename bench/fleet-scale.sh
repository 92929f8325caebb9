#!/usr/bin/env bash
# Fleet scale: N simulated robots (one `robot-node --simulate N` process, each robot with
# its own MQTT connection) on one broker: connect time, broker memory per connection, an
# e-stop on fleet/all/cmd/stop reaching all of them, and steady-state CPU. The same run
# against Mosquitto (Debian's, stock settings plus a listener) is the reference.
#
# Usage: bench/fleet-scale.sh [robots] [idle-seconds]     (defaults: 10000 30)
# SCALE_REPLY_SPREAD_MS (default 1000) is the node's --fleet-reply-spread-ms: the robots
# stop at once and spread their answers over that window.
# Needs: mosquitto, mosquitto-clients, python3. Builds the release binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
ROBOTS=${1:-10000}
IDLE=${2:-30}
PORT=${SCALE_MQTT_PORT:-18851}
OUT=${SCALE_OUT:-/tmp/fleet-scale}
rm -rf "$OUT" && mkdir -p "$OUT"
# Every robot is one socket on each side; the broker and the node each need N fds.
ulimit -n "$(ulimit -Hn)"
((ROBOTS + 100 <= $(ulimit -n))) || { echo "ulimit -n $(ulimit -n) is too low for $ROBOTS robots"; exit 1; }
for tool in mosquitto mosquitto_sub; do
  command -v $tool >/dev/null || { echo "needs $tool (apt-get install mosquitto mosquitto-clients)"; exit 1; }
done
cargo build --release -p fleet-broker -p robot-node --quiet
BIN=target/release
hz=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
count() { grep -c "$1" "$2" 2>/dev/null || true; }

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT

# scenario NAME: the broker is already listening on $PORT as $BROKER_PID.
scenario() {
  local name=$1 dir=$OUT/$1
  mkdir -p "$dir"
  sleep 1
  local broker_rss0; broker_rss0=$(rss_kib "$BROKER_PID")
  # QoS 0 for the observer: its own in-flight window must not be what is measured.
  mosquitto_sub -p "$PORT" -q 0 -F '%U %t %p' -t 'fleet/+/status' -t 'fleet/+/result' -t 'fleet/+/state' \
    -t 'fleet/all/cmd/+' >"$dir/sub.txt" 2>&1 &
  local sub=$!; pids+=($sub)
  sleep 0.5

  local t0; t0=$(date +%s.%N)
  # Warnings only: on a real robot each node logs on its own CPU; here 10,000 robots
  # share two cores, and a log line per command would be most of the work measured.
  RUST_LOG=${SCALE_NODE_LOG:-warn} "$BIN/robot-node" --robot sim --simulate "$ROBOTS" --broker 127.0.0.1:"$PORT" --metrics-addr off \
    --no-discovery --heartbeat-s 30 --fleet-reply-spread-ms "${SCALE_REPLY_SPREAD_MS:-1000}" >"$dir/node.log" 2>&1 &
  local node=$!; pids+=($node)
  until (($(count ' online$' "$dir/sub.txt") >= ROBOTS)); do
    sleep 0.2
    kill -0 $node 2>/dev/null || { echo "$name: robot-node died"; tail "$dir/node.log"; return 1; }
  done
  local connected; connected=$(python3 -c "import time; print(round(time.time() - $t0, 2))")
  sleep 3 # the first states settle
  local broker_rss; broker_rss=$(rss_kib "$BROKER_PID")
  local node_rss; node_rss=$(rss_kib $node)

  # Idle: every robot republishes its state every 30 s (its heartbeat).
  local b0 n0; b0=$(ticks "$BROKER_PID"); n0=$(ticks $node)
  sleep "$IDLE"
  local b1 n1; b1=$(ticks "$BROKER_PID"); n1=$(ticks $node)

  # The e-stop: one publish, every robot answers with a result.
  local results_before; results_before=$(count '/result ' "$dir/sub.txt")
  local t_stop; t_stop=$(date +%s.%N)
  mosquitto_pub -p "$PORT" -q 1 -t fleet/all/cmd/stop -m estop
  local deadline=$((SECONDS + 30))
  until (($(count '/result ' "$dir/sub.txt") - results_before >= ROBOTS)) || ((SECONDS > deadline)); do
    sleep 0.2
  done
  sleep 0.5
  python3 - "$dir/sub.txt" "$t_stop" "$ROBOTS" "$name" "$connected" "$broker_rss0" "$broker_rss" "$node_rss" \
    "$(((b1 - b0) * 1000 / hz))" "$(((n1 - n0) * 1000 / hz))" "$IDLE" <<'PY' | tee "$dir/result.json"
import json, sys
path, t_stop, robots, name, connected, rss0, rss, node_rss, broker_cpu_ms, node_cpu_ms, idle = sys.argv[1:]
t_stop, robots = float(t_stop), int(robots)
# The clock starts when the stop reaches a subscriber like the robots (not when
# mosquitto_pub starts, which spends its own tens of milliseconds connecting).
for line in open(path):
    parts = line.split(" ", 2)
    if len(parts) >= 2 and parts[1] == "fleet/all/cmd/stop" and float(parts[0]) >= t_stop:
        t_stop = float(parts[0])
        break
latencies = []
for line in open(path):
    parts = line.split(" ", 2)
    if len(parts) == 3 and parts[1].endswith("/result") and '"command":"stop"' in parts[2]:
        at = float(parts[0])
        if at >= t_stop:
            latencies.append((at - t_stop) * 1000)
latencies.sort()
# When each robot had carried the stop out: `last_command.at_ms` in the state it published
# after, stamped by the node's own clock (same machine) when it ran the stop, whatever the
# way back to this observer costs (the answers to a fleet-wide command are spread out).
executed = []
for line in open(path):
    parts = line.split(" ", 2)
    if len(parts) == 3 and parts[1].endswith("/state") and '"command":"stop"' in parts[2]:
        try:
            seen = json.loads(parts[2])["last_command"]["at_ms"] / 1000
        except (ValueError, KeyError, TypeError):
            continue
        if seen >= t_stop - 0.001:
            executed.append(max(0.0, (seen - t_stop) * 1000))
executed.sort()
at = lambda xs, q: round(xs[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else None
pick = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else None
print(json.dumps({
    "broker": name, "robots": robots, "connect_all_s": float(connected),
    "broker_rss_kib": int(rss), "broker_kib_per_connection": round((int(rss) - int(rss0)) / robots, 1),
    "node_process_rss_kib": int(node_rss), "node_kib_per_robot": round(int(node_rss) / robots, 1),
    "estop_executed": len(executed), "estop_executed_p50_ms": at(executed, 0.5),
    "estop_executed_p99_ms": at(executed, 0.99), "estop_executed_max_ms": round(executed[-1], 1) if executed else None,
    "estop_results": len(latencies), "estop_result_back_p50_ms": pick(0.5),
    "estop_result_back_p99_ms": pick(0.99),
    "idle_s": int(idle), "broker_cpu_pct_idle": round(int(broker_cpu_ms) / (10 * int(idle)), 1),
    "node_cpu_pct_idle": round(int(node_cpu_ms) / (10 * int(idle)), 1),
}))
PY
  kill -TERM $node 2>/dev/null || true
  wait $node 2>/dev/null || true
  kill $sub 2>/dev/null || true
}

echo "== fleet-broker (anonymous, ACL and per-topic counters on) =="
"$BIN/fleet-broker" --mqtt-addr 127.0.0.1:$PORT --ws-addr off --metrics-addr 127.0.0.1:19151 \
  --allow-anonymous --max-connections 100000 >"$OUT/fleet-broker.log" 2>&1 &
BROKER_PID=$!; pids+=($BROKER_PID)
scenario fleet-broker
kill $BROKER_PID; wait $BROKER_PID 2>/dev/null || true

echo "== mosquitto $(mosquitto -h 2>/dev/null | head -1 | awk '{print $3}') (reference) =="
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\nset_tcp_nodelay true\n' "$PORT" \
  >"$OUT/mosquitto.conf"
mosquitto -c "$OUT/mosquitto.conf" >"$OUT/mosquitto.log" 2>&1 &
BROKER_PID=$!; pids+=($BROKER_PID)
scenario mosquitto
kill $BROKER_PID; wait $BROKER_PID 2>/dev/null || true

python3 - "$OUT/fleet-broker/result.json" "$OUT/mosquitto/result.json" <<'PY'
import json, sys
fleet, mosq = (json.loads(open(p).read().strip().splitlines()[-1]) for p in sys.argv[1:])
print(f"\n{'':28}{'fleet-broker':>14}{'mosquitto':>14}{'ratio':>8}")
for key in ["connect_all_s", "broker_kib_per_connection", "estop_executed", "estop_executed_p50_ms",
            "estop_executed_p99_ms", "estop_executed_max_ms", "estop_results", "estop_result_back_p50_ms",
            "estop_result_back_p99_ms", "broker_cpu_pct_idle", "node_kib_per_robot", "node_cpu_pct_idle"]:
    a, b = fleet[key], mosq[key]
    ratio = f"{a / b:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"
    print(f"{key:28}{a!s:>14}{b!s:>14}{ratio:>8}")
PY
