#!/usr/bin/env bash
# fleet-broker against Mosquitto on this machine, in one run, with the same clients
# (fleet-bench, MQTT 5) and the same parameters: publish-to-deliver latency at a fixed
# rate (QoS 0 and 1), fan-in (8 publishers -> 1 subscriber) and fan-out (1 publisher ->
# 50 subscribers) throughput with every message counted by sequence number, and broker
# CPU per delivered message from /proc/<pid>/stat.
#
# Both brokers run at the same time on their own loopback port, with logins and the
# fleet's ACL: fleet-broker with a users file (argon2 hashes, roles), Mosquitto with a
# password_file (mosquitto_passwd) and an acl_file granting each user what its role
# grants. The clients log in as the fleet's roles would: a controller `bench-ctl` sends
# commands and reads state, robots `bench-1` ... `bench-50` read their commands and
# publish their state. Each scenario runs against both brokers, the order alternating
# from one scenario (and repeat) to the next.
#
# Usage: bench/broker-vs-mosquitto.sh    (about 3 minutes; builds the release binaries)
# Needs: cargo, jq, python3, curl; installs mosquitto with apt-get when it is missing.
# Settings (environment):
#   BVM_REPEAT (2)             runs of every scenario pair; the table shows medians
#   BVM_LAT_RATE (1000)        latency: messages per second ...
#   BVM_LAT_SECONDS (10)       ... for this long
#   BVM_FANIN_RATES ("50000 100000")  paced fan-in: total rates over the 8 publishers ...
#   BVM_FANIN_SECONDS (4)      ... for this long each
#   BVM_FANIN_MESSAGES (25000) unpaced fan-in: messages per publisher
#   BVM_FANOUT_MESSAGES (10000) fan-out: messages, each to all 50 subscribers
#   BVM_OUT (/tmp/broker-vs-mosquitto)  configs, logs and results.jsonl
#   BVM_FLEET_PORT, BVM_MOSQ_PORT, BVM_METRICS_PORT (18871, 18872, 18873)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${BVM_OUT:-/tmp/broker-vs-mosquitto}
FLEET_PORT=${BVM_FLEET_PORT:-18871}
MOSQ_PORT=${BVM_MOSQ_PORT:-18872}
METRICS_PORT=${BVM_METRICS_PORT:-18873}
REPEAT=${BVM_REPEAT:-2}
LAT_RATE=${BVM_LAT_RATE:-1000}
LAT_SECONDS=${BVM_LAT_SECONDS:-10}
FANIN_RATES=${BVM_FANIN_RATES:-50000 100000}
FANIN_SECONDS=${BVM_FANIN_SECONDS:-4}
FANIN_MESSAGES=${BVM_FANIN_MESSAGES:-25000}
FANOUT_MESSAGES=${BVM_FANOUT_MESSAGES:-10000}
ROBOTS=50
rm -rf "$OUT" && mkdir -p "$OUT"

if ! command -v mosquitto >/dev/null || ! command -v mosquitto_passwd >/dev/null; then
  SUDO=
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto >/dev/null
fi
# Debian's package starts its own service on 1883 where there is systemd; ours use
# their own ports and configs.
cargo build --release -p fleet-broker -p fleet-bench --quiet
BIN=target/release
hz=$(getconf CLK_TCK)
ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }

# --- users: one controller, 50 robots; a fresh secret per run -----------------------
SECRET=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
robot_password() { echo "bench-$1-$SECRET"; }
CTL_PASSWORD="ctl-$SECRET"
{
  printf '[[user]]\nusername = "bench-ctl"\npassword_hash = "%s"\nrole = "controller"\n\n' \
    "$(echo "$CTL_PASSWORD" | "$BIN/fleet-broker" hash-password)"
  for i in $(seq 1 $ROBOTS); do
    printf '[[user]]\nusername = "bench-%s"\npassword_hash = "%s"\nrole = "robot"\n\n' \
      "$i" "$(robot_password "$i" | "$BIN/fleet-broker" hash-password)"
  done
} >"$OUT/users.toml"

