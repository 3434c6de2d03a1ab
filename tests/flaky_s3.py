"""A fault-injecting HTTP front for an S3-protocol server on loopback (the tests' flaky object store).

It forwards every request to the real server behind it (moto's, in the tests) and, on the way, answers a
chosen share of them, or a named operation a set number of times, with what real object stores do under
load:

- ``503``: ``503 SlowDown`` ("Please reduce your request rate"),
- ``500``: ``500 InternalError``,
- ``drop``: the connection is reset without an answer (after the request was read),
- ``delay``: the answer comes ``delay_s`` late (a slow request; it still succeeds),
- ``403``: ``403 AccessDenied`` (a permanent error: used by named rules only),
- ``short`` (named rules only): a listing page comes back with its last entries missing and "not truncated";
  an object's body comes back cut in half (framed as a whole one); a HEAD says the object is empty.

Operations are told from the request: ``list`` (GET on a bucket), ``read`` (GET of an object), ``head``,
``write`` (PUT of a whole object), ``copy`` (PUT with a copy source), ``part`` (PUT of a multipart part),
``multipart`` (POST: start or complete an upload), ``delete``. Random faults draw from a seeded generator,
so a run's faults are reproducible for a given sequence of requests; every injected fault is counted.
"""
from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

OPS = ("list", "read", "head", "write", "copy", "part", "multipart", "delete")
RANDOM_KINDS = ("503", "500", "drop", "delay")

_ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "403": (403, "AccessDenied", "Access Denied"),
}


@dataclass
class Rule:
    """Fail the next ``times`` requests of operation ``op`` whose bucket/key (or listing prefix) holds ``match``."""

    op: str
    match: str = ""
    kind: str = "503"
    times: int = 1
    fired: int = 0

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown operation {self.op!r}; one of {OPS}")


@dataclass
class FaultPlan:
    rate: float = 0.0  # share of eligible requests that get a random fault
    kinds: tuple[str, ...] = RANDOM_KINDS
    ops: tuple[str, ...] = OPS  # operations eligible for random faults
    delay_s: float = 0.4
    seed: int = 0
    rules: list[Rule] = field(default_factory=list)


def classify(method: str, path: str, query: str, headers: Any) -> tuple[str, str]:
    """(operation, "bucket/key" or "bucket/prefix" for listings) of one S3 request."""
    bucket, _, key = unquote(path).lstrip("/").partition("/")
    q = parse_qs(query, keep_blank_values=True)
    if method == "GET" and not key:
        return "list", f"{bucket}/{q.get('prefix', [''])[0]}"
    target = f"{bucket}/{key}"
    if method == "GET":
        return "read", target
    if method == "HEAD":
        return "head", target
    if method == "PUT":
        if "partNumber" in q:
            return "part", target
        if headers.get("x-amz-copy-source"):
            return "copy", target
        return "write", target
    if method == "POST":
        return ("delete", target) if "delete" in q else ("multipart", target)
    if method == "DELETE":
        return "delete", target
    return "read", target


class FlakyS3:
    """Start with ``FlakyS3(upstream_port).start()``; point clients at ``.endpoint``; change ``.plan`` any time."""

    def __init__(self, upstream_port: int, plan: FaultPlan | None = None) -> None:
        self.upstream_port = upstream_port
        self.plan = plan or FaultPlan()
        self.lock = threading.Lock()
        self.rng = random.Random(self.plan.seed)
        self.injected: Counter[tuple[str, str]] = Counter()  # (op, kind) -> faults injected
        self.requests: Counter[str] = Counter()  # op -> requests seen
        self._server: ThreadingHTTPServer | None = None

    # -- configuration -------------------------------------------------------------------------------------
    def set_plan(self, plan: FaultPlan) -> None:
        """Inject ``plan``'s faults from now on; the counters start again from zero."""
        with self.lock:
            self.plan, self.rng = plan, random.Random(plan.seed)
            self.injected.clear()
            self.requests.clear()

    def clear(self) -> None:
        self.set_plan(FaultPlan())

    def faults(self) -> int:
        return sum(self.injected.values())

    # -- the decision ----------------------------------------------------------------------------------------
    def decide(self, op: str, target: str) -> str | None:
        with self.lock:
            self.requests[op] += 1
            for rule in self.plan.rules:
                if rule.op == op and rule.match in target and rule.fired < rule.times:
                    rule.fired += 1
                    self.injected[(op, rule.kind)] += 1
                    return rule.kind
            p = self.plan
            if p.rate > 0 and op in p.ops and self.rng.random() < p.rate:
                kind = self.rng.choice(p.kinds)
                self.injected[(op, kind)] += 1
                return kind
        return None

    # -- serving ---------------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FlakyS3":
        front = self

        class Handler(_Handler):
            proxy = front

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="flaky-s3", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Handler(BaseHTTPRequestHandler):
    proxy: FlakyS3
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        body = self._body()
        url = urlsplit(self.path)
        op, target = classify(self.command, url.path, url.query, self.headers)
        kind = self.proxy.decide(op, target)
        if kind == "drop":
            # reset the connection (RST, not a clean close): what a store or a load balancer does under load
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        if kind in _ERRORS:
            status, code, msg = _ERRORS[kind]
            payload = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{msg}</Message>'
                       f"<Resource>{url.path}</Resource><RequestId>flaky-s3</RequestId></Error>").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        if kind == "delay":
            time.sleep(self.proxy.plan.delay_s)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "content-length")}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.upstream_port, timeout=120)
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status, resp_headers = resp.status, resp.getheaders()
        finally:
            conn.close()
        if kind == "short" and op == "list" and status == 200:
            data = _shorten_listing(data)
        elif kind == "short" and op == "read" and status in (200, 206):
            data = data[: len(data) // 2]  # a partial body, framed as a whole one: HTTP cannot tell
        elif kind == "short" and op == "head":
            resp_headers = [(k, "0" if k.lower() == "content-length" else v) for k, v in resp_headers]
        self.send_response(status)
        for k, v in resp_headers:
            if k.lower() not in ("transfer-encoding", "content-length", "connection", "date", "server"):
                self.send_header(k, v)
        # a HEAD answer has no body but tells the object's length: pass the server's on
        length = dict((k.lower(), v) for k, v in resp_headers).get("content-length", "0") if self.command == "HEAD" \
            else str(len(data))
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


def _shorten_listing(xml: bytes) -> bytes:
    """Drop the last half of a listing page's entries and say the listing is complete (a short listing)."""
    text = xml.decode()
    entries = list(re.finditer(r"<Contents>.*?</Contents>", text, flags=re.S))
    if len(entries) < 2:
        return xml
    cut = entries[len(entries) // 2].start()
    end = entries[-1].end()
    text = text[:cut] + text[end:]
    text = re.sub(r"<IsTruncated>true</IsTruncated>", "<IsTruncated>false</IsTruncated>", text)
    text = re.sub(r"<KeyCount>\d+</KeyCount>", f"<KeyCount>{len(entries) // 2}</KeyCount>", text)
    text = re.sub(r"<NextContinuationToken>.*?</NextContinuationToken>", "", text)
    return text.encode()
