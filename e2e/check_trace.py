"""Checks one trace across processes in the spans an OTLP receiver recorded:
gateway server span -> gateway producer span -> robot-node consumer span -> driver span.
Usage: check_trace.py SPANS_FILE TRACE_ID CALLER_SPAN_ID"""
import json
import sys

spans_file, trace_id, caller = sys.argv[1:4]
spans = [json.loads(line) for line in open(spans_file) if line.strip()]
trace = [s for s in spans if s["trace_id"] == trace_id]


def one(description, match):
    found = [s for s in trace if match(s)]
    if not found:
        print(f"missing: {description}; spans of the trace: {json.dumps(trace, indent=1)}")
        sys.exit(1)
    return found[0]


server = one("the gateway's server span, child of the caller",
             lambda s: s["service"] == "fleet-gateway" and s["kind"] == "server" and s["parent_span_id"] == caller)
producer = one("the gateway's producer span, child of the server span",
               lambda s: s["service"] == "fleet-gateway" and s["kind"] == "producer" and s["parent_span_id"] == server["span_id"])
consumer = one("the robot's consumer span, child of the producer span (another process)",
               lambda s: s["service"] == "robot-node" and s["kind"] == "consumer" and s["parent_span_id"] == producer["span_id"])
one("the driver span, child of the consumer span",
    lambda s: s["service"] == "robot-node" and s["name"] == "driver" and s["parent_span_id"] == consumer["span_id"])
print(f"trace {trace_id}: {server['name']} -> {producer['name']} -> {consumer['name']} -> driver")
