# Sourced by e2e/run.sh (uses its check, wait_for, has_line, pids, ART, NODE, ROOT).
# Beside an existing Mosquitto: the Mosquitto a Home Assistant user already runs, bridged
# to a fleet-broker with users over TLS by deploy/mosquitto-bridge.conf, as
# docs/home-assistant.md sets it up (*Beside an existing Mosquitto (a bridge)*); only the
# host, the CA file and the password of that file are changed. "Home Assistant" here is
# mosquitto_pub and mosquitto_sub on that Mosquitto.

BRIDGE_BROKER=${BROKER:-$ROOT/target/debug/fleet-broker}
BR_MQTT=${E2E_BRIDGE_MQTT_PORT:-18835}        # fleet-broker: the robot node, an admin watching
BR_TLS=${E2E_BRIDGE_TLS_PORT:-18836}          # fleet-broker over TLS: the bridge
BR_METRICS=${E2E_BRIDGE_METRICS_PORT:-19113}
BR_HTTP=${E2E_BRIDGE_HTTP_PORT:-18094}        # a gateway on fleet-broker: the Fleet device
HA_PORT=${E2E_BRIDGE_MOSQUITTO_PORT:-18837}   # the user's Mosquitto, where Home Assistant is

# fleet-broker's certificate for localhost, from a CA of its own.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=fleet bridge e2e CA" \
  -keyout "$ART/bridge-ca.key" -out "$ART/bridge-ca.crt" >/dev/null 2>&1 || true
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
  -keyout "$ART/bridge-tls.key" -out "$ART/bridge-tls.csr" >/dev/null 2>&1 || true
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' \
  >"$ART/bridge-tls.ext"
openssl x509 -req -in "$ART/bridge-tls.csr" -CA "$ART/bridge-ca.crt" -CAkey "$ART/bridge-ca.key" \
  -CAcreateserial -days 2 -extfile "$ART/bridge-tls.ext" -out "$ART/bridge-tls.crt" >/dev/null 2>&1 || true
# Its users: the robot, the bridge (role homeassistant, as the docs say), a gateway, and
# an admin to watch.
: >"$ART/bridge-users.toml"
for entry in linus:robot ha-bridge:homeassistant gateway:controller operator:admin; do
  name=${entry%%:*}
  hash=$(echo "$name-pw" | "$BRIDGE_BROKER" hash-password)
  printf '[[user]]\nusername = "%s"\npassword_hash = "%s"\nrole = "%s"\n' "$name" "$hash" "${entry##*:}" \
    >>"$ART/bridge-users.toml"
done
start_bridge_broker() {
  RUST_LOG=info "$BRIDGE_BROKER" --mqtt-addr 127.0.0.1:$BR_MQTT --ws-addr off \
    --tls-addr 127.0.0.1:$BR_TLS --tls-cert "$ART/bridge-tls.crt" --tls-key "$ART/bridge-tls.key" \
    --metrics-addr 127.0.0.1:$BR_METRICS --users-file "$ART/bridge-users.toml" \
    >>"$ART/bridge-fleet-broker.log" 2>&1 &
  BR_BROKER_PID=$!
  pids+=($BR_BROKER_PID)
  wait_for 20 curl -fsS "http://127.0.0.1:$BR_METRICS/health" -o /dev/null || true
}
start_bridge_broker
mosquitto_sub -p $BR_MQTT -u operator -P operator-pw -v -t 'fleet/#' -t 'homeassistant/#' \
  >"$ART/bridge-fleet-side.txt" 2>&1 &
pids+=($!)

# The user's Mosquitto: its own listener, then the bridge file as shipped, with this
# machine's host, CA and password.
{
  printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n\n' $HA_PORT
  sed -e "s|^address .*|address 127.0.0.1:$BR_TLS|" \
    -e "s|^bridge_cafile .*|bridge_cafile $ART/bridge-ca.crt|" \
    -e "s|^remote_password .*|remote_password ha-bridge-pw|" deploy/mosquitto-bridge.conf
} >"$ART/bridge-mosquitto.conf"
mosquitto -c "$ART/bridge-mosquitto.conf" >"$ART/bridge-mosquitto.log" 2>&1 &
BR_MOSQ_PID=$!
pids+=($BR_MOSQ_PID)
wait_for 10 mosquitto_pub -p $HA_PORT -t e2e/probe -n || true
mosquitto_sub -p $HA_PORT -v -t 'fleet/#' -t 'homeassistant/#' -t 'fleet-bridge/#' \
  >"$ART/bridge-ha-side.txt" 2>&1 &