# Mosquitto: the same users (mosquitto_passwd hashes the file in place) and, per user,
# exactly what the fleet's ACL grants its role (docs/operations.md, "Roles and the ACL").
{
  echo "bench-ctl:$CTL_PASSWORD"
  for i in $(seq 1 $ROBOTS); do echo "bench-$i:$(robot_password "$i")"; done
} >"$OUT/mosquitto.passwd"
mosquitto_passwd -U "$OUT/mosquitto.passwd"
{
  echo "# controller: subscribe within fleet/# and homeassistant/#; publish fleet/+/cmd/+ and homeassistant/status"
  printf 'user bench-ctl\ntopic read fleet/#\ntopic read homeassistant/#\ntopic write fleet/+/cmd/+\ntopic write homeassistant/status\n\n'
  echo "# robots: their own commands and the fleet's in; their own state, status and results, replies and discovery out"
  for i in $(seq 1 $ROBOTS); do
    printf 'user bench-%s\ntopic read fleet/bench-%s/cmd/#\ntopic read fleet/all/cmd/#\ntopic read homeassistant/status\n' "$i" "$i"
    printf 'topic write fleet/bench-%s/state\ntopic write fleet/bench-%s/status\ntopic write fleet/bench-%s/result\n' "$i" "$i" "$i"
    printf 'topic write fleet/_gateway/+/result\ntopic write homeassistant/#\n\n'
  done
} >"$OUT/mosquitto.acl"
# Limits as fleet-broker's defaults (--max-inflight 1024, --max-queue-len 10000) rather
# than Mosquitto's (20 in flight, 1000 queued per client), and TCP_NODELAY as
# fleet-broker sets it on its listeners.
cat >"$OUT/mosquitto.conf" <<EOF
listener $MOSQ_PORT 127.0.0.1
allow_anonymous false
password_file $OUT/mosquitto.passwd
acl_file $OUT/mosquitto.acl
persistence false
set_tcp_nodelay true
max_inflight_messages 1024
max_queued_messages 10000
EOF

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
# fleet-broker: logins on (no anonymous clients), the fleet's ACL and per-topic counters
# as always, its default info logging, metrics endpoint on.
"$BIN/fleet-broker" --mqtt-addr 127.0.0.1:$FLEET_PORT --ws-addr off \
  --metrics-addr 127.0.0.1:$METRICS_PORT --users-file "$OUT/users.toml" >"$OUT/fleet-broker.log" 2>&1 &
FLEET_PID=$!
pids+=($FLEET_PID)
mosquitto -c "$OUT/mosquitto.conf" >"$OUT/mosquitto.log" 2>&1 &
MOSQ_PID=$!
pids+=($MOSQ_PID)
for broker in fleet-broker:$FLEET_PORT mosquitto:$MOSQ_PORT; do
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/${broker#*:}) 2>/dev/null && continue 2; sleep 0.1; done
  echo "${broker%:*} is not listening on ${broker#*:}"; tail -20 "$OUT/${broker%:*}.log"; exit 1
done
# Both brokers idle, connected to nobody: their background CPU.
f0=$(ticks $FLEET_PID) m0=$(ticks $MOSQ_PID)
sleep 5
IDLE_CPU="idle CPU over 5 s: fleet-broker $((($(ticks $FLEET_PID) - f0) * 1000 / hz)) ms, mosquitto $((($(ticks $MOSQ_PID) - m0) * 1000 / hz)) ms"
MOSQ_VERSION=$( (mosquitto -h 2>/dev/null || true) | awk 'NR == 1 {print $3}')

# run CASE BROKER fleet-bench-args...: one run, its JSON line appended to results.jsonl.
run() {
  local case=$1 broker=$2 port pid
  shift 2
  if [ "$broker" = fleet-broker ]; then port=$FLEET_PORT pid=$FLEET_PID; else port=$MOSQ_PORT pid=$MOSQ_PID; fi
  kill -0 "$pid" 2>/dev/null || { echo "$broker (pid $pid) is not running any more"; tail -20 "$OUT/$broker.log"; exit 1; }
  local t0 t1 line
  t0=$(ticks "$pid")
  if ! line=$("$BIN/fleet-bench" "$@" --broker 127.0.0.1:$port --broker-pid "$pid" --label "$broker" --drain-ms 2000 2>"$OUT/bench.err"); then
    line=$(jq -cn --arg e "$(tail -3 "$OUT/bench.err")" '{error: $e}')
  fi
  t1=$(ticks "$pid")
  # broker_cpu_total_ms: the whole invocation, logins included (argon2 on fleet-broker).
  jq -c --arg case "$case" --arg b "$broker" --argjson total "$(((t1 - t0) * 1000 / hz))" \
    '{case: $case, broker_name: $b, broker_cpu_total_ms: $total} + .' <<<"$line" | tee -a "$OUT/results.jsonl" |
    jq -r '"\(.case) \(.broker_name): " + (if .error then "FAILED: \(.error)" else
      "sent \(.sent) expected \(.expected) unique \(.unique) lost \(.lost) dup \(.duplicates) msgs/s \(.msgs_per_s) p50 \(.p50_us)us p99 \(.p99_us)us p99.9 \(.p999_us)us cpu \(.broker_cpu_us_per_msg)us/msg" +
      (if (.errors | length) > 0 then " errors: \(.errors | join("; "))" else "" end) end)'
}

