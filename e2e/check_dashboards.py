"""Runs every PromQL query of every Grafana dashboard against a live Prometheus.

Fails on a query that errors or returns no data. Usage:
    python3 e2e/check_dashboards.py http://127.0.0.1:9090 grafana/dashboards robot-name
"""
import json
import pathlib
import sys
import urllib.parse
import urllib.request


def queries(dashboard):
    for panel in dashboard.get("panels", []):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield panel["title"], target["expr"]


def run(prometheus, expr):
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
    except Exception as error:  # HTTP 400 carries the PromQL error in its body
        detail = getattr(error, "read", lambda: b"")().decode(errors="replace")
        return f"error: {error} {detail}"
    if body.get("status") != "success":
        return f"error: {body.get('error')}"
    if not body["data"]["result"]:
        return "no data"
    return None


def main():
    prometheus, folder, robot = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
    failures, count = [], 0
    for path in sorted(folder.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for title, expr in queries(dashboard):
            concrete = expr.replace("$__rate_interval", "1m").replace("$robot", robot)
            count += 1
            problem = run(prometheus, concrete)
            if problem:
                failures.append(f"{path.name} / {title}: {problem}\n    {concrete}")
    for failure in failures:
        print(failure)
    print(f"dashboards: {count - len(failures)} passed, {len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