pids+=($!)
check "bridge: Mosquitto's bridge connects to fleet-broker over TLS (MQTT 5; notification 1 on Mosquitto)" \
  wait_for 15 has_line "$ART/bridge-ha-side.txt" '^fleet-bridge/connected 1$'

# The node comes after the bridge: what Home Assistant finds retained on Mosquitto was
# forwarded live, so it is retained there only because fleet-broker kept the flag.
FLEET_MQTT_PASSWORD=linus-pw "$NODE" --robot linus --broker 127.0.0.1:$BR_MQTT --metrics-addr off \
  --hold-ms 500 >"$ART/bridge-node.log" 2>&1 &
BR_NODE_PID=$!
pids+=($BR_NODE_PID)
check "... linus (on fleet-broker) comes online on Mosquitto" \
  wait_for 20 has_line "$ART/bridge-ha-side.txt" '^fleet/linus/status online$'
ha_discovery_retained() { # as Home Assistant finds it when it starts later: retained
  mosquitto_sub -p $HA_PORT -F '%r %t %p' -C 1 -W 5 -t homeassistant/device/fleet_linus/config \
    >"$ART/bridge-discovery.txt" || return 1
  python3 - "$ART/bridge-discovery.txt" <<'PY'
import json, sys
retained, topic, payload = open(sys.argv[1]).read().split(" ", 2)
doc = json.loads(payload)
assert retained == "1", "not retained"
assert '"fleet/linus/status"' in payload, "no availability on linus's status"
assert doc["components"]["fleet_linus_forward"]["command_topic"] == "fleet/linus/cmd/drive"
PY
}
check "... a later Home Assistant finds linus's discovery document retained on Mosquitto" \
  wait_for 10 ha_discovery_retained
check "... and linus's status retained as online" \
  bash -c "mosquitto_sub -p $HA_PORT -F '%r %p' -C 1 -W 5 -t fleet/linus/status | grep -qx '1 online'"

# A gateway on fleet-broker publishes the Fleet device (the e-stop button, the gateway's
# connectivity): it crosses the bridge like the robots' devices.
"${GATEWAY:-$ROOT/target/debug/fleet-gateway}" --http-addr 127.0.0.1:$BR_HTTP --broker 127.0.0.1:$BR_MQTT \
  --mqtt-username gateway --mqtt-password gateway-pw --robots linus --probe-interval-s 0 \
  >"$ART/bridge-gateway.log" 2>&1 &
BR_GATEWAY_PID=$!
pids+=($BR_GATEWAY_PID)
ha_fleet_device() {
  mosquitto_sub -p $HA_PORT -F '%r %t %p' -C 1 -W 5 -t homeassistant/device/fleet__bridge/config \
    >"$ART/bridge-fleet-device.txt" || return 1
  python3 - "$ART/bridge-fleet-device.txt" <<'PY'
import json, sys
retained, topic, payload = open(sys.argv[1]).read().split(" ", 2)
doc = json.loads(payload)
assert retained == "1", "not retained"
assert doc["components"]["fleet__bridge_stop_all"]["command_topic"] == "fleet/all/cmd/stop"
PY
}
check "the gateway's Fleet device (with the e-stop button) reaches Mosquitto, retained" wait_for 20 ha_fleet_device
check "... and its availability, fleet/_gateway/status online, retained" \
  wait_for 10 bash -c "mosquitto_sub -p $HA_PORT -F '%r %p' -C 1 -W 2 -t fleet/_gateway/status | grep -qx '1 online'"

# Commands from Home Assistant: a button's plain text over MQTT 3.1.1, QoS 1.
mosquitto_pub -p $HA_PORT -V mqttv311 -q 1 -t fleet/linus/cmd/drive -m forward || true
check "a drive published on Mosquitto moves linus (state seen on Mosquitto)" \
  wait_for 10 has_line "$ART/bridge-ha-side.txt" '^fleet/linus/state .*"motion":"forward"'
check "... its result comes back over the bridge" \
  wait_for 10 has_line "$ART/bridge-ha-side.txt" '^fleet/linus/result .*"command":"drive","status":"ok"'