# The logins for each scenario: (publisher, subscriber) users, {i} the client's index.
as_controller_to_robots() {
  export FLEET_BENCH_PUB_USERNAME=bench-ctl FLEET_BENCH_PUB_PASSWORD=$CTL_PASSWORD
  export FLEET_BENCH_SUB_USERNAME='bench-{i}' FLEET_BENCH_SUB_PASSWORD="bench-{i}-$SECRET"
  export FLEET_BENCH_SUB_CLIENT_ID='robot-bench-{i}'; unset FLEET_BENCH_PUB_CLIENT_ID
}
as_robots_to_controller() {
  export FLEET_BENCH_PUB_USERNAME='bench-{i}' FLEET_BENCH_PUB_PASSWORD="bench-{i}-$SECRET"
  export FLEET_BENCH_PUB_CLIENT_ID='robot-bench-{i}'; unset FLEET_BENCH_SUB_CLIENT_ID
  export FLEET_BENCH_SUB_USERNAME=bench-ctl FLEET_BENCH_SUB_PASSWORD=$CTL_PASSWORD
}

order=0
pair() { # pair CASE LOGINS fleet-bench-args...: both brokers, alternating which goes first
  local case=$1 logins=$2
  shift 2
  $logins
  if ((order % 2 == 0)); then
    run "$case" fleet-broker "$@"; sleep 1; run "$case" mosquitto "$@"
  else
    run "$case" mosquitto "$@"; sleep 1; run "$case" fleet-broker "$@"
  fi
  order=$((order + 1))
  sleep 1
}

echo "== fleet-broker vs mosquitto $MOSQ_VERSION: $(nproc) cores, Linux $(uname -r), $(date -u +%Y-%m-%dT%H:%MZ) =="
echo "$IDLE_CPU"

# The ACLs are on and equivalent: a robot cannot read another robot's commands, a
# controller cannot publish a robot's state, a wrong password is refused.
acl_check() { # acl_check BROKER PORT
  local sub pub login
  sub=$(FLEET_BENCH_PUB_USERNAME=bench-ctl FLEET_BENCH_PUB_PASSWORD=$CTL_PASSWORD \
    FLEET_BENCH_SUB_USERNAME=bench-2 FLEET_BENCH_SUB_PASSWORD=$(robot_password 2) FLEET_BENCH_SUB_CLIENT_ID=robot-bench-2 \
    "$BIN/fleet-bench" latency --broker 127.0.0.1:$2 --rate 100 --seconds 0.2 --drain-ms 500 2>&1 |
    jq -Rr 'fromjson? // . | if type == "object" then "SUBACK granted, \(.received) of \(.sent) delivered" else . end' | head -1 || true)
  pub=$(FLEET_BENCH_USERNAME=bench-ctl FLEET_BENCH_PASSWORD=$CTL_PASSWORD \
    "$BIN/fleet-bench" latency --broker 127.0.0.1:$2 --rate 100 --seconds 0.2 --drain-ms 500 \
    --pub-topic fleet/bench-1/state --sub-topic 'fleet/+/state' 2>&1 |
    jq -Rr 'fromjson? // . | if type == "object" then "\(.refused) of \(.sent) refused (\(.errors | join("; "))), \(.received) delivered" else . end' | head -1 || true)
  login=$(FLEET_BENCH_USERNAME=bench-1 FLEET_BENCH_PASSWORD=wrong \
    "$BIN/fleet-bench" latency --broker 127.0.0.1:$2 --rate 100 --seconds 0.1 2>&1 | head -1 || true)
  echo "$1 ACL check: bench-2 subscribing fleet/bench-1/cmd/#: $sub"
  echo "$1 ACL check: bench-ctl publishing fleet/bench-1/state: $pub"
  echo "$1 ACL check: bench-1 with a wrong password: $login"
}
acl_check fleet-broker $FLEET_PORT
acl_check mosquitto $MOSQ_PORT
for rep in $(seq 1 "$REPEAT"); do
  ((REPEAT == 1)) || echo "-- repeat $rep of $REPEAT --"
  for qos in 0 1; do
    pair "latency-qos$qos" as_controller_to_robots latency --qos $qos --rate "$LAT_RATE" --seconds "$LAT_SECONDS"
  done
  # Fan-in at fixed rates (latency under load, and where losses start), then as fast as
  # the publishers can send.
  for rate in $FANIN_RATES; do
    pair "fan-in-qos1-$((rate / 1000))k/s" as_robots_to_controller fan-in --qos 1 --publishers 8 \
      --messages $((rate * FANIN_SECONDS / 8)) --rate "$rate"
  done
  for qos in 1 0; do
    pair "fan-in-qos$qos-max" as_robots_to_controller fan-in --qos $qos --publishers 8 --messages "$FANIN_MESSAGES"
  done
  for qos in 1 0; do
    pair "fan-out-qos$qos-max" as_controller_to_robots fan-out --qos $qos --subscribers $ROBOTS --messages "$FANOUT_MESSAGES"
  done
