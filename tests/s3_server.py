"""Test infrastructure for S3 reads: a local moto server, and a fault-injecting HTTP proxy.

`start_moto_server()` runs moto's standalone S3 server in a subprocess on a free port of
127.0.0.1. `FaultProxy` sits between boto3 and that server and, on plan, breaks GETs of
object keys mid-body (connection reset, truncated body, stalled body) or refuses them with
503 SlowDown, so that the resume-by-range logic of `data.storage` runs against real
HTTP traffic. Nothing here reaches beyond 127.0.0.1.
"""
from __future__ import annotations

import atexit
import collections
import http.client
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

FAULT_KINDS = ("reset", "slowdown", "truncate", "stall")
SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n'
                 b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
                 b"<RequestId>fault-proxy</RequestId></Error>")
# Hop-by-hop headers: the proxy sets its own framing (Content-Length, Connection: close).
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
               "upgrade", "expect"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- moto server

def start_moto_server(timeout_s: float = 30.0) -> tuple[str, Callable[[], None]]:
    """Start `python -m moto.server` on a free port; (endpoint_url, stop)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    endpoint = f"http://127.0.0.1:{port}"

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc.stderr is not None and not proc.stderr.closed:
            proc.stderr.close()

    deadline = time.monotonic() + timeout_s
    last_error: Optional[BaseException] = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            try:
                conn.request("GET", "/moto-api/")
                conn.getresponse().read()
            finally:
                conn.close()
            # Answering: nobody reads its stderr from now on, so it must not fill a pipe.
            threading.Thread(target=_drain, args=(proc.stderr,), daemon=True).start()
            atexit.register(stop)  # also when the caller never gets to call it
            return endpoint, stop
        except OSError as e:  # not listening yet
            last_error = e
            time.sleep(0.1)
    state = (f"still not answering after {timeout_s:.0f}s" if proc.poll() is None
             else f"exited with code {proc.returncode}")
    if proc.poll() is None:
        proc.kill()
    _, stderr = proc.communicate(timeout=10)
    raise RuntimeError(f"moto server on {endpoint} {state} (last error: {last_error!r}); "
                       f"stderr:\n{stderr.decode(errors='replace')[-4000:]}")


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies (even by SIGKILL): no orphans."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # best effort
        pass


def _drain(stream) -> None:
    try:
        for _ in iter(lambda: stream.read(65536), b""):
            pass
    except (OSError, ValueError):  # closed by stop()
        pass


# ---------------------------------------------------------------- fault proxy

@dataclass
class ProxiedRequest:
    """One request the proxy received (what a policy or hook gets to see)."""

    method: str
    target: str  # path and query, as sent
    headers: list[tuple[str, str]]
    body: bytes = b""
    path: str = field(init=False)
    query: str = field(init=False)

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.target)
        self.path, self.query = urllib.parse.unquote(parts.path), parts.query

    def header(self, name: str) -> Optional[str]:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    @property
    def bucket_key(self) -> tuple[str, str]:
        bucket, _, key = self.path.lstrip("/").partition("/")
        return bucket, key

    @property
    def is_object_get(self) -> bool:
        """A GET of an object's content (not a bucket listing, not a sub-resource like ?acl)."""
        if self.method != "GET":
            return False
        bucket, key = self.bucket_key
        sub = {k for k, _ in urllib.parse.parse_qsl(self.query, keep_blank_values=True)}
        return bool(bucket and key) and not (sub - {"versionId", "partNumber", "x-id"})


Policy = Callable[[ProxiedRequest], Optional[str]]
Hook = Callable[[str, ProxiedRequest], None]


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = False  # server_close() joins the handlers (close() first wakes stalls)
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, proxy: "FaultProxy"):
        self.proxy = proxy
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.proxy._handle(self.request)


