# Sourced by e2e/run.sh (uses its check, wait_for, has_line, pids, ART, NODE).
# The gateway and a robot node with Mosquitto as the external broker (users bring their
# own broker), and the fault tests: node killed, broker restarted under a stream of
# commands, gateway restarted under an open page, overload.

GATEWAY=${GATEWAY_BIN:-$ROOT/target/debug/fleet-gateway}
MOSQ_PORT=${E2E_MOSQUITTO_PORT:-18834}
MOSQ_HTTP=${E2E_MOSQUITTO_HTTP_PORT:-18092}
MOSQ_BASE=http://127.0.0.1:$MOSQ_HTTP
cat >"$ART/mosquitto.conf" <<EOF
listener $MOSQ_PORT 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 100000
EOF
start_mosquitto() {
  mosquitto -c "$ART/mosquitto.conf" >>"$ART/mosquitto.log" 2>&1 &
  MOSQ_PID=$!
  pids+=($MOSQ_PID)
  wait_for 10 mosquitto_pub -p $MOSQ_PORT -t e2e/probe -n
}
start_mosq_node() {
  "$NODE" --robot linus --broker 127.0.0.1:$MOSQ_PORT --metrics-addr off --hold-ms 500 \
    --gateway-url "$MOSQ_BASE/" >>"$ART/mosquitto-node.log" 2>&1 &
  MOSQ_NODE=$!
  pids+=($MOSQ_NODE)
}
start_mosq_gateway() {
  "$GATEWAY" --http-addr 127.0.0.1:$MOSQ_HTTP --broker 127.0.0.1:$MOSQ_PORT --robots linus \
    --probe-interval-s 1 --probe-timeout-ms 500 --rate-limit 10000 --rate-burst 10000 \
    >>"$ART/mosquitto-gateway.log" 2>&1 &
  MOSQ_GATEWAY=$!
  pids+=($MOSQ_GATEWAY)
  wait_for 20 curl -fsS "$MOSQ_BASE/readyz" -o /dev/null
}
start_mosquitto
mosquitto_sub -p $MOSQ_PORT -V mqttv311 -v -t 'fleet/#' -t 'homeassistant/#' >"$ART/mosquitto-sub.txt" 2>&1 &
pids+=($!)
start_mosq_node
start_mosq_gateway
linus_online_in_gateway() { curl -fsS "$MOSQ_BASE/api/robots/linus" | grep -q "\"online\":$1"; }
check "Mosquitto as the broker: linus comes online (retained status, 3.1.1 subscriber)" \
  wait_for 20 has_line "$ART/mosquitto-sub.txt" '^fleet/linus/status online'
mosquitto_command() {
  curl -fsS -X POST -d '{"direction":"forward"}' "$MOSQ_BASE/api/robots/linus/commands/drive?wait=true" |
    grep -q '"status":"ok"'
}
check "... a gateway command gets the node's result back (MQTT 5 response topic)" wait_for 10 mosquitto_command
check "... the state reaches a 3.1.1 subscriber" \
  wait_for 10 has_line "$ART/mosquitto-sub.txt" '^fleet/linus/state .*"motion":"forward"'
check "... Home Assistant discovery is retained" \
  bash -c "mosquitto_sub -p $MOSQ_PORT -C 1 -W 5 -t homeassistant/device/fleet_linus/config >/dev/null"

# kill -9: the broker publishes the last will within 1.5 x keep-alive (5 s).
kill -9 $MOSQ_NODE
killed_at=$(date +%s.%N)
check "kill -9 the node: its status turns offline within 1.5 x keep-alive" \
  wait_for 12 has_line "$ART/mosquitto-sub.txt" '^fleet/linus/status offline'
offline_after=$(python3 -c "import time; print(round(time.time() - $killed_at, 2))")
echo "     (offline after ${offline_after} s; keep-alive 5 s)"
check "... within 7.5 s (+0.5 s for the test's polling)" \
  python3 -c "import sys; sys.exit(0 if $offline_after <= 8.0 else 1)"