done
# What each broker still holds once every client has gone: 2 s after the run, and 30 s
# after, once fleet-broker's password threads have handed their argon2 memory back (after
# 10 quiet seconds) and its queues have shrunk.
rss_mib() { awk '/^VmRSS/ {printf "%.1f MiB", $2 / 1024}' "/proc/$1/status"; }
sleep 2
RSS_AFTER="resident memory, every client gone: 2 s after the run fleet-broker $(rss_mib $FLEET_PID), mosquitto $(rss_mib $MOSQ_PID)"
sleep 28
echo "$RSS_AFTER; 30 s after fleet-broker $(rss_mib $FLEET_PID), mosquitto $(rss_mib $MOSQ_PID)"
# fleet-broker's own count of what it dropped, next to the one-warning-per-drop log lines.
echo "fleet-broker, whole run: $(grep -c 'message dropped' "$OUT/fleet-broker.log" || true) \"message dropped\" log lines ($(du -h "$OUT/fleet-broker.log" | cut -f1) of log);" \
  "$(curl -fsS "http://127.0.0.1:$METRICS_PORT/metrics" | grep -E '^fleet_broker_messages_dropped_total' | tr '\n' ' ' || true)"

python3 - "$OUT/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
cases = list(dict.fromkeys(r["case"] for r in rows))
def value(case, broker, key):
    xs = [r.get(key) for r in rows if r["case"] == case and r["broker_name"] == broker]
    xs = [x for x in xs if isinstance(x, (int, float))]
    return statistics.median(xs) if xs else None
def fmt(x, unit=""):
    if x is None:
        return "failed"
    x = round(x, 2) if abs(x) < 10 else round(x)
    if x == int(x):
        x = int(x)
    return f"{x:,}{unit}"
# Paced runs: latency. Unpaced runs: throughput (their latencies are mostly queueing).
paced = [("delivered/s", "msgs_per_s", ""), ("p50", "p50_us", " µs"), ("p99", "p99_us", " µs"),
         ("p99.9", "p999_us", " µs"), ("max", "max_us", " µs")]
# (At QoS 1 the publishers' rate is how fast the broker acknowledged them; at QoS 0 it is
# only how fast the client wrote into its socket, so it is left out.)
unpaced_qos1 = [("publishes acknowledged/s", "published_per_s", ""), ("delivered/s", "msgs_per_s", "")]
unpaced_qos0 = [("delivered/s", "msgs_per_s", "")]
common = [("lost / expected (each run)", None, ""), ("duplicates", "duplicates", ""),
          ("broker CPU per delivered msg", "broker_cpu_us_per_msg", " µs")]
print("\n| scenario | metric | fleet-broker | mosquitto | fleet / mosquitto |")
print("|---|---|---|---|---|")
for case in cases:
    is_paced = any(r.get("offered_per_s") for r in rows if r["case"] == case)
    qos1 = any(r.get("qos") == 1 for r in rows if r["case"] == case)
    for label, key, unit in (paced if is_paced else unpaced_qos1 if qos1 else unpaced_qos0) + common:
        if key is None:  # every run's count, not a median
            def show(broker):
                runs = [r for r in rows if r["case"] == case and r["broker_name"] == broker]
                if not runs or any("lost" not in r for r in runs):
                    return "failed"
                return "; ".join(f"{r['lost']:,}" for r in runs) + f" / {runs[0]['expected']:,}"
            print(f"| {case} | {label} | {show('fleet-broker')} | {show('mosquitto')} | |")
            continue
        f, m = value(case, "fleet-broker", key), value(case, "mosquitto", key)
        ratio = f"{f / m:.2f}" if f is not None and m else "—"
        print(f"| {case} | {label} | {fmt(f, unit)} | {fmt(m, unit)} | {ratio} |")
bad = [r for r in rows if r.get("error") or r.get("lost") or r.get("duplicates") or r.get("reconnects")
       or r.get("errors") or r.get("timed_out")]
if bad:
    print("\nRuns with losses, duplicates, reconnects or errors:")
    for r in bad:
        print(f"  {r['case']} {r['broker_name']}: " + (r.get("error") or
              f"lost {r['lost']} of {r['expected']} ({r['subscribers_with_loss']} subscribers, at most "
              f"{r['max_lost_by_one_subscriber']} each), duplicates {r['duplicates']}, reconnects "
              f"{r['reconnects']}, timed out {r['timed_out']}, errors {r['errors']}"))
PY
echo "raw results: $OUT/results.jsonl; broker logs and configs: $OUT/"
