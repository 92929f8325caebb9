#!/usr/bin/env bash
# Click to result: HTTP POST ...?wait=true -> fleet-gateway -> fleet-broker -> robot-node ->
# result -> HTTP response, every part its own release process on loopback.
# Latency p50/p99/p99.9 at 100 and 1,000 commands/s, then rising rates until the path
# stops keeping up: the maximum sustainable rate is the highest one at which every
# command got its result, the achieved rate was at least 98 % of the offered one and p99
# stayed under 10 ms.
#
# Then the same gateway and node with Mosquitto as the broker, at 100 and 1,000/s, as the
# reference. Usage: bench/click-to-result.sh [seconds-per-rate]      (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RATE=${1:-10}
MQTT=${CLICK_MQTT_PORT:-18861}
HTTP=${CLICK_HTTP_PORT:-18862}
OUT=${CLICK_OUT:-/tmp/click-to-result}
rm -rf "$OUT" && mkdir -p "$OUT"
cargo build --release -p fleet-broker -p robot-node -p fleet-gateway --quiet
cargo build --release -p fleet-gateway --example click_load --quiet
BIN=target/release

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
"$BIN/fleet-broker" --mqtt-addr 127.0.0.1:$MQTT --ws-addr off --metrics-addr 127.0.0.1:19161 \
  --allow-anonymous >"$OUT/broker.log" 2>&1 &
BROKER=$!
pids+=($BROKER)
sleep 0.5
start_path() { # the node and the gateway, on whichever broker listens on $MQTT
  "$BIN/robot-node" --robot linus --broker 127.0.0.1:$MQTT --metrics-addr off >>"$OUT/node.log" 2>&1 &
  NODE=$!
  # The per-client rate limit would refuse a load generator long before the path is full.
  "$BIN/fleet-gateway" --http-addr 127.0.0.1:$HTTP --broker 127.0.0.1:$MQTT --robots linus \
    --probe-interval-s 0 --rate-limit 1000000 --rate-burst 1000000 >>"$OUT/gateway.log" 2>&1 &
  GATEWAY=$!
  pids+=($NODE $GATEWAY)
  until curl -fsS "http://127.0.0.1:$HTTP/api/robots/linus" 2>/dev/null | grep -q '"online":true'; do sleep 0.2; done
}
start_path

run() { # run RATE SECONDS
  "$BIN/examples/click_load" "http://127.0.0.1:$HTTP" linus "$1" "$2" | tee -a "$OUT/results.jsonl"
}
echo "== fixed rates (${SECONDS_PER_RATE} s each) =="
run 100 "$SECONDS_PER_RATE"
run 1000 "$SECONDS_PER_RATE"
echo "== rising rates (5 s each) =="
sustained=0
for rate in 2000 3000 4000 5000 6000 8000 10000 12000; do
  line=$(run $rate 5)
  echo "$line"
  if python3 -c '
import json, sys
r = json.loads(sys.argv[1])
ok = r["ok"] == r["sent"] and r["achieved_per_s"] >= 0.98 * r["offered_per_s"] and r["p99_ms"] < 10
sys.exit(0 if ok else 1)' "$line"; then
    sustained=$rate
  else
    break
  fi
done
echo "maximum sustainable rate (of those tried): $sustained commands/s"

# The reference: the same gateway and node, started afresh with Mosquitto as the broker.
echo "== reference: the same path through mosquitto =="
kill $NODE $GATEWAY $BROKER; wait $NODE $GATEWAY $BROKER 2>/dev/null || true
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n' $MQTT >"$OUT/mosquitto.conf"
mosquitto -c "$OUT/mosquitto.conf" >"$OUT/mosquitto.log" 2>&1 &
pids+=($!)
sleep 0.5
start_path
run 100 "$SECONDS_PER_RATE"
run 1000 "$SECONDS_PER_RATE"
