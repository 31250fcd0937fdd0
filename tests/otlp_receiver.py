"""An OTLP/HTTP trace receiver for tests: decodes the real protobuf payloads it is sent."""

from __future__ import annotations

import gzip
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.procs import free_port


class OtlpReceiver:
    """Collects spans posted to ``/v1/traces``; ``spans`` is a list of plain dicts."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.spans: list[dict[str, Any]] = []
        self.service_names: set[str] = set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    data = gzip.decompress(data)
                req = ExportTraceServiceRequest()
                req.ParseFromString(data)
                receiver._collect(req)
                body = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _collect(self, req: ExportTraceServiceRequest) -> None:
        for rs in req.resource_spans:
            for attr in rs.resource.attributes:
                if attr.key == "service.name":
                    self.service_names.add(attr.value.string_value)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    attrs = {}
                    for a in span.attributes:
                        v = a.value
                        attrs[a.key] = v.string_value or v.int_value or v.double_value
                    self.spans.append(
                        {
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "kind": span.kind,
                            "attributes": attrs,
                        }
                    )

    def wait_for(self, count: int, timeout: float = 8.0) -> list[dict[str, Any]]:
        """The spans, once at least ``count`` arrived (or what there is after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while len(self.spans) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return list(self.spans)

    def stop(self) -> None:
        """Shut the server down."""
        self._server.shutdown()
        self._server.server_close()


class OtlpGrpcReceiver(OtlpReceiver):
    """The same collection over OTLP/gRPC (the TraceService ``Export`` call)."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.spans = []
        self.service_names = set()
        receiver = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> ExportTraceServiceResponse:
                receiver._collect(request)
                return ExportTraceServiceResponse()

        self._grpc = grpc.server(ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self._grpc)
        self._grpc.add_insecure_port(f"127.0.0.1:{self.port}")
        self._grpc.start()

    def stop(self) -> None:
        """Shut the server down."""
        self._grpc.stop(grace=None)