# No loop: one command is one message on each side, one result, one state that moves.
ha_count() { grep -c "$1" "$ART/bridge-ha-side.txt" || true; }
fleet_count() { grep -c "$1" "$ART/bridge-fleet-side.txt" || true; }
mosquitto_pub -p $HA_PORT -q 1 -t fleet/linus/cmd/drive -m '{"direction":"left","hold_ms":300,"id":"bridge-once"}' || true
wait_for 10 has_line "$ART/bridge-ha-side.txt" '^fleet/linus/result .*"id":"bridge-once"' || true
sleep 2
echo "     (bridge-once: Mosquitto saw $(ha_count '^fleet/linus/cmd/drive .*bridge-once') command(s), $(ha_count '^fleet/linus/result .*bridge-once') result(s), $(ha_count '^fleet/linus/state .*"motion":"left"') state(s) turning left; fleet-broker saw $(fleet_count '^fleet/linus/cmd/drive .*bridge-once') command(s))"
check "nothing loops: one command on Mosquitto reaches fleet-broker once, and is not sent back" \
  test "$(fleet_count '^fleet/linus/cmd/drive .*bridge-once')-$(ha_count '^fleet/linus/cmd/drive .*bridge-once')" = 1-1
check "... it gives exactly one result and one state turning left on Mosquitto" \
  test "$(ha_count '^fleet/linus/result .*bridge-once')-$(ha_count '^fleet/linus/state .*"motion":"left"')" = 1-1

# Home Assistant's birth message: the node re-publishes its discovery (within 0-3 s), once.
discovery_before=$(ha_count '^homeassistant/device/fleet_linus/config ')
mosquitto_pub -p $HA_PORT -t homeassistant/status -m online || true
check "Home Assistant's birth message (homeassistant/status online) on Mosquitto reaches fleet-broker" \
  wait_for 5 has_line "$ART/bridge-fleet-side.txt" '^homeassistant/status online$'
check "... the node hears it and re-publishes its discovery" \
  wait_for 5 has_line "$ART/bridge-node.log" 'Home Assistant started: re-publishing discovery'
check "... which arrives on Mosquitto" \
  wait_for 6 bash -c "test \$(grep -c '^homeassistant/device/fleet_linus/config ' '$ART/bridge-ha-side.txt') -gt $discovery_before"
sleep 1
check "... once, and the birth message is not echoed back (no loop)" \
  test "$(ha_count '^homeassistant/device/fleet_linus/config ')-$(ha_count '^homeassistant/status ')-$(fleet_count '^homeassistant/status ')" \
  = "$((discovery_before + 1))-1-1"

# Decommission is not Home Assistant's to send: fleet-broker refuses it from the bridge.
mosquitto_pub -p $HA_PORT -q 1 -t fleet/linus/cmd/decommission -n || true
check "a decommission published on Mosquitto is refused by fleet-broker's ACL (logged)" \
  wait_for 5 has_line "$ART/bridge-fleet-broker.log" 'publish refused.*user="ha-bridge".*topic=fleet/linus/cmd/decommission'
sleep 1
check "... it never reaches linus, which stays online and answers no decommission" \
  bash -c "! grep -q '^fleet/linus/cmd/decommission' '$ART/bridge-fleet-side.txt' &&
    ! grep -q '\"command\":\"decommission\"' '$ART/bridge-ha-side.txt' && kill -0 $BR_NODE_PID &&
    mosquitto_sub -p $HA_PORT -C 1 -W 5 -t fleet/linus/status | grep -qx online"
mosquitto_pub -p $HA_PORT -q 1 -t fleet/linus/cmd/eyes -m ON || true
check "... and the bridge still carries commands after the refusal" \
  wait_for 10 has_line "$ART/bridge-ha-side.txt" '^fleet/linus/state .*"eyes":"on"'

# The e-stop from Home Assistant's "Stop all robots" button stops linus mid-drive.
mosquitto_pub -p $HA_PORT -q 1 -t fleet/linus/cmd/drive -m '{"direction":"backward","hold_ms":5000}' || true
wait_for 10 has_line "$ART/bridge-ha-side.txt" '^fleet/linus/state .*"motion":"backward"' || true
latest_ha_state_stopped() {
  grep '^fleet/linus/state ' "$ART/bridge-ha-side.txt" | tail -n 1 | grep -q '"motion":"stop"'
}
estop_stops_linus() { # driving backward for 5 s, stopped by the e-stop well before that
  local sent=$SECONDS
  has_line "$ART/bridge-ha-side.txt" '^fleet/linus/state .*"motion":"backward"' || return 1
  mosquitto_pub -p $HA_PORT -q 1 -t fleet/all/cmd/stop -m PRESS || return 1
  wait_for 3 latest_ha_state_stopped && ((SECONDS - sent < 4))
}
check "the e-stop (fleet/all/cmd/stop) through the bridge stops linus while it drives (before its 5 s hold ends)" \
  estop_stops_linus
check "... and its result comes back over the bridge" \
  wait_for 5 has_line "$ART/bridge-ha-side.txt" '^fleet/linus/result .*"command":"stop","status":"ok"'

