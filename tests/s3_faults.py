"""A fault-injecting HTTP proxy in front of an S3 endpoint (moto), for tests.

Real S3 answers ``503 SlowDown`` under load and connections drop; boto3 retries both. What must hold is
the store's promise (midpo/storage.py): a version is complete exactly when its manifest exists, and a
complete version has every file its manifest lists. :class:`FaultyProxy` makes those failures happen on a
deterministic schedule, between an unmodified boto3 and an unmodified moto, so a test can check both.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOWDOWN = b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message><RequestId>faulty-proxy</RequestId></Error>'
# Per-connection headers (RFC 9110 7.6.1) are not forwarded: the proxy frames each hop's body itself, and it
# has answered ``Expect: 100-continue`` already (BaseHTTPRequestHandler does) and holds the whole body.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "content-length", "expect"}


class FaultyProxy:
    """An HTTP/1.1 proxy to ``upstream`` that, while armed, fails every ``every``-th request.

    The faults cycle through ``modes``: ``"slowdown"`` (S3's 503, nothing forwarded), ``"reset"`` (the
    request is read, never forwarded, and the connection is reset: TCP RST through SO_LINGER 0) and
    ``"lost-reply"`` (forwarded and executed upstream, then reset: the client cannot know it took effect).
    An attempt numbered above ``max_faults_per_call`` (botocore's ``amz-sdk-request: attempt=N``) is
    never faulted, so every call gets through within boto3's attempts however requests interleave.
    ``fail_if(method, path, attempt)`` forces a fault (the next in the cycle, or the mode it returns) on
    the requests it matches, armed or not, whatever their attempt: to fail some requests once each, or
    always (a writer that dies). Counters: ``requests``, ``slowdowns``, ``resets``
    (both kinds of RST) and ``lost_replies`` (the resets after forwarding); ``log`` holds ``(method,
    path, fault or None)`` of every request, to check whose requests were faulted.
    """

    def __init__(self, upstream: str, every: int = 3, modes: tuple[str, ...] = ("slowdown", "reset"), max_faults_per_call: int = 2) -> None:
        if every < 2 or not set(modes) <= {"slowdown", "reset", "lost-reply"}:
            raise ValueError(f"every must be >= 2 (a retry must get through), modes among slowdown/reset/lost-reply: {every}, {modes}")
        self.upstream = urlparse(upstream)
        self.every, self.modes, self.max_faults_per_call = every, modes, max_faults_per_call
        self.fail_if: Callable[[str, str, int], bool | str | None] | None = None
        self.requests = self.slowdowns = self.resets = self.lost_replies = 0
        self.log: list[tuple[str, str, str | None]] = []
        self._armed_until, self._armed_seen, self._faults = 0.0, 0, 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.proxy = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> str:
        threading.Thread(target=self._server.serve_forever, name="faulty-proxy", daemon=True).start()
        return self.url

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def arm(self, seconds: float | None = None) -> None:
        """Inject faults from now on, for ``seconds`` or until :meth:`disarm`."""
        self._armed_until = float("inf") if seconds is None else time.monotonic() + seconds

    def disarm(self) -> None:
        self._armed_until = 0.0

    @property
    def armed(self) -> bool:
        return time.monotonic() < self._armed_until

    def _decide(self, method: str, path: str, headers: http.client.HTTPMessage) -> str | None:
        """The fault for this request (None: forward it); counts it."""
        found = re.search(r"attempt=(\d+)", headers.get("amz-sdk-request", ""))
        attempt = int(found[1]) if found else 1
        with self._lock:
            self.requests += 1
            mode = None
            if forced := self.fail_if is not None and self.fail_if(method, path, attempt):
                mode = forced if isinstance(forced, str) else self.modes[self._faults % len(self.modes)]
            elif self.armed:
                self._armed_seen += 1
                if self._armed_seen % self.every == 0 and attempt <= self.max_faults_per_call:
                    mode = self.modes[self._faults % len(self.modes)]
            self.log.append((method, path, mode))
            if mode:
                self._faults += 1
                self.slowdowns += mode == "slowdown"
                self.resets += mode != "slowdown"
                self.lost_replies += mode == "lost-reply"
            return mode


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as boto3's connection pool expects
    server: ThreadingHTTPServer
    _upstream: http.client.HTTPConnection | None = None  # one per client connection (this handler)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet: tests read their own output
        pass

    def _handle(self) -> None:
        proxy: FaultyProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._read_body()  # first, so a fault leaves the connection in a known state
        fault = proxy._decide(self.command, self.path, self.headers)
        if fault == "slowdown":
            self.send_response_only(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOWDOWN)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(SLOWDOWN)
            return
        if fault == "reset":
            return self._reset()
        try:
            response = self._forward(body)
        except (OSError, http.client.HTTPException):  # upstream is down: say so, as a gateway does (boto3 retries a 502 too)
            self.send_error(502)
            return
        if fault == "lost-reply":
            response.read()
            return self._reset()
        self._relay(response)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers, then the blank line
                pass
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, body: bytes) -> http.client.HTTPResponse:
        """Send the request upstream as received (Host included: it is signed), the body re-framed."""
        for retry in (False, True):  # once more on a fresh connection: upstream may have closed an idle one
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(self.server.proxy.upstream.netloc, timeout=120)  # type: ignore[attr-defined]
            try:
                self._upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        self._upstream.putheader(name, value)
                if body or "Content-Length" in self.headers or "Transfer-Encoding" in self.headers:
                    self._upstream.putheader("Content-Length", str(len(body)))
                self._upstream.endheaders(body or None)
                return self._upstream.getresponse()
            except (ConnectionError, http.client.HTTPException):
                self._upstream.close()
                self._upstream = None
                if retry:
                    raise
        raise AssertionError("unreachable")

    def _relay(self, response: http.client.HTTPResponse) -> None:
        """Stream the response back: its length kept when known, else re-chunked (keep-alive either way)."""
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        no_body = self.command == "HEAD" or response.status in (204, 304)
        length = response.getheader("Content-Length")
        if length is not None:
            self.send_header("Content-Length", length)
        elif not no_body:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        while chunk := response.read(1 << 16):
            self.wfile.write(chunk if length is not None else b"%x\r\n%s\r\n" % (len(chunk), chunk))
        if length is None and not no_body:
            self.wfile.write(b"0\r\n\r\n")

    def _reset(self) -> None:
        """Drop the connection without an answer: SO_LINGER {on, 0} makes close() send a TCP RST."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.rfile.close()  # the socket closes for real only when its last file object does
        self.connection.close()

    def finish(self) -> None:
        super().finish()
        if self._upstream is not None:
            self._upstream.close()
