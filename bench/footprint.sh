#!/usr/bin/env bash
# Footprint of robot-node: idle resident memory and CPU, and the release binary sizes.
# Usage: bench/footprint.sh [seconds-idle]   (builds the release binaries first)
# Runs a fleet-broker and one robot-node (simulated driver, metrics port on) on loopback,
# lets the node sit idle, then reads its VmRSS/VmHWM and CPU ticks from /proc. As the
# reference, an idle mosquitto_sub (a small C MQTT client) is measured the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE=${1:-30}
PORT=${FOOTPRINT_MQTT_PORT:-18841}
cargo build --release --workspace --bins --quiet
BIN=target/release

"$BIN/fleet-broker" --mqtt-addr 127.0.0.1:$PORT >/tmp/footprint-broker.log 2>&1 &
BROKER=$!
REF=
trap 'kill $BROKER $NODE $REF 2>/dev/null || true' EXIT
sleep 0.5
"$BIN/robot-node" --robot linus --driver simulated --broker 127.0.0.1:$PORT \
  --metrics-addr 127.0.0.1:19142 >/tmp/footprint-node.log 2>&1 &
NODE=$!
mosquitto_sub -h 127.0.0.1 -p $PORT -q 1 -t 'fleet/linus/cmd/#' >/dev/null 2>&1 &
REF=$!
sleep 2   # connected, subscribed, state published

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
start=$(ticks $NODE); ref_start=$(ticks $REF)
sleep "$IDLE"
end=$(ticks $NODE); ref_end=$(ticks $REF)
hz=$(getconf CLK_TCK)

echo "robot-node idle for ${IDLE}s (simulated driver, metrics port on, connected to fleet-broker)"
echo "  resident memory (VmRSS): $(kib $NODE VmRSS) KiB"
echo "  peak resident (VmHWM):   $(kib $NODE VmHWM) KiB"
echo "  CPU while idle:          $(( (end - start) * 1000 / hz )) ms over ${IDLE}s"
echo "reference: mosquitto_sub idle on the same broker"
echo "  resident memory (VmRSS): $(kib $REF VmRSS) KiB"
echo "  CPU while idle:          $(( (ref_end - ref_start) * 1000 / hz )) ms over ${IDLE}s"
echo "  robot-node / mosquitto_sub RSS: $(awk -v a="$(kib $NODE VmRSS)" -v b="$(kib $REF VmRSS)" 'BEGIN {printf "%.2f", a / b}')"
echo "release binaries (bytes):"
for b in robot-node fleet-broker fleet-gateway fleet; do
  printf '  %-14s %s\n' "$b" "$(stat -c %s "$BIN/$b")"
done