# The latched e-stop goes both ways: Home Assistant latches and releases it on Mosquitto
# (its buttons publish it retained), every robot on fleet-broker obeys, and Mosquitto
# shows what fleet-broker holds.
mosquitto_pub -p $HA_PORT -q 1 -r -t fleet/estop -m '{"engaged":true,"by":"Home Assistant"}' || true
check "the latch published (retained) on Mosquitto reaches fleet-broker: linus says it is latched" \
  wait_for 10 has_line "$ART/bridge-ha-side.txt" '^fleet/linus/state .*"estop":"engaged"'
sleep 2
echo "     (latch: Mosquitto saw $(ha_count '^fleet/estop ') message(s), fleet-broker $(fleet_count '^fleet/estop '))"
check "... once on each side: the latch does not loop" \
  test "$(ha_count '^fleet/estop ')-$(fleet_count '^fleet/estop ')" = 1-1
mosquitto_pub -p $HA_PORT -q 1 -t fleet/linus/cmd/drive -m forward || true
check "... a drive through the bridge is refused (estop_engaged)" \
  wait_for 10 has_line "$ART/bridge-ha-side.txt" '^fleet/linus/result .*"command":"drive".*"code":"estop_engaged"'
mosquitto_pub -p $HA_PORT -q 1 -r -t fleet/estop -m '{"engaged":false,"by":"Home Assistant"}' || true
check "... released on Mosquitto, linus takes motion again" \
  wait_for 10 has_line "$ART/bridge-ha-side.txt" '^fleet/linus/state .*"estop":"clear"'

# A retained command on Mosquitto would be sent again on every reconnect of the bridge:
# fleet-broker refuses it, now and after it restarts.
mosquitto_pub -p $HA_PORT -r -q 1 -t fleet/linus/cmd/drive -m right || true
check "a retained command published on Mosquitto is refused by fleet-broker (logged), linus does not move" \
  bash -c "for i in \$(seq 50); do grep -q 'publish refused.*user=\"ha-bridge\".*topic=fleet/linus/cmd/drive.*retain' '$ART/bridge-fleet-broker.log' && break; sleep 0.1; done
    grep -q 'publish refused.*user=\"ha-bridge\".*topic=fleet/linus/cmd/drive.*retain' '$ART/bridge-fleet-broker.log' &&
    sleep 1 && ! grep -q '^fleet/linus/state .*\"motion\":\"right\"' '$ART/bridge-ha-side.txt'"

# fleet-broker restarts: Mosquitto says the bridge is down, then reconnects by itself.
kill -TERM $BR_BROKER_PID 2>/dev/null || true
wait $BR_BROKER_PID 2>/dev/null || true
check "fleet-broker stopped: Mosquitto says the bridge is down (fleet-bridge/connected 0)" \
  wait_for 5 has_line "$ART/bridge-ha-side.txt" '^fleet-bridge/connected 0$'
refused_before=$(grep -c 'publish refused.*topic=fleet/linus/cmd/drive' "$ART/bridge-fleet-broker.log" || true)
lines_before=$(wc -l <"$ART/bridge-ha-side.txt")
start_bridge_broker
check "... restarted: the bridge reconnects (1) and linus is back online on Mosquitto" \
  wait_for 20 bash -c "tail -n +$((lines_before + 1)) '$ART/bridge-ha-side.txt' | grep -q '^fleet-bridge/connected 1$' &&
    tail -n +$((lines_before + 1)) '$ART/bridge-ha-side.txt' | grep -q '^fleet/linus/status online$'"
mosquitto_pub -p $HA_PORT -q 1 -t fleet/linus/cmd/drive -m '{"direction":"forward","id":"bridge-after-restart"}' || true
check "... a command through the bridge works again" \
  wait_for 10 has_line "$ART/bridge-ha-side.txt" '^fleet/linus/result .*"id":"bridge-after-restart".*"status":"ok"'
check "... and the retained command, sent again by the bridge on reconnect, is refused again" \
  bash -c "test \$(grep -c 'publish refused.*topic=fleet/linus/cmd/drive' '$ART/bridge-fleet-broker.log') -gt $refused_before &&
    ! grep -q '^fleet/linus/state .*\"motion\":\"right\"' '$ART/bridge-ha-side.txt'"
check "fleet-broker took the bridge's CONNECT every time (no version error, no refusal)" \
  bash -c "! grep -q 'version detection failed\|CONNECT refused' '$ART/bridge-fleet-broker.log'"

kill $BR_NODE_PID $BR_GATEWAY_PID $BR_MOSQ_PID $BR_BROKER_PID 2>/dev/null || true