class FaultProxy:
    """A threaded HTTP/1.1 reverse proxy in front of `upstream`, injecting planned faults.

    One request per connection (`Connection: close`). Faults apply only to GETs of object
    keys (`ProxiedRequest.is_object_get`) and cut bodies mid-way: the first
    `cut_fraction` of the body (at least 1 byte, at most all but 1) is sent before the
    reset, truncation or stall, so the reader has to resume with a ranged GET.

    Plan faults with `plan(["reset", "slowdown"], every=1)` (a queue: every `every`-th object
    GET takes the next fault; once the queue is empty, requests pass through), or with a
    callable `policy(request) -> kind | None`. `hook(kind, request)` runs while a fault is
    being injected, before the client's connection is closed (e.g. to replace the object).
    """

    def __init__(self, upstream: str, stall_s: float = 2.0, cut_fraction: float = 0.5,
                 reset_delay_s: float = 0.2, upstream_timeout_s: float = 30.0):
        parts = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.stall_s, self.cut_fraction = stall_s, cut_fraction
        self.reset_delay_s, self.upstream_timeout_s = reset_delay_s, upstream_timeout_s
        self.injected: collections.Counter[str] = collections.Counter()
        self.requests = 0
        self.object_gets = 0
        self.log: list[tuple[str, str, Optional[str], Optional[str]]] = []
        """(method, target, Range header, fault) of every request, in arrival order."""
        self.errors: list[str] = []
        self.hook: Optional[Hook] = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._queue: collections.deque[str] = collections.deque()
        self._every = 1
        self._seen_since_plan = 0
        self._policy: Optional[Policy] = None
        self._server = _Server(self)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fault-proxy-{self.port}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ planning

    def plan(self, faults: Iterable[str] = (), every: int = 1, policy: Optional[Policy] = None) -> None:
        """Replace the plan: queue `faults` (one per `every` object GETs), or use `policy`."""
        faults = list(faults)
        bad = [f for f in faults if f not in FAULT_KINDS]
        if bad or every < 1:
            raise ValueError(f"faults must be among {FAULT_KINDS} and every >= 1; got {bad}, {every}")
        with self._lock:
            self._queue = collections.deque(faults)
            self._every, self._seen_since_plan, self._policy = every, 0, policy

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def _choose(self, req: ProxiedRequest) -> Optional[str]:
        if not req.is_object_get:
            return None
        with self._lock:
            self.object_gets += 1
            if self._policy is not None:
                kind = self._policy(req)
                if kind is not None and kind not in FAULT_KINDS:
                    raise ValueError(f"policy returned unknown fault {kind!r}")
                return kind
            self._seen_since_plan += 1
            if self._queue and self._seen_since_plan % self._every == 0:
                return self._queue.popleft()
        return None

    # ------------------------------------------------------------ serving

    def _handle(self, sock: socket.socket) -> None:
        try:
            req = self._read_request(sock)
            if req is None:
                return
            kind = self._choose(req)
            with self._lock:
                self.requests += 1
                self.log.append((req.method, req.target, req.header("Range"), kind))
            if kind == "slowdown":
                self._count(kind)
                self._run_hook(kind, req)
                self._send(sock, 503, "Slow Down",
                           [("Content-Type", "application/xml"), ("x-amz-request-id", "fault-proxy")],
                           SLOWDOWN_BODY)
                self._close(sock)
                return
            status, reason, headers, body = self._forward(req)
            if kind is not None and (not 200 <= status < 300 or len(body) < 2):
                kind = None  # nothing to cut (error answer or tiny body): pass it through
            if kind is None:
                self._send(sock, status, reason, headers, body, head=req.method == "HEAD")
                self._close(sock)
                return
            self._count(kind)
            cut = min(max(1, int(len(body) * self.cut_fraction)), len(body) - 1)
            self._send(sock, status, reason, headers, body[:cut], content_length=len(body))
            self._run_hook(kind, req)
            if kind == "reset":
                # Let the client take the headers in first: a reset discards what it has not read.
                self._closing.wait(self.reset_delay_s)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            elif kind == "truncate":
                self._close(sock)
            elif kind == "stall":
                self._closing.wait(self.stall_s)
                self._close(sock)
        except Exception as e:  # recorded for the test to see; the client sees a broken connection
            with self._lock:
                self.errors.append(f"{type(e).__name__}: {e}")
            try:
                sock.close()
            except OSError:
                pass

    def _count(self, kind: str) -> None:
        with self._lock:
            self.injected[kind] += 1

    def _run_hook(self, kind: str, req: ProxiedRequest) -> None:
        if self.hook is not None:
            self.hook(kind, req)

    @staticmethod
    def _read_request(sock: socket.socket) -> Optional[ProxiedRequest]:
        sock.settimeout(10)
        f = sock.makefile("rb")
        try:
            line = f.readline(65537)
            if not line.strip():
                return None
            method, target, _version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
            headers = []
            while True:
                h = f.readline(65537)
                if h in (b"\r\n", b"\n", b""):
                    break
                name, _, value = h.decode("latin-1").partition(":")
                headers.append((name.strip(), value.strip()))
            lower = {k.lower(): v for k, v in headers}
            if lower.get("expect", "").lower() == "100-continue":
                sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            if "chunked" in lower.get("transfer-encoding", "").lower():
                body = bytearray()
                while True:
                    size = int(f.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while f.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        break
                    body += f.read(size)
                    f.readline()
                body = bytes(body)
            else:
                body = f.read(int(lower.get("content-length", "0") or 0))
            return ProxiedRequest(method, target, headers, body)
        finally:
            f.close()  # the socket itself stays open

    def _forward(self, req: ProxiedRequest) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port,
                                          timeout=self.upstream_timeout_s)
        try:
            # Host (part of the request signature) is forwarded as the client sent it.
            headers = {k: v for k, v in req.headers if k.lower() not in _HOP_BY_HOP}
            if req.body or req.method in ("PUT", "POST"):
                headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
                headers["Content-Length"] = str(len(req.body))
            conn.request(req.method, req.target, body=req.body or None, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            return resp.status, resp.reason, out, body
        finally:
            conn.close()

    @staticmethod
    def _send(sock: socket.socket, status: int, reason: str, headers: list[tuple[str, str]],
              body: bytes, content_length: Optional[int] = None, head: bool = False) -> None:
        """Status line, headers (Content-Length = `content_length` or len(body)), `body`."""
        lines = [f"HTTP/1.1 {status} {reason}"]
        upstream_length = None
        for k, v in headers:
            if k.lower() == "content-length":
                upstream_length = v
                continue
            lines.append(f"{k}: {v}")
        if head:  # a HEAD answer announces the object's length and has no body
            if upstream_length is not None:
                lines.append(f"Content-Length: {upstream_length}")
            body = b""
        else:
            lines.append(f"Content-Length: {len(body) if content_length is None else content_length}")
        lines.append("Connection: close")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    @staticmethod
    def _close(sock: socket.socket) -> None:
        """Orderly close (FIN) after everything sent has left."""
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        sock.close()

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._closing.set()  # wakes stalled handlers
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
