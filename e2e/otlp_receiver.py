"""A real OTLP/HTTP traces endpoint (POST /v1/traces, protobuf) for the end-to-end suite.
Writes one JSON line per span: service, name, kind, trace_id, span_id, parent_span_id.
Usage: otlp_receiver.py PORT FILE   (needs the opentelemetry-proto package)"""
import http.server
import json
import sys

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

PORT, OUT = int(sys.argv[1]), sys.argv[2]
KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        request = trace_service_pb2.ExportTraceServiceRequest()
        request.ParseFromString(body)
        with open(OUT, "a") as out:
            for resource in request.resource_spans:
                service = next((a.value.string_value for a in resource.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        out.write(json.dumps({
                            "service": service, "name": span.name, "kind": KINDS.get(span.kind, span.kind),
                            "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                        }) + "\n")
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args):
        pass


http.server.HTTPServer(("127.0.0.1", PORT), Receiver).serve_forever()