check "... the gateway shows it offline" wait_for 5 linus_online_in_gateway false
start_mosq_node
check "... it comes back by itself on restart" wait_for 20 linus_online_in_gateway true

# The broker restarts while commands stream at QoS 1: every request gets exactly one
# answer (the result, or a clear 503/504), no result twice, and it all works afterwards.
python3 e2e/load.py stream "$MOSQ_BASE" linus 20 8 "$ART/stream-broker-restart.json" \
  >"$ART/stream-broker-restart.log" 2>&1 &
STREAM=$!
sleep 2
kill -TERM $MOSQ_PID
wait $MOSQ_PID 2>/dev/null || true
sleep 1
start_mosquitto
check "broker restarted under a command stream: every command answered once, none twice" wait $STREAM
cat "$ART/stream-broker-restart.log"
check "... and the fleet works again once the node and gateway have reconnected" wait_for 20 mosquitto_command

# The gateway restarts under an open page: the live stream reconnects; nothing is re-sent.
# (the old gateway's prober sends pings: count drive commands only)
commands_before=$(grep -c '^fleet/linus/cmd/drive ' "$ART/mosquitto-sub.txt" || true)
cat >"$ART/restart-gateway.sh" <<EOF
kill -TERM \$(cat "$ART/mosquitto-gateway.pid"); sleep 0.5
EOF
echo $MOSQ_GATEWAY >"$ART/mosquitto-gateway.pid"
restart_gateway_under_page() {
  RESTART="bash $ART/restart-gateway.sh; $GATEWAY --http-addr 127.0.0.1:$MOSQ_HTTP --broker 127.0.0.1:$MOSQ_PORT --robots linus --probe-interval-s 0 >>$ART/mosquitto-gateway.log 2>&1 & sleep 0.2; for i in \$(seq 100); do curl -fsS $MOSQ_BASE/readyz -o /dev/null && break; sleep 0.1; done" \
    DRIVE="mosquitto_pub -p $MOSQ_PORT -t fleet/linus/cmd/drive -m backward" \
    BASE="$MOSQ_BASE" ART="$ART" node e2e/reconnect.mjs
}
check "gateway restarted under an open page: its live stream reconnects (chromium)" restart_gateway_under_page
commands_after=$(grep -c '^fleet/linus/cmd/drive ' "$ART/mosquitto-sub.txt" || true)
check "... and no command was sent twice (only the one test command is new)" \
  test $((commands_after - commands_before)) -eq 1
pkill -f "fleet-gateway --http-addr 127.0.0.1:$MOSQ_HTTP" || true
sleep 0.5
start_mosq_gateway

# Overload: far past the sustainable rate. Refusals are 429/503 at once, the gateway's
# memory stays bounded, and every accepted command is answered by the robot.
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
rss_before=$(rss_kib $MOSQ_GATEWAY)
check "overload: 20,000 commands from 64 threads, each answered (202, or 429/503)" \
  python3 e2e/load.py burst "$MOSQ_BASE" linus 20000 64 "$ART/overload.json"
cat "$ART/overload.json" | tr -d '\n '; echo
rss_after=$(rss_kib $MOSQ_GATEWAY)
echo "     (gateway RSS ${rss_before} KiB before, ${rss_after} KiB after)"
check "... the gateway's memory stays bounded (under 64 MiB more)" test $((rss_after - rss_before)) -lt 65536
all_answered() {
  local metrics published results
  metrics=$(curl -fsS "$MOSQ_BASE/metrics")
  published=$(echo "$metrics" | awk '/^fleet_gateway_commands_published_total\{/ {s += $2} END {print s + 0}')
  results=$(echo "$metrics" | awk '/^fleet_gateway_command_results_total\{/ {s += $2} END {print s + 0}')
  echo "     (published $published, results $results)" >"$ART/overload-answered.txt"
  [[ $published -gt 0 && $results -ge $published ]]
}
check "... every accepted command got its result" wait_for 30 all_answered
cat "$ART/overload-answered.txt"
