"""A fault-injecting HTTP proxy for tests: sits in front of the real S3 server and breaks chosen requests (reset,
503, a body cut midway, a stall), as a flaky network or an overloaded store would. See ``FaultProxy``."""

from __future__ import annotations

import socket
import struct
import threading
import time

REQUEST_FAULTS = ("reset", "503", "cut_request", "cut_response", "stall")


class FaultProxy:
    """An HTTP-aware TCP proxy on 127.0.0.1 in front of the S3 server that breaks chosen requests, as a flaky
    network or an overloaded store does. Each request through it takes the next fault queued by ``add`` (none left:
    passed through untouched, keep-alive included):

    - ``"reset"``: the connection is reset (RST) once the request headers arrived, before any answer;
    - ``"503"``: answered ``503 Slow Down`` without reaching the server;
    - ``("cut_request", n)``: the server gets the headers and only ``n`` bytes of the body, then both sides are
      closed (an upload dying midway);
    - ``("cut_response", n)``: the answer is cut ``n`` bytes into its body (a download dying midway);
    - ``("stall", s)``: no answer for ``s`` seconds, then the connection is closed (a read timeout).

    ``hold``, when set, is a test of (method, path): a request it accepts is never answered while the proxy runs (a
    store that stopped answering), whatever else is queued.

    Requests are counted per method in ``seen`` (faulty ones included). SigV4 signatures cover the Host header the
    client sent (the proxy's), and the bytes reach the server unchanged, so signed requests stay valid.
    """

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.faults: list = []
        self.hold = None  # (method, path) -> bool: requests never answered
        self.seen: dict[str, int] = {}
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header) of every request
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, *faults) -> None:
        with self._lock:
            self.faults.extend(faults)

    def pending(self) -> int:
        with self._lock:
            return len(self.faults)

    def drop_connections(self) -> None:
        """Close every open connection, as a restarting server does."""
        with self._lock:
            socks, self._socks = list(self._socks), set()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes the proxy's threads blocked on it
            except OSError:
                pass
            _close(s, reset=True)

    def close(self) -> None:
        self._closed = True
        _close(self._server)
        self.drop_connections()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------------- internals

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._socks.update(socks)

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        cut = _Cut()
        try:
            upstream = socket.create_connection(self.target)
            self._track(client, upstream)
            threading.Thread(target=self._pump_responses, args=(upstream, client, cut), daemon=True).start()
            reader = _Reader(client)
            while True:
                head = reader.until(b"\r\n\r\n")
                if head is None:
                    return
                method, path = head.split(b" ", 2)[:2]
                method = method.decode("ascii", "replace")
                length = _content_length(head)
                with self._lock:
                    self.seen[method] = self.seen.get(method, 0) + 1
                    self.log.append((method, path.decode("ascii", "replace"), _header(head, b"range")))
                    held = self.hold is not None and self.hold(method, path.decode("ascii", "replace"))
                    fault = None if held else (self.faults.pop(0) if self.faults else None)
                if held:
                    while not self._closed:
                        time.sleep(0.05)
                    return
                kind, arg = (fault if isinstance(fault, tuple) else (fault, None)) if fault else (None, None)
                if kind == "reset":
                    return _close(client, reset=True)
                if kind == "503":
                    client.sendall(SLOW_DOWN)
                    return
                if kind == "stall":
                    time.sleep(arg)
                    return
                if kind == "cut_response":
                    cut.arm(arg)
                upstream.sendall(head)
                body_limit = arg if kind == "cut_request" else length
                reader.forward(upstream, min(length, body_limit))
                if kind == "cut_request":
                    time.sleep(0.2)  # let the server read what it got before it sees the close
                    return
        except OSError:
            return
        finally:
            _close(client)
            if upstream is not None:
                _close(upstream)
            with self._lock:
                self._socks.difference_update((client, upstream))

    def _pump_responses(self, upstream: socket.socket, client: socket.socket, cut: _Cut) -> None:
        try:
            while data := upstream.recv(65536):
                keep = cut.take(data)
                client.sendall(data[:keep])
                if keep < len(data):  # cut: the client sees the answer end early
                    _close(client)
                    _close(upstream)
                    return
        except OSError:
            pass
        finally:
            _close(client)


_SLOW_DOWN_BODY = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
SLOW_DOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
    + b"Content-Length: %d\r\n\r\n" % len(_SLOW_DOWN_BODY)
    + _SLOW_DOWN_BODY
)


class _Cut:
    """Where to cut the next response: ``n`` bytes into its body (interim ``100 Continue`` answers skipped)."""

    def __init__(self):
        self.body_left: int | None = None
        self.head = b""
        self.armed = False

    def arm(self, n: int) -> None:
        self.armed, self.head, self.body_left = True, b"", None
        self.n = n

    def take(self, data: bytes) -> int:
        """How many bytes of ``data`` to pass on."""
        if not self.armed:
            return len(data)
        if self.body_left is None:
            self.head += data
            while True:
                end = self.head.find(b"\r\n\r\n")
                if end < 0:
                    return len(data)
                block, rest = self.head[: end + 4], self.head[end + 4 :]
                if block.split(b" ", 2)[1:2] == [b"100"]:
                    self.head = rest
                    continue
                self.body_left = self.n
                already = len(rest)  # body bytes in this read
                if already <= self.body_left:
                    self.body_left -= already
                    return len(data)
                return len(data) - (already - self.body_left)
        if len(data) <= self.body_left:
            self.body_left -= len(data)
            return len(data)
        return self.body_left


class _Reader:
    """Buffered reads from a socket: up to a delimiter, or a byte count forwarded elsewhere."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def until(self, delim: bytes) -> bytes | None:
        while delim not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data
        end = self.buf.index(delim) + len(delim)
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def forward(self, dest: socket.socket, n: int) -> None:
        while n > 0:
            if not self.buf:
                self.buf = self.sock.recv(65536)
                if not self.buf:
                    raise OSError("client closed mid-body")
            part, self.buf = self.buf[:n], self.buf[n:]
            dest.sendall(part)
            n -= len(part)


def _header(head: bytes, name: bytes) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip().decode("latin-1")
    return None


def _content_length(head: bytes) -> int:
    return int(_header(head, b"content-length") or 0)  # boto3 always sends Content-Length with a body (no chunked)


def _close(sock: socket.socket, reset: bool = False) -> None:
    """Close ``sock``: with ``reset``, by RST instead of FIN (the peer sees "connection reset", as when a server
    process dies); else after a shutdown, which wakes a thread blocked in recv on it (close alone would not)."""
    try:
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
