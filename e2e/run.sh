#!/usr/bin/env bash
# End-to-end suite: the real `fleet` binary, real mosquitto clients (MQTT 3.1.1 and 5),
# curl against the gateway, Debian's chromium driving the web page, the fleet against
# Mosquitto as its broker, and fault tests (e2e/mosquitto.sh).
# Installs what it needs itself. Artifacts (logs, screenshot) go to e2e/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ART=$ROOT/e2e/artifacts
rm -rf "$ART" && mkdir -p "$ART"

# --- what the suite needs -------------------------------------------------------------
need_apt=()
command -v mosquitto_pub >/dev/null || need_apt+=(mosquitto-clients)
command -v mosquitto >/dev/null || need_apt+=(mosquitto)
command -v curl >/dev/null || need_apt+=(curl)
command -v chromium >/dev/null || need_apt+=(chromium)
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v openssl >/dev/null || need_apt+=(openssl)
if ((${#need_apt[@]})); then
  echo "e2e: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
(cd e2e && npm ci --no-audit --no-fund --loglevel=error)
python3 -c 'import opentelemetry.proto' 2>/dev/null ||
  python3 -m pip install -q --disable-pip-version-check opentelemetry-proto

FLEET=${FLEET_BIN:-$ROOT/target/debug/fleet}
NODE=${NODE_BIN:-$ROOT/target/debug/robot-node}
BROKER=${BROKER_BIN:-$ROOT/target/debug/fleet-broker}
[[ -x $FLEET && -x $NODE && -x $BROKER ]] || cargo build --workspace --bins
MQTT_PORT=${E2E_MQTT_PORT:-18831}
WS_PORT=${E2E_WS_PORT:-18083}
HTTP_PORT=${E2E_HTTP_PORT:-18080}
NODE_METRICS_PORT=${E2E_NODE_METRICS_PORT:-19102}
BASE=http://127.0.0.1:$HTTP_PORT

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

passed=0
failed=0
check() { # check NAME COMMAND...: runs a check, counts it, never stops the suite
  local name=$1; shift
  if "$@"; then echo "ok   - $name"; passed=$((passed + 1))
  else echo "FAIL - $name"; failed=$((failed + 1)); fi
}
wait_for() { # wait_for SECONDS COMMAND...: retries until the command succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" 2>/dev/null; do
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
}
has_line() { grep -qE "$2" "$1"; }

# --- the whole fleet in one process ----------------------------------------------------
RUST_LOG=info "$FLEET" --mqtt-addr 127.0.0.1:$MQTT_PORT --ws-addr 127.0.0.1:$WS_PORT \
  --http-addr 127.0.0.1:$HTTP_PORT >"$ART/fleet.log" 2>&1 &
FLEET_PID=$!
pids+=($FLEET_PID)
check "fleet starts and the gateway answers /health" wait_for 60 curl -fsS "$BASE/health" -o /dev/null
check "/health says ok" has_line <(curl -fsS "$BASE/health") '"health":"ok"'
check "fleet-healthcheck (the containers' health check) passes on the gateway" \
  "$ROOT/target/debug/fleet-healthcheck" "127.0.0.1:$HTTP_PORT/readyz"
check "fleet-healthcheck --help explains itself" \
  has_line <("$ROOT/target/debug/fleet-healthcheck" --help) '^Usage: fleet-healthcheck'
check "fleet-healthcheck fails (exit 1) where nothing answers" \
  bash -c "'$ROOT/target/debug/fleet-healthcheck' 127.0.0.1:1/health 2>/dev/null; test \$? = 1"
gateway_without_broker() { # the default log level shows a broker that is not there
  env -u RUST_LOG timeout 3 "$ROOT/target/debug/fleet-gateway" --broker 127.0.0.1:1 --http-addr 127.0.0.1:${E2E_LONELY_HTTP_PORT:-18093} \
    >"$ART/gateway-without-broker.log" 2>&1
  grep -q 'WARN cannot reach the broker, retrying.*broker=127.0.0.1:1' "$ART/gateway-without-broker.log"
}
check "a gateway that cannot reach its broker says so at the default log level" gateway_without_broker
check "fleet --help offers no MQTT credentials (its broker takes none)" \
  bash -c "'$FLEET' --help | grep -q -- --http-addr && ! '$FLEET' --help | grep -q -- --mqtt-username"

# Watchers as a user would run them: MQTT 3.1.1 and MQTT 5, everything under fleet/.
mosquitto_sub -h 127.0.0.1 -p $MQTT_PORT -V mqttv311 -v -t 'fleet/#' >"$ART/sub-v311.txt" 2>&1 &
SUB311=$!; pids+=($SUB311)
mosquitto_sub -h 127.0.0.1 -p $MQTT_PORT -V mqttv5 -F '%t %p %P' -t 'fleet/#' >"$ART/sub-v5.txt" 2>&1 &
SUB5=$!; pids+=($SUB5)
check "both robots are online (retained status)" wait_for 20 has_line "$ART/sub-v311.txt" '^fleet/torvalds/status online'
check "the first probe waited for the robots: none reported down at start-up" \
  wait_for 10 bash -c "curl -fsS '$BASE/metrics' | grep -q '^fleet_robot_up{robot=\"torvalds\"} 1' &&
    ! grep -q 'probe: robots not answering' '$ART/fleet.log'"
check "linus is online" has_line "$ART/sub-v311.txt" '^fleet/linus/status online'

# The README's command: plain text over MQTT 3.1.1.
mosquitto_pub -h 127.0.0.1 -p $MQTT_PORT -V mqttv311 -q 1 -t fleet/linus/cmd/drive -m forward
check "mosquitto_pub drive forward (3.1.1) moves linus, seen by a 3.1.1 subscriber" \
  wait_for 10 has_line "$ART/sub-v311.txt" '^fleet/linus/state .*"motion":"forward"'
check "... and by an MQTT 5 subscriber" wait_for 10 has_line "$ART/sub-v5.txt" '^fleet/linus/state .*"motion":"forward"'
check "the dead-man stops linus after the hold time" \
  wait_for 10 bash -c "tac '$ART/sub-v311.txt' | grep -m1 '^fleet/linus/state' | grep -q '\"motion\":\"stop\"'"

# MQTT 5 with a traceparent user property and JSON, as another tool would send it.
mosquitto_pub -h 127.0.0.1 -p $MQTT_PORT -V mqttv5 -q 1 -t fleet/torvalds/cmd/drive \
  -D publish user-property traceparent 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 \
  -m '{"direction":"east","hold_ms":3000,"id":"e2e-mqtt5"}'
check "MQTT 5 JSON drive east moves torvalds right" \
  wait_for 10 has_line "$ART/sub-v311.txt" '^fleet/torvalds/state .*"motion":"right"'
check "the result carries the command id" wait_for 10 has_line "$ART/sub-v311.txt" '^fleet/torvalds/result .*"id":"e2e-mqtt5".*"status":"ok"'

# A bad payload gets an error result, and the node keeps serving.
mosquitto_pub -h 127.0.0.1 -p $MQTT_PORT -q 1 -t fleet/linus/cmd/servo -m 500
check "a bad payload gets an error result" \
  wait_for 10 has_line "$ART/sub-v311.txt" '^fleet/linus/result .*"status":"error".*"code":"out_of_range"'

# The gateway: HTTP command with a traceparent header, published as MQTT 5 with properties.
code=$(curl -sS -o "$ART/http-drive.json" -w '%{http_code}' -X POST \
  -H 'traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01' \
  -d '{"direction":"backward","hold_ms":3000}' "$BASE/api/robots/linus/commands/drive")
check "POST /api/robots/linus/commands/drive answers 202" test "$code" = 202
check "linus drives backward" wait_for 10 has_line "$ART/sub-v311.txt" '^fleet/linus/state .*"motion":"backward"'
check "the MQTT 5 subscriber sees the gateway's traceparent user property" \
  wait_for 10 has_line "$ART/sub-v5.txt" '^fleet/linus/cmd/drive .*traceparent:00-0af7651916cd43dd8448eb211c80319c-'
code=$(curl -sS -o "$ART/http-bad.json" -w '%{http_code}' -X POST -d 'sideways' "$BASE/api/robots/linus/commands/drive")
check "a bad HTTP body answers 400 with a JSON error" test "$code" = 400
check "... whose code is bad_payload" has_line "$ART/http-bad.json" '"code":"bad_payload"'
code=$(curl -sS -o /dev/null -w '%{http_code}' -X POST -d 'forward' "$BASE/api/robots/nobody/commands/drive")
check "an unknown robot answers 404" test "$code" = 404
check "the 3.1.1 subscriber survived MQTT 5 commands with properties" kill -0 $SUB311
mosquitto_pub -h 127.0.0.1 -p $MQTT_PORT -q 1 -t fleet/torvalds/cmd/eyes -m on
check "... and still receives messages" wait_for 10 has_line "$ART/sub-v311.txt" '^fleet/torvalds/state .*"eyes":"on"'
robots_online() {
  curl -fsS "$BASE/api/robots" | python3 -c '
import json, sys
robots = {r["id"]: r for r in json.load(sys.stdin)["robots"]}
sys.exit(0 if all(robots.get(n, {}).get("online") is True for n in ("linus", "torvalds")) else 1)'
}
check "GET /api/robots lists both robots online" robots_online
check "promtool check metrics passes on the gateway's /metrics" bash -c "curl -fsS '$BASE/metrics' | promtool check metrics"
check "/metrics counts published commands" \
  has_line <(curl -fsS "$BASE/metrics") '^fleet_gateway_commands_published_total\{command="drive",topic="fleet/\+/cmd/drive"\} [1-9]'
check "the all-in-one's /metrics also has the broker's per-topic counters" \
  has_line <(curl -fsS "$BASE/metrics") '^fleet_broker_messages_received_total\{topic="fleet/\+/cmd/drive"\} [1-9]'
check "... and the robots' metrics" \
  has_line <(curl -fsS "$BASE/metrics") '^fleet_node_commands_total\{.*\} [1-9]'
check "... and process metrics once" \
  test "$(curl -fsS "$BASE/metrics" | grep -c '^# TYPE process_resident_memory_bytes ')" = 1

# The web page in a real browser: hold a D-pad button, the robot moves; release, it stops.
check "the web page drives both robots (chromium)" \
  env BASE="$BASE" ART="$ART" node e2e/browser.mjs
# The fleet UI for a real fleet, at desktop and phone size.
check "the fleet UI at desktop and phone size: overview, search, offline greyed, pinned e-stop, latch, toasts, latency, gamepad, touch joystick, stop on blur/hidden/lost link (chromium)" \
  env BASE="$BASE" ART="$ART" MQTT_PORT=$MQTT_PORT node e2e/ui.mjs
# Any other web page open in the same browser must not be able to.
check "a hostile web page in the operator's browser cannot drive the robots (chromium: img, form, fetch, websocket, DNS rebinding)" \
  env BASE="$BASE" WS_PORT=$WS_PORT SUB="$ART/sub-v311.txt" ART="$ART" node e2e/hostile_page.mjs

# Home Assistant discovery, seen as Home Assistant sees it: MQTT 3.1.1, retained documents.
discovery_documents() {
  mosquitto_sub -h 127.0.0.1 -p $MQTT_PORT -V mqttv311 -C 3 -W 10 -v -t 'homeassistant/device/+/config' \
    >"$ART/discovery.txt" || return 1
  python3 - "$ART/discovery.txt" <<'PY'
import json, sys
docs = {}
for line in open(sys.argv[1]):
    topic, _, payload = line.partition(" ")
    docs[topic] = json.loads(payload)
linus = docs["homeassistant/device/fleet_linus/config"]
torvalds = docs["homeassistant/device/fleet_torvalds/config"]
bridge = docs["homeassistant/device/fleet__bridge/config"]
assert linus["device"]["name"] == "Linus" and linus["device"]["via_device"] == "fleet__bridge"
assert linus["components"]["fleet_linus_forward"]["availability_topic"] == "fleet/linus/status"
assert "fleet_linus_servo1" in linus["components"] and "fleet_torvalds_servo1" not in torvalds["components"]
assert all("unique_id" in c for d in docs.values() for c in d["components"].values())
stop_all = bridge["components"]["fleet__bridge_stop_all"]
assert stop_all["command_topic"] == "fleet/all/cmd/stop" and "availability_topic" not in stop_all
PY
}
check "both robots and the gateway's fleet device publish retained Home Assistant discovery (read over 3.1.1)" discovery_documents
home_assistant_templates() {
  mosquitto_sub -h 127.0.0.1 -p $MQTT_PORT -V mqttv311 -C 3 -W 10 -v -t 'fleet/+/state' \
    >"$ART/retained-states.txt" || return 1
  python3 e2e/check_templates.py "$ART/discovery.txt" "$ART/retained-states.txt"
}
check "every Home Assistant template renders (Jinja2) against the live states, as HA would read it" \
  home_assistant_templates
check "the gateway says it is online (retained fleet/_gateway/status)" \
  has_line <(mosquitto_sub -h 127.0.0.1 -p $MQTT_PORT -C 1 -W 5 -t fleet/_gateway/status) '^online$'
mosquitto_pub -h 127.0.0.1 -p $MQTT_PORT -V mqttv311 -t fleet/linus/cmd/motor1 -m 70%
check "a speed slider's 70% on cmd/motor1 (as Home Assistant sends it) sets motor 1 to 7" \
  wait_for 10 has_line "$ART/sub-v311.txt" '^fleet/linus/state .*"motors":\[\{"direction":"[a-z]*","speed":7\}'
mosquitto_pub -h 127.0.0.1 -p $MQTT_PORT -V mqttv311 -t fleet/linus/cmd/motor1 -m 10
mosquitto_pub -h 127.0.0.1 -p $MQTT_PORT -V mqttv311 -t fleet/linus/cmd/servo1 -m 45.0
latest_state_has() { # latest_state_has ROBOT REGEX: the robot's newest state matches
  grep "^fleet/$1/state " "$ART/sub-v311.txt" | tail -n 1 | grep -Eq "$2"
}
check "a number's bare value on cmd/servo1 (as Home Assistant sends it) moves servo 1" \
  wait_for 10 latest_state_has linus '"servos":\[45,'
mosquitto_pub -h 127.0.0.1 -p $MQTT_PORT -V mqttv311 -t fleet/linus/cmd/eyes -m OFF
check "the eyes light's OFF turns the eyes off" wait_for 10 latest_state_has linus '"eyes":"off"'
mosquitto_pub -h 127.0.0.1 -p $MQTT_PORT -V mqttv311 -t fleet/linus/cmd/eyes -m ON
check "... and ON turns them on" wait_for 10 latest_state_has linus '"eyes":"on"'

# The latched e-stop: latched over HTTP, every robot stays stopped and refuses motion
# (also from mosquitto_pub) until it is released.
code=$(curl -s -o "$ART/latch.json" -w '%{http_code}' -X POST "$BASE/api/fleet/estop" -d '{"reason":"e2e"}' || true)
check "POST /api/fleet/estop latches the e-stop (202)" test "$code" = 202
check "... both robots say it is engaged in their state" wait_for 10 bash -c \
  "grep '^fleet/linus/state ' '$ART/sub-v311.txt' | tail -n 1 | grep -q '\"estop\":\"engaged\"' &&
   grep '^fleet/torvalds/state ' '$ART/sub-v311.txt' | tail -n 1 | grep -q '\"estop\":\"engaged\"'"
mosquitto_pub -h 127.0.0.1 -p $MQTT_PORT -q 1 -t fleet/linus/cmd/drive -m forward || true
check "... a drive from mosquitto_pub is refused (estop_engaged)" \
  wait_for 10 has_line "$ART/sub-v311.txt" '^fleet/linus/result .*"command":"drive".*"code":"estop_engaged"'
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$BASE/api/robots/torvalds/commands/drive" -d forward || true)
check "... and one over HTTP answers 409" test "$code" = 409
code=$(curl -s -o /dev/null -w '%{http_code}' -X DELETE "$BASE/api/fleet/estop" || true)
check "DELETE /api/fleet/estop releases it (202), the robots say clear" \
  bash -c "test $code = 202 && for i in \$(seq 100); do grep '^fleet/linus/state ' '$ART/sub-v311.txt' | tail -n 1 | grep -q '\"estop\":\"clear\"' && exit 0; sleep 0.1; done; exit 1"

# A robot-node process of its own: pin map from a config file, three simulated robots.
"$NODE" --config robot-node/config/torvalds.toml --robot sim --simulate 3 \
  --broker 127.0.0.1:$MQTT_PORT --metrics-addr 127.0.0.1:$NODE_METRICS_PORT >"$ART/robot-node.log" 2>&1 &
NODE_PID=$!
pids+=($NODE_PID)
check "robot-node --simulate 3 brings sim-1..sim-3 online" \
  wait_for 20 bash -c "grep -q '^fleet/sim-1/status online' '$ART/sub-v311.txt' && grep -q '^fleet/sim-3/status online' '$ART/sub-v311.txt'"
mosquitto_pub -h 127.0.0.1 -p $MQTT_PORT -q 1 -t fleet/sim-2/cmd/drive -m north
check "sim-2 drives with torvalds' pin map from the config file" \
  wait_for 10 has_line "$ART/sub-v311.txt" '^fleet/sim-2/state .*"motion":"forward","motors":\[\{"direction":"forward","speed":null\}'
check "robot-node serves /metrics with its command counter" \
  wait_for 5 has_line <(curl -fsS "http://127.0.0.1:$NODE_METRICS_PORT/metrics") '^fleet_node_commands_total\{topic="\+/cmd/drive",result="ok"\} 1'
check "robot-node /metrics has process metrics" \
  has_line <(curl -fsS "http://127.0.0.1:$NODE_METRICS_PORT/metrics") '^process_resident_memory_bytes '
check "robot-node /metrics counts dropped log lines (none while its log is read)" \
  has_line <(curl -fsS "http://127.0.0.1:$NODE_METRICS_PORT/metrics") '^fleet_log_lines_dropped_total 0$'
check "promtool check metrics passes on robot-node's /metrics" \
  bash -c "curl -fsS http://127.0.0.1:$NODE_METRICS_PORT/metrics | promtool check metrics"
check "robot-node /health" has_line <(curl -fsS "http://127.0.0.1:$NODE_METRICS_PORT/health") '"robots_connected":3'
mosquitto_pub -h 127.0.0.1 -p $MQTT_PORT -t fleet/sim-3/cmd/decommission -n
check "decommission: sim-3 answers ok" wait_for 10 has_line "$ART/sub-v311.txt" '^fleet/sim-3/result .*"command":"decommission","status":"ok"'
discovery_cleared() {
  local rc=0
  # Exit 27: no retained document arrived within the wait.
  mosquitto_sub -h 127.0.0.1 -p $MQTT_PORT -C 1 -W 2 -t homeassistant/device/fleet_sim-3/config >/dev/null 2>&1 || rc=$?
  [[ $rc -eq 27 ]] && mosquitto_sub -h 127.0.0.1 -p $MQTT_PORT -C 1 -W 5 -t homeassistant/device/fleet_sim-2/config >/dev/null
}
check "... its discovery document is gone, sim-2's is still there" discovery_cleared
kill -TERM $NODE_PID
check "robot-node SIGTERM: its robots say offline" wait_for 10 has_line "$ART/sub-v311.txt" '^fleet/sim-1/status offline'
remote_refused() {
  local out rc=0
  out=$("$FLEET" --mqtt-addr 0.0.0.0:18839 --ws-addr 127.0.0.1:18089 --http-addr 127.0.0.1:18089 2>&1) || rc=$?
  [[ $rc -ne 0 && $out == *"allow-remote-anonymous"* ]]
}
check "the all-in-one refuses anonymous access beyond loopback" remote_refused
open_gateway_refused() {
  local out rc=0
  out=$(env -u FLEET_API_TOKEN "$FLEET" --mqtt-addr 127.0.0.1:18839 --ws-addr 127.0.0.1:18088 \
    --http-addr 0.0.0.0:18089 2>&1) || rc=$?
  [[ $rc -ne 0 && $out == *"--allow-no-token"* ]]
}
check "the all-in-one refuses a gateway beyond loopback without --api-token" open_gateway_refused
rppal_refused() {
  local out rc=0
  out=$("$NODE" --robot linus --driver rppal --metrics-addr off 2>&1) || rc=$?
  echo "$out" >"$ART/robot-node-rppal.log"
  [[ $rc -ne 0 && $out == *"GPIO device cannot be opened"* && $out != *panicked* ]]
}
check "--driver rppal off a Pi says so plainly and exits non-zero" rppal_refused

# The standalone broker with users and ACLs, as mosquitto users meet it.
SEC_PORT=${E2E_SECURE_MQTT_PORT:-18832}
SEC_METRICS=${E2E_SECURE_METRICS_PORT:-19101}
users_file=$ART/users.toml
: >"$users_file"
for entry in linus:robot torvalds:robot gateway:controller grafana:reader; do
  name=${entry%%:*}
  hash=$(echo "$name-pw" | "$BROKER" hash-password)
  printf '[[user]]\nusername = "%s"\npassword_hash = "%s"\nrole = "%s"\n' "$name" "$hash" "${entry##*:}" >>"$users_file"
done
SEC_TLS_PORT=${E2E_SECURE_TLS_PORT:-18883}
# A CA, and a server certificate it signed for localhost (as docs/operations.md shows).
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=fleet e2e CA" \
  -keyout "$ART/ca.key" -out "$ART/ca.crt" >/dev/null 2>&1
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
  -keyout "$ART/tls.key" -out "$ART/tls.csr" >/dev/null 2>&1
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$ART/tls.ext"
openssl x509 -req -in "$ART/tls.csr" -CA "$ART/ca.crt" -CAkey "$ART/ca.key" -CAcreateserial -days 2 \
  -extfile "$ART/tls.ext" -out "$ART/tls.crt" >/dev/null 2>&1
# Addresses by name, as people write them for Mosquitto: localhost is 127.0.0.1.
"$BROKER" --mqtt-addr localhost:$SEC_PORT --metrics-addr localhost:$SEC_METRICS --ws-addr off \
  --tls-addr 127.0.0.1:$SEC_TLS_PORT --tls-cert "$ART/tls.crt" --tls-key "$ART/tls.key" \
  --users-file "$users_file" >"$ART/fleet-broker.log" 2>&1 &
pids+=($!)
check "fleet-broker with a users file answers /health" wait_for 20 curl -fsS "http://127.0.0.1:$SEC_METRICS/health" -o /dev/null
check "an address that is not one is refused with what is expected instead" \
  bash -c "'$BROKER' --mqtt-addr nope 2>&1 | grep -q 'expected IP:port, e.g. 127.0.0.1:1883'"
check "mosquitto_pub without credentials is refused" \
  bash -c "! mosquitto_pub -h 127.0.0.1 -p $SEC_PORT -t fleet/linus/cmd/drive -m forward 2>$ART/anon.txt"
check "mosquitto_pub with a wrong password is refused" \
  bash -c "! mosquitto_pub -h 127.0.0.1 -p $SEC_PORT -u linus -P wrong -t fleet/linus/cmd/drive -m forward 2>$ART/wrong.txt"
# A robot's login comes with its client id, robot-<id>.
mosquitto_sub -h 127.0.0.1 -p $SEC_PORT -V mqttv5 -u linus -P linus-pw -i robot-linus -t 'fleet/linus/cmd/+' -C 1 -W 15 >"$ART/linus-cmd.txt" 2>&1 &
LINUS_SUB=$!
sleep 0.5
mosquitto_pub -h 127.0.0.1 -p $SEC_PORT -V mqttv5 -u gateway -P gateway-pw -q 1 -t fleet/linus/cmd/drive -m forward
check "the controller's command reaches the robot's subscription" wait_for 10 has_line "$ART/linus-cmd.txt" '^forward$'
wait $LINUS_SUB 2>/dev/null || true
mosquitto_sub -h 127.0.0.1 -p $SEC_TLS_PORT --cafile "$ART/ca.crt" -u linus -P linus-pw -i robot-linus \
  -t 'fleet/linus/cmd/+' -C 1 -W 15 >"$ART/linus-tls.txt" 2>&1 &
LINUS_TLS=$!
sleep 0.5
mosquitto_pub -h 127.0.0.1 -p $SEC_TLS_PORT --cafile "$ART/ca.crt" -V mqttv5 -u gateway -P gateway-pw \
  -q 1 -t fleet/linus/cmd/eyes -m on
check "MQTT over TLS: a command from an MQTT 5 client reaches a 3.1.1 subscriber" \
  wait_for 10 has_line "$ART/linus-tls.txt" '^on$'
wait $LINUS_TLS 2>/dev/null || true
# The fleet's own clients over TLS with credentials: a robot node and a gateway.
SEC_HTTP=${E2E_SECURE_HTTP_PORT:-18091}
FLEET_MQTT_PASSWORD=linus-pw "$NODE" --robot linus --broker localhost:$SEC_TLS_PORT --tls-ca "$ART/ca.crt" \
  --metrics-addr off >"$ART/tls-node.log" 2>&1 &
pids+=($!)
"$ROOT/target/debug/fleet-gateway" --http-addr 127.0.0.1:$SEC_HTTP --broker localhost:$SEC_TLS_PORT \
  --tls-ca "$ART/ca.crt" --mqtt-username gateway --mqtt-password gateway-pw --robots linus \
  --probe-interval-s 0 >"$ART/tls-gateway.log" 2>&1 &
pids+=($!)
tls_command() {
  curl -fsS -X POST -d '{"direction":"forward"}' \
    "http://127.0.0.1:$SEC_HTTP/api/robots/linus/commands/drive?wait=true" | grep -q '"status":"ok"'
}
check "robot-node and fleet-gateway over TLS with credentials: a command gets its result" wait_for 20 tls_command
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=other-ca" \
  -keyout "$ART/other-ca.key" -out "$ART/other-ca.crt" >/dev/null 2>&1
untrusted_refused() {
  local out
  out=$(FLEET_MQTT_PASSWORD=linus-pw timeout 3 "$NODE" --robot linus --client-id robot-untrusted \
    --broker localhost:$SEC_TLS_PORT --tls-ca "$ART/other-ca.crt" --metrics-addr off 2>&1)
  echo "$out" >"$ART/tls-untrusted.log"
  [[ $out == *"cannot connect to the broker"*[Cc]ertificate* && $out != *"node: connected"* && $out != *panicked* ]]
}
check "a node that does not trust the broker's certificate says so and does not connect" untrusted_refused
# (linus's node is connected now: these checks log in as torvalds.)
check "a robot may not read another robot's commands (3.1.1)" \
  bash -c "mosquitto_sub -h 127.0.0.1 -p $SEC_PORT -u torvalds -P torvalds-pw -i robot-torvalds -t 'fleet/linus/cmd/+' -W 3 2>&1 | grep -q 'denied'"
check "a robot may not read another robot's commands (5)" \
  bash -c "mosquitto_sub -h 127.0.0.1 -p $SEC_PORT -V mqttv5 -u torvalds -P torvalds-pw -i robot-torvalds -t 'fleet/linus/cmd/+' -W 3 2>&1 | grep -q 'denied'"
check "a robot may not command another robot (MQTT 5: PUBACK 0x87, not delivered)" \
  bash -c "mosquitto_pub -h 127.0.0.1 -p $SEC_PORT -V mqttv5 -u torvalds -P torvalds-pw -i robot-torvalds -q 1 -t fleet/linus/cmd/drive -m forward 2>&1 | grep -q 'Not authorized'"
check "a reader's will on a command topic refuses its CONNECT (mosquitto_pub --will-topic)" \
  bash -c "! mosquitto_pub -h 127.0.0.1 -p $SEC_PORT -V mqttv5 -u grafana -P grafana-pw --will-topic fleet/linus/cmd/drive --will-payload forward -t fleet/nothing -n 2>$ART/will.txt && grep -qi 'not authori' $ART/will.txt"
check "another user cannot take a robot's client id (CONNACK 0x85)" \
  bash -c "! mosquitto_sub -h 127.0.0.1 -p $SEC_PORT -V mqttv5 -u grafana -P grafana-pw -i robot-linus -t 'fleet/#' -W 2 2>$ART/takeover.txt && grep -qi 'identifier' $ART/takeover.txt"
check "... and linus's node, whose client id it is, still answers commands" tls_command
check "a topic of 100 levels is refused and the broker stays up" \
  bash -c "mosquitto_pub -h 127.0.0.1 -p $SEC_PORT -V mqttv5 -u gateway -P gateway-pw -q 1 -r -t \"\$(printf 'a/%.0s' {1..100})x\" -m boom 2>$ART/deep.txt; grep -q 'at most 32 are allowed' $ART/deep.txt && curl -fsS http://127.0.0.1:$SEC_METRICS/health -o /dev/null"
# Bytes that are not MQTT at all: the connection is closed and rmqtt logs it.
python3 - "$SEC_PORT" <<'PY' || true
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
s.sendall(b"GET / HTTP/1.1\r\nHost: broker\r\n\r\n")
print("broker answered an HTTP request with", s.recv(64))
PY
check "the broker logs every kind of refusal (bad password, no credentials, ACL subscribe and publish, not MQTT)" \
  bash -c "for line in 'refused a client: bad username or password' 'refused a client without credentials' \
    'subscription refused by the ACL' 'publish refused.*fleet/linus/cmd/drive' 'MQTT version detection failed' \
    'CONNECT refused.*will: not allowed' 'CONNECT refused.*belongs to robot'; do \
    grep -q \"\$line\" '$ART/fleet-broker.log' || { echo \"missing: \$line\"; exit 1; }; done"
check "promtool check metrics passes on fleet-broker's /metrics" \
  bash -c "curl -fsS http://127.0.0.1:$SEC_METRICS/metrics | promtool check metrics"
check "the broker counts the connection that was not MQTT on /metrics" \
  bash -c "curl -fsS http://127.0.0.1:$SEC_METRICS/metrics | grep -Eq '^fleet_broker_handshake_failures_total\\{reason=\"not_mqtt\"\\} [1-9]'"
check "the broker counts auth failures and ACL denials on /metrics" \
  bash -c "curl -fsS http://127.0.0.1:$SEC_METRICS/metrics | grep -q '^fleet_broker_auth_failures_total{reason=\"bad_credentials\"} 1' && curl -fsS http://127.0.0.1:$SEC_METRICS/metrics | grep -q '^fleet_broker_acl_denials_total{action=\"subscribe\"} 2' && curl -fsS http://127.0.0.1:$SEC_METRICS/metrics | grep -q '^fleet_broker_acl_denials_total{action=\"publish\"} 1' && curl -fsS http://127.0.0.1:$SEC_METRICS/metrics | grep -q '^fleet_broker_auth_failures_total{reason=\"anonymous\"} 1'"

# Observability: the fleet as separate processes, scraped by a real Prometheus; every
# dashboard query must return data.
OBS_MQTT=${E2E_OBS_MQTT_PORT:-18833}
OBS_HTTP=${E2E_OBS_HTTP_PORT:-18090}
OBS_PROM=${E2E_OBS_PROM_PORT:-19090}
# Spans from the gateway and the node go to a real OTLP/HTTP receiver.
python3 e2e/otlp_receiver.py 19318 "$ART/spans.jsonl" &
pids+=($!)
export OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:19318
export FLEET_CPU_REQUEST_MILLICORES=100 FLEET_CPU_LIMIT_MILLICORES=1000
export FLEET_MEMORY_REQUEST_BYTES=67108864 FLEET_MEMORY_LIMIT_BYTES=268435456
"$BROKER" --mqtt-addr 127.0.0.1:$OBS_MQTT --ws-addr off --metrics-addr 127.0.0.1:19111 \
  --allow-anonymous >"$ART/obs-broker.log" 2>&1 &
pids+=($!)
wait_for 20 curl -fsS http://127.0.0.1:19111/health -o /dev/null
start_sim_node() {
  "$NODE" --robot sim --simulate 2 --broker 127.0.0.1:$OBS_MQTT --metrics-addr 127.0.0.1:19112 \
    >>"$ART/obs-node.log" 2>&1 &
  SIM_NODE=$!
  pids+=($SIM_NODE)
}
start_sim_node
FLEET_PROBE_INTERVAL_S=1 FLEET_PROBE_TIMEOUT_MS=300 "$ROOT/target/debug/fleet-gateway" --http-addr 127.0.0.1:$OBS_HTTP \
  --broker 127.0.0.1:$OBS_MQTT --robots sim-1,sim-2 >"$ART/obs-gateway.log" 2>&1 &
pids+=($!)
unset FLEET_CPU_REQUEST_MILLICORES FLEET_CPU_LIMIT_MILLICORES FLEET_MEMORY_REQUEST_BYTES FLEET_MEMORY_LIMIT_BYTES
unset OTEL_EXPORTER_OTLP_ENDPOINT
# Alerting: the fleet's rules with their "for" shortened, a real Alertmanager, and a local
# webhook receiver that records what Alertmanager sends.
sed 's/for: [0-9]*m/for: 0s/' alerts/fleet-rules.yml >"$ART/e2e-rules.yml"
cat >"$ART/alertmanager.yml" <<AM
route:
  receiver: webhook
  group_by: [alertname]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
  routes:
    - receiver: "null"
      matchers: [alertname = "Watchdog"]
receivers:
  - name: "null"
  - name: webhook
    webhook_configs:
      - url: http://127.0.0.1:19094/
        send_resolved: true
AM
python3 e2e/webhook_receiver.py 19094 "$ART/alerts-received.jsonl" &
pids+=($!)
prometheus-alertmanager --config.file="$ART/alertmanager.yml" --storage.path="$ART/alertmanager-data" \
  --web.listen-address=127.0.0.1:19093 --cluster.listen-address= >"$ART/alertmanager.log" 2>&1 &
pids+=($!)
cat >"$ART/prometheus.yml" <<PROM
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $ART/e2e-rules.yml
alerting:
  alertmanagers:
    - static_configs: [{ targets: ["127.0.0.1:19093"] }]
scrape_configs:
  - job_name: fleet-broker
    static_configs: [{ targets: ["127.0.0.1:19111"] }]
  - job_name: robot-node
    static_configs: [{ targets: ["127.0.0.1:19112"] }]
  - job_name: fleet-gateway
    static_configs: [{ targets: ["127.0.0.1:$OBS_HTTP"] }]
PROM
prometheus --config.file="$ART/prometheus.yml" --storage.tsdb.path="$ART/prometheus-data" \
  --web.listen-address=127.0.0.1:$OBS_PROM --rules.alert.resend-delay=1s >"$ART/prometheus.log" 2>&1 &
pids+=($!)
check "the standalone gateway sees both simulated robots" \
  wait_for 20 bash -c "curl -fsS http://127.0.0.1:$OBS_HTTP/api/robots/sim-2 | grep -q '\"online\":true'"
for _ in 1 2 3; do
  curl -fsS -o /dev/null -X POST -d forward "http://127.0.0.1:$OBS_HTTP/api/robots/sim-1/commands/drive?wait=true" || true
  curl -fsS -o /dev/null -X POST -d on "http://127.0.0.1:$OBS_HTTP/api/robots/sim-2/commands/eyes" || true
  curl -sS -o /dev/null -X POST -d sideways "http://127.0.0.1:$OBS_HTTP/api/robots/sim-1/commands/drive" || true
  curl -fsS -o /dev/null -X POST "http://127.0.0.1:$OBS_HTTP/api/fleet/stop" || true
  sleep 1
done
curl -fsS -o /dev/null -X POST -d '{"direction":"left","hold_ms":300}' "http://127.0.0.1:$OBS_HTTP/api/robots/sim-2/commands/drive"
curl -fsS -o /dev/null -X POST -H 'traceparent: 00-7d1c8f3b2a6e4f0c9b8a7d6e5f4c3b2a-1a2b3c4d5e6f7081-01' \
  -d forward "http://127.0.0.1:$OBS_HTTP/api/robots/sim-1/commands/drive?wait=true"
check "one click is one trace across processes: gateway server -> producer -> robot consumer -> driver" \
  wait_for 20 bash -c "python3 e2e/check_trace.py '$ART/spans.jsonl' 7d1c8f3b2a6e4f0c9b8a7d6e5f4c3b2a 1a2b3c4d5e6f7081 >/dev/null"
python3 e2e/check_trace.py "$ART/spans.jsonl" 7d1c8f3b2a6e4f0c9b8a7d6e5f4c3b2a 1a2b3c4d5e6f7081 | tail -1 || true
prom_up() {
  curl -fsS "http://127.0.0.1:$OBS_PROM/api/v1/query?query=count(up==1)" | grep -q '"value":\[[0-9.]*,"3"\]'
}
check "Prometheus scrapes the broker, the node and the gateway" wait_for 30 prom_up
sleep 8   # a few more scrapes, so rates over 1m have two points and the dead-man has fired
check "every dashboard query returns data from the live fleet" \
  python3 e2e/check_dashboards.py "http://127.0.0.1:$OBS_PROM" grafana/dashboards sim-1

# The robots go away: FleetRobotOffline fires through Alertmanager; they come back: resolved.
kill -9 $SIM_NODE
check "FleetRobotOffline fires through Alertmanager to the webhook" \
  wait_for 60 has_line "$ART/alerts-received.jsonl" '"status":"firing".*"alertname":"FleetRobotOffline"'
start_sim_node
check "... and its resolution arrives when the robots are back" \
  wait_for 60 has_line "$ART/alerts-received.jsonl" '"status":"resolved".*"alertname":"FleetRobotOffline"'
check "the Watchdog went to the null receiver, not the webhook" \
  bash -c "! grep -q '\"alertname\":\"Watchdog\"' '$ART/alerts-received.jsonl'"

# The README's three standalone commands as written there, but for `--release` (a release
# build of every part would double this suite's time): `cargo run -p <package> -- ...`
# (cargo picks the package's binary as it would for the README), on the README's ports.
readme_commands() {
  python3 - README.md <<'PY'
import re, sys
block = re.search(r"in three terminals.*?```sh\n(.*?)```", open(sys.argv[1]).read(), re.S).group(1)
for line in block.strip().splitlines():
    package, args = re.fullmatch(r"cargo run --release -p (\S+) -- (.*)", line).groups()
    print(package, args)
PY
}
readme_parts() {
  readme_pids=()
  while read -r package args; do
    read -ra argv <<<"$args"
    # Built first, so that what is timed below is the start, not the build (cargo builds
    # a package on its own with the features it alone needs).
    cargo build -q -p "$package" >>"$ART/readme-build.log" 2>&1 || true
    cargo run -q -p "$package" -- "${argv[@]}" </dev/null >"$ART/readme-$package.log" 2>&1 &
    readme_pids+=($!)
    pids+=($!)
    if [ "$package" = fleet-broker ]; then
      wait_for 20 bash -c "(exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null" || true
    fi
  done < <(readme_commands)
  return 0
}
if (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null || (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null; then
  check "the README's standalone commands (ports 1883 and 8080 are taken on this machine)" false
else
  readme_parts
  check "the README's three standalone commands: three of them" test ${#readme_pids[@]} = 3
  check "... the gateway answers on 8080, connected to the broker" wait_for 30 curl -fsS http://127.0.0.1:8080/readyz -o /dev/null
  check "... and linus is online through the standalone broker" \
    wait_for 20 bash -c "curl -fsS http://127.0.0.1:8080/api/robots/linus | grep -q '\"online\":true'"
  kill "${readme_pids[@]}" 2>/dev/null || true
  wait "${readme_pids[@]}" 2>/dev/null || true
fi

# Mosquitto as the broker, and the fault tests.
source e2e/mosquitto.sh

# Beside an existing Mosquitto: Home Assistant's own broker bridged to fleet-broker.
source e2e/bridge.sh

# A clean shutdown leaves the robots safe and offline, all of them at once: with both
# robots driving, the stop (Ctrl-C and SIGTERM take the same path) reaches both together.
mosquitto_sub -h 127.0.0.1 -p $MQTT_PORT -V mqttv311 -F '%U %t %p' -t 'fleet/+/status' \
  -t 'fleet/+/state' >"$ART/sub-shutdown.txt" 2>&1 &
pids+=($!)
sleep 0.5
for robot in linus torvalds; do
  mosquitto_pub -h 127.0.0.1 -p $MQTT_PORT -q 1 -t fleet/$robot/cmd/drive -m '{"direction":"forward","hold_ms":5000}' || true
done
wait_for 10 bash -c "grep -q 'fleet/linus/state .*\"motion\":\"forward\"' '$ART/sub-shutdown.txt' &&
  grep -q 'fleet/torvalds/state .*\"motion\":\"forward\"' '$ART/sub-shutdown.txt'" || true
kill -TERM $FLEET_PID
check "SIGTERM: the fleet exits" wait_for 15 bash -c "! kill -0 $FLEET_PID"
check "SIGTERM: robots say offline" has_line "$ART/sub-v311.txt" '^fleet/linus/status offline'
# The seconds between the two robots' stopped states, and between their `offline`s.
shutdown_gap() { # shutdown_gap PATTERN: both robots' first line after the drive matching it
  python3 - "$ART/sub-shutdown.txt" "$1" <<'PY'
import re, sys
lines = [l.split(" ", 2) for l in open(sys.argv[1]) if l.count(" ") >= 2]
first = {}
for robot in ("linus", "torvalds"):
    moving = [i for i, (_, t, p) in enumerate(lines) if t == f"fleet/{robot}/state" and '"motion":"forward"' in p]
    after = [float(s) for i, (s, t, p) in enumerate(lines)
             if moving and i > moving[-1] and t.startswith(f"fleet/{robot}/") and re.search(sys.argv[2], p)]
    if not after:
        sys.exit(f"{robot}: no line matching {sys.argv[2]} after it drove")
    first[robot] = after[0]
gap = abs(first["linus"] - first["torvalds"])
print(f"{gap:.3f} s apart")
sys.exit(0 if gap < 0.5 else 1)
PY
}
check "SIGTERM: both driving robots stop together (within 0.5 s)" shutdown_gap '"motion":"stop"'
check "SIGTERM: both robots say offline together (within 0.5 s)" shutdown_gap '^offline'

echo
echo "e2e: $passed passed, $failed failed"
((failed == 0))
