"""HTTP load for the end-to-end fault tests: streams commands at the gateway and accounts
for every one of them.

  load.py stream BASE ROBOT RATE SECONDS OUT.json
      POST ...?wait=true at RATE per second for SECONDS (one thread per request, so a slow
      answer never delays the next send). Every request must get exactly one answer: 200
      with the robot's result, or a clear refusal (503 broker unavailable, 504 no result
      in time, 429). Writes the tally and the ids of the results to OUT.json.

  load.py burst BASE ROBOT COUNT WORKERS OUT.json
      COUNT fire-and-forget commands (202 expected) from WORKERS threads as fast as they
      go: far beyond the sustainable rate. Writes the status-code tally to OUT.json.
"""

import json
import sys
import threading
import time
import urllib.error
import urllib.request

ACCEPTABLE_STREAM = {200, 429, 503, 504}


def post(url, body, timeout=10.0):
    request = urllib.request.Request(url, data=body.encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        try:
            payload = json.loads(error.read() or b"null")
        except ValueError:
            payload = None
        return error.code, payload
    except (urllib.error.URLError, OSError) as error:
        return 0, {"error": str(error)}


def stream(base, robot, rate, seconds, out):
    url = f"{base}/api/robots/{robot}/commands/eyes?wait=true"
    answers = []
    lock = threading.Lock()

    def one(n):
        status, payload = post(url, "on" if n % 2 else "off")
        with lock:
            answers.append((n, status, payload))

    threads = []
    total = int(rate * seconds)
    start = time.monotonic()
    for n in range(total):
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=one, args=(n,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()

    tally = {}
    ids = []
    for _, status, payload in answers:
        tally[str(status)] = tally.get(str(status), 0) + 1
        if status == 200 and isinstance(payload, dict):
            ids.append(payload.get("id"))
    answered_once = sorted(n for n, _, _ in answers) == list(range(total))
    result = {
        "sent": total,
        "answered": len(answers),
        "answered_exactly_once": answered_once,
        "statuses": tally,
        "unexpected": [s for _, s, _ in answers if s not in ACCEPTABLE_STREAM],
        "result_ids": ids,
        "duplicate_ids": len(ids) - len(set(ids)),
    }
    json.dump(result, open(out, "w"), indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "result_ids"}))
    ok = answered_once and not result["unexpected"] and result["duplicate_ids"] == 0
    return 0 if ok else 1


def burst(base, robot, count, workers, out):
    url = f"{base}/api/robots/{robot}/commands/eyes"
    tally = {}
    lock = threading.Lock()
    counter = iter(range(count))

    def worker():
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            status, _ = post(url, "on" if n % 2 else "off")
            with lock:
                tally[str(status)] = tally.get(str(status), 0) + 1

    start = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    result = {"sent": count, "seconds": round(elapsed, 2), "statuses": tally}
    json.dump(result, open(out, "w"), indent=1)
    print(json.dumps(result))
    return 0 if sum(tally.values()) == count else 1


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "stream":
        sys.exit(stream(sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]), sys.argv[6]))
    if mode == "burst":
        sys.exit(burst(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]))
    sys.exit(f"unknown mode {mode}")
