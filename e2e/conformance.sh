#!/usr/bin/env bash
# The Eclipse Paho MQTT interoperability suites (MQTT 3.1.1 `client_test`, MQTT 5
# `client_test5`) against fleet-broker and, side by side in the same run, Mosquitto; both
# with anonymous clients allowed and full access. Fails when fleet-broker passes fewer
# than MIN_V311 (9 of 10) or MIN_V5 (24 of 27) tests.
#
# The suites are not part of this repository (EPL-2.0 / EDL-1.0): they are looked for in
# $FLEET_CONFORMANCE_DIR, ../shared/conformance beside the checkout, then
# /work/shared/conformance. Without them this says so and stops, successfully.
# Usage: e2e/conformance.sh [path/to/fleet-broker]   (default: target/debug/fleet-broker)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BROKER=${1:-$ROOT/target/debug/fleet-broker}
MIN_V311=${MIN_V311:-9}
MIN_V5=${MIN_V5:-24}
FLEET_PORT=${CONFORMANCE_FLEET_PORT:-18841}
MOSQ_PORT=${CONFORMANCE_MOSQUITTO_PORT:-18842}
OUT=${CONFORMANCE_OUT:-$ROOT/e2e/artifacts/conformance}

suites=""
for dir in "${FLEET_CONFORMANCE_DIR:-}" "$ROOT/../shared/conformance" /work/shared/conformance; do
  if [[ -n $dir && -f $dir/run_suite.py ]]; then suites=$dir; break; fi
done
if [[ -z $suites ]]; then
  echo "conformance: the Paho suites were not found (set FLEET_CONFORMANCE_DIR); skipped"
  exit 0
fi
command -v mosquitto >/dev/null || {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends mosquitto >/dev/null
}
mkdir -p "$OUT"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

wait_port() { # wait_port PORT: until something listens there
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

"$BROKER" --allow-anonymous --mqtt-addr 127.0.0.1:$FLEET_PORT --ws-addr off --metrics-addr off \
  >"$OUT/fleet-broker.log" 2>&1 &
pids+=($!)
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$MOSQ_PORT" >"$OUT/mosquitto.conf"
mosquitto -c "$OUT/mosquitto.conf" >"$OUT/mosquitto.log" 2>&1 &
pids+=($!)
wait_port $FLEET_PORT
wait_port $MOSQ_PORT
MOSQ_VERSION=$(mosquitto -h 2>/dev/null | head -1 | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -1 || true)

# Each test runs on its own, under a timeout: a broker that never answers one (Mosquitto
# 2.0.11 hangs in client_test5's test_flow_control2) fails that test, not the whole suite.
test_names() { # test_names SUITE
  python3 - "$suites/paho-mqtt-testing/interoperability" "$1" <<'PY'
import importlib, os, sys, unittest
sys.path.insert(0, sys.argv[1]); os.chdir(sys.argv[1])
print(" ".join(unittest.TestLoader().getTestCaseNames(importlib.import_module(sys.argv[2]).Test)))
PY
}
# run_suite SUITE PORT NAME: runs every test of SUITE against PORT; writes
# $OUT/NAME-SUITE.{txt,passed,failed}.
run_suite() {
  local suite=$1 port=$2 name=$3 base="$OUT/$3-$1"
  : >"$base.txt"; : >"$base.passed"; : >"$base.failed"
  for test in $(test_names "$suite"); do
    local rc=0
    timeout "${CONFORMANCE_TEST_TIMEOUT:-120}" python3 "$suites/run_suite.py" "$suite" 127.0.0.1 "$port" "$test" \
      >>"$base.txt" 2>&1 || rc=$?
    if ((rc == 0)); then echo "$test" >>"$base.passed"
    elif ((rc == 124)); then echo "$test(timeout)" >>"$base.failed"
    else echo "$test" >>"$base.failed"; fi
  done
}
# The two brokers are measured at the same time, each by its own clients.
for suite in client_test client_test5; do
  run_suite $suite $FLEET_PORT fleet &
  fleet_job=$!
  run_suite $suite $MOSQ_PORT mosquitto
  wait $fleet_job
done
score() { echo "$(wc -l <"$OUT/$1-$2.passed")/$(($(wc -l <"$OUT/$1-$2.passed") + $(wc -l <"$OUT/$1-$2.failed")))"; }
fails() { cat "$OUT/$1-client_test.failed" "$OUT/$1-client_test5.failed" | tr '\n' ' '; }
echo "conformance (Eclipse Paho interoperability suites), fleet-broker vs Mosquitto $MOSQ_VERSION, same run:"
printf '  %-22s %-14s %-14s\n' suite fleet-broker mosquitto
printf '  %-22s %-14s %-14s\n' "client_test (3.1.1)" "$(score fleet client_test)" "$(score mosquitto client_test)"
printf '  %-22s %-14s %-14s\n' "client_test5 (5)" "$(score fleet client_test5)" "$(score mosquitto client_test5)"
echo "  fleet-broker fails: $(fails fleet)"
echo "  mosquitto fails:    $(fails mosquitto)"
v311=$(wc -l <"$OUT/fleet-client_test.passed")
v5=$(wc -l <"$OUT/fleet-client_test5.passed")
if ((v311 < MIN_V311 || v5 < MIN_V5)); then
  echo "conformance: fleet-broker passed $v311 (3.1.1) and $v5 (5); at least $MIN_V311 and $MIN_V5 are required"
  exit 1
fi
echo "conformance: ok (at least $MIN_V311 of 10 and $MIN_V5 of 27)"
