#!/usr/bin/env python3
"""Floods a standalone fleet-broker the way a hostile client would, and reports the
broker's memory (VmRSS) and whether a robot still gets in after each flood.

Usage: python3 bench/hostile-floods.py path/to/fleet-broker [label]

Each flood runs against a fresh broker with a users file (robots linus and torvalds, an
admin), on loopback; attackers use other 127.0.0.x source addresses than the robot. The
broker is killed after each flood. Prints one JSON line per flood:
- wrong_passwords: 5 rounds of 128 concurrent wrong-password CONNECTs from 32 addresses,
  while a robot that logged in before reconnects (its slowest CONNACK);
- idle_connections: 18,000 connections from 4 addresses that send nothing (the process
  limit is 20,000 descriptors), a robot connecting meanwhile, then how many the broker
  closed by itself within 12 s;
- retained_by_a_robot: a robot publishing 20,000 retained 1 KiB discovery documents
  under other names;
- deep_retained_topic: an admin's retained publish to a topic of 8,000 levels.
"""

import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

BROKER = sys.argv[1]
LABEL = sys.argv[2] if len(sys.argv) > 2 else os.path.basename(BROKER)
PORT, METRICS = 21883, 29101


def enc_len(n):
    out = b""
    while True:
        b, n = n % 128, n // 128
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def s(x):
    x = x.encode() if isinstance(x, str) else x
    return struct.pack(">H", len(x)) + x


def connect_packet(cid, user=None, pw=None, v=5):
    flags = 0x02 | (0x80 if user else 0) | (0x40 if pw else 0)
    body = s("MQTT") + bytes([v, flags]) + struct.pack(">H", 30) + (b"\x00" if v == 5 else b"")
    body += s(cid) + (s(user) if user else b"") + (s(pw) if pw else b"")
    return b"\x10" + enc_len(len(body)) + body


def publish_packet(topic, payload, retain=True):
    body = s(topic) + b"\x00\x01\x00" + payload
    return bytes([0x32 | (1 if retain else 0)]) + enc_len(len(body)) + body


def open_from(host_byte, timeout=5):
    sock = socket.socket()
    sock.settimeout(timeout)
    sock.bind((f"127.0.0.{host_byte}", 0))
    sock.connect(("127.0.0.1", PORT))
    return sock


def login(cid, user, pw, host_byte=1, timeout=5):
    """CONNACK code, or None when nothing came back."""
    try:
        sock = open_from(host_byte, timeout)
        sock.sendall(connect_packet(cid, user, pw))
        ack = sock.recv(4)
        return sock, (ack[3] if len(ack) >= 4 else None)
    except OSError:
        return None, None


def rss_mib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def hash_password(pw):
    out = subprocess.run([BROKER, "hash-password"], input=pw + "\n", capture_output=True, text=True, check=True)
    return out.stdout.strip()


def start_broker(users_file):
    log = open(os.path.join(tempfile.gettempdir(), f"hostile-{LABEL}.log"), "a")
    proc = subprocess.Popen(
        [BROKER, "--mqtt-addr", f"127.0.0.1:{PORT}", "--ws-addr", "off",
         "--metrics-addr", f"127.0.0.1:{METRICS}", "--users-file", users_file],
        stdout=log, stderr=log)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", PORT), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc


def robot_gets_in():
    started = time.monotonic()
    sock, code = login("robot-linus", "linus", "linus-pw", timeout=10)
    if sock:
        sock.close()
    return code == 0, round((time.monotonic() - started) * 1000, 1)


def flood_wrong_passwords(proc):
    import threading
    def attempt(host, n):
        sock, _ = login(f"m-{host}-{n}", "linus", "guess", host_byte=host, timeout=30)
        if sock:
            sock.close()
    peak = rss_mib(proc.pid)
    slowest, refused = 0.0, 0
    for _round in range(5):
        threads = [threading.Thread(target=attempt, args=(h, n)) for h in range(10, 42) for n in range(4)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak or 0, rss_mib(proc.pid) or 0)
            # A robot that has logged in before reconnects meanwhile.
            ok, ms = robot_gets_in()
            slowest = max(slowest, ms)
            refused += 0 if ok else 1
            time.sleep(0.05)
    return {"attempts": 640, "peak_rss_mib": peak, "robot_slowest_ms_during": slowest,
            "robot_refused_during": refused}


def flood_idle_connections(proc):
    held = []
    refused = 0
    for i in range(18_000):
        try:
            held.append(open_from(10 + i % 4, timeout=2))
        except OSError:
            refused += 1
    time.sleep(1)
    ok, ms = robot_gets_in()
    result = {"opened": len(held), "refused_at_connect": refused, "rss_mib_holding": rss_mib(proc.pid),
              "robot_during_flood": ok, "robot_ms": ms}
    time.sleep(12)  # beyond the handshake timeout
    closed = 0
    for sock in held:
        try:
            sock.settimeout(0.001)
            if sock.recv(1) == b"":
                closed += 1
        except socket.timeout:
            pass
        except OSError:
            closed += 1
        sock.close()
    result["closed_by_broker_after_12s"] = closed
    return result


def flood_retained(proc):
    time.sleep(0.5)  # rmqtt refuses (0x88) a reconnect that follows a disconnect at once
    sock, code = login("robot-linus", "linus", "linus-pw")
    if code != 0:
        return {"error": f"robot login {code}"}
    payload = b"x" * 1024
    for n in range(20_000):
        sock.sendall(publish_packet(f"homeassistant/sensor/fake{n}/config", payload))
    time.sleep(2)
    sock.close()
    return {"retained_publishes": 20_000, "rss_mib": rss_mib(proc.pid)}


def deep_topic(proc):
    sock, code = login("deep", "root", "root-pw")
    sock.sendall(publish_packet("/".join(["x"] * 8000), b"boom"))
    time.sleep(1)
    return {"broker_alive": proc.poll() is None}


def main():
    users = "".join(
        f'[[user]]\nusername = "{u}"\npassword_hash = "{hash_password(u + "-pw")}"\nrole = "{r}"\n'
        for u, r in [("linus", "robot"), ("torvalds", "robot"), ("root", "admin")])
    users_file = os.path.join(tempfile.mkdtemp(), "users.toml")
    open(users_file, "w").write(users)
    for name, flood in [("wrong_passwords", flood_wrong_passwords), ("idle_connections", flood_idle_connections),
                        ("retained_by_a_robot", flood_retained), ("deep_retained_topic", deep_topic)]:
        proc = start_broker(users_file)
        time.sleep(0.5)
        ok, _ = robot_gets_in()
        before = rss_mib(proc.pid)
        result = flood(proc)
        alive = proc.poll() is None
        after_ok, after_ms = robot_gets_in() if alive else (False, None)
        print(json.dumps({"broker": LABEL, "flood": name, "rss_before_mib": before, **result,
                          "rss_after_mib": rss_mib(proc.pid), "alive": alive,
                          "robot_after": after_ok, "robot_after_ms": after_ms}), flush=True)
        proc.kill()
        proc.wait()
        time.sleep(1)


main()
