"""Client connections against the open-file limit: the limit raised, a cap, a header timeout, accept back-off.

Every client connection is a file descriptor, and so is each upstream connection, image fetch and the
ledger's files. With the common soft limit of 1,024, a client holding ~1,100 idle connections used to
take every descriptor: Tornado's accept handler then failed with EMFILE on every loop iteration (the
listening socket stays readable), logging a traceback each time, and no valid request got in.

- At start the soft limit is raised to the hard limit (as Go's runtime does): descriptors cost nothing
  until used, and the cap below is the real bound.
- Client connections are capped (``server.max_connections``), and the cap is lowered to fit the file
  limit with room left for what each served request opens (its upstream connection).
- At the cap, the connection idle the longest (no request in progress: waiting for its first head,
  sending a head slowly, or an idle keep-alive) is closed to make room, as nginx reuses idle keep-alive
  connections when it runs out. A flood of idle connections therefore cannot keep out a client that
  sends its request, and a client whose idle keep-alive connection is closed simply opens another.
  When every connection is in a request, the new one is closed at once (see DESIGN.md).
- A connection that sends no complete request head within ``server.header_timeout_s`` of being
  accepted is closed. Tornado's own head timeout is ``idle_connection_timeout`` (120 s here), which also
  bounds the idle time between keep-alive requests and the head of each later request.
- Accept failures for lack of descriptors or memory pause accepting with a growing back-off (the
  kernel queues new connections meanwhile) and log one line per interval instead of a traceback per
  loop iteration.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
import time
from typing import Any

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop

log = logging.getLogger("proxyd")

# Descriptors kept out of the client connection budget: listening sockets, the event loop's epoll,
# the ledger (database, -wal and -shm per SQLite connection: writer, reader, scanner), stdio and log
# files, thread pools' wake-up pipes, and image fetches (up to images.max_images at once per request).
RESERVED_FDS = 64
# Each client connection in a request may hold one upstream connection as well.
FDS_PER_CONNECTION = 2
# The admin server (admin.port), when it listens apart, gets a small cap of its own.
ADMIN_MAX_CONNECTIONS = 64
# Accept back-off after EMFILE/ENFILE/ENOBUFS/ENOMEM: doubled from the first to the last.
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.05, 1.0
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def raise_open_file_limit() -> tuple[int, int]:
    """Raises the soft RLIMIT_NOFILE to the hard limit; logs and returns (soft before, soft now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit (not on Linux, where it is at most fs.nr_open) would not be accepted as a
    # soft one everywhere: take a generous finite value instead.
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft == resource.RLIM_INFINITY or soft >= target:
        log.info("open files: soft limit %s (the hard limit): client connections are capped to fit it", soft)
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("open files: could not raise the soft limit from %d to %d (%s)", soft, target, exc)
        return soft, soft
    log.info("open files: soft limit raised from %d to %d (the hard limit)", soft, target)
    return soft, target


def connection_cap(configured: int, soft_limit: int, reserved: int = 0) -> int:
    """The client connection cap: the configured one, lowered to what the open-file limit allows."""
    if soft_limit == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, (soft_limit - RESERVED_FDS - reserved) // FDS_PER_CONNECTION))


class _EveryFewSeconds:
    """A log line at most once per interval, saying how many were left out since the last one."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self.last = float("-inf")
        self.skipped = 0

    def __call__(self, level: int, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last < self.interval_s:
            self.skipped += 1
            return
        if self.skipped:
            msg += " (%d more since the last such line)"
            args = (*args, self.skipped)
        log.log(level, msg, *args)
        self.last, self.skipped = now, 0


class _Acceptor:
    """Accepts connections on one listening socket (tornado.netutil.add_accept_handler, plus back-off).

    Tornado's handler lets an EMFILE escape: the socket stays readable, so the loop calls it again at
    once, forever. Here it stops watching the socket for a while instead; the kernel keeps queueing
    connections in the listen backlog meanwhile."""

    def __init__(self, server: "ProxydHTTPServer", sock: socket.socket) -> None:
        self.server, self.sock = server, sock
        self.io_loop = IOLoop.current()
        self.watching = False
        self.stopped = False
        self.backoff_s = BACKOFF_FIRST_S
        self.resume = None
        self.watch()

    def watch(self) -> None:
        self.resume = None
        if not self.stopped and not self.watching:
            self.io_loop.add_handler(self.sock, self.on_readable, IOLoop.READ)
            self.watching = True

    def stop(self) -> None:
        """TCPServer.stop() calls this before it closes the socket."""
        self.stopped = True
        if self.resume is not None:
            self.io_loop.remove_timeout(self.resume)
            self.resume = None
        if self.watching:
            self.io_loop.remove_handler(self.sock)
            self.watching = False

    def on_readable(self, fd: Any, events: int) -> None:
        server = self.server
        for _ in range(128):  # as Tornado: no more per turn than a listen backlog, other work must run too
            if self.stopped:
                return
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                self.pause(exc)
                return
            self.backoff_s = BACKOFF_FIRST_S
            if server.open_connections >= server.max_connections:
                if server.close_longest_idle():
                    server.evicted += 1
                    server.say_evicted(logging.WARNING, "at the cap of %d client connections: closed the longest-idle "
                                    "one to make room (server.max_connections)", server.max_connections)
                else:
                    # Every connection is in a request: no room, and none to make. Closed before a byte is read.
                    connection.close()
                    server.refused += 1
                    server.say_refused(logging.WARNING, "at the cap of %d client connections, all in requests: closed a "
                                    "new one at once (server.max_connections)", server.max_connections)
                    continue
            server._handle_connection(connection, address)

    def pause(self, exc: OSError) -> None:
        # Out of descriptors despite the cap (something else holds them: upstream connections, image
        # fetches). An idle client connection gives one back; accepting waits a moment.
        self.server.close_longest_idle()
        self.server.say_accept(logging.WARNING, "cannot accept client connections: %s; pausing accepts for %.2fs "
                        "(%d client connections open)", exc.strerror or exc, self.backoff_s, self.server.open_connections)
        if self.watching:
            self.io_loop.remove_handler(self.sock)
            self.watching = False
        self.resume = self.io_loop.call_later(self.backoff_s, self.watch)
        self.backoff_s = min(self.backoff_s * 2, BACKOFF_MAX_S)


class _HeadWatch(httputil.HTTPMessageDelegate):
    """Wraps a request's delegate to learn when its head has arrived; the rest is passed straight on
    (bound methods copied, so the body and finish cost no extra call)."""

    def __init__(self, server: "ProxydHTTPServer", conn: Any, delegate: httputil.HTTPMessageDelegate) -> None:
        self.server, self.conn, self.delegate = server, conn, delegate
        self.data_received = delegate.data_received  # type: ignore[method-assign]
        self.finish = delegate.finish  # type: ignore[method-assign]
        self.on_connection_close = delegate.on_connection_close  # type: ignore[method-assign]

    def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> Any:
        self.server.request_started(self.conn)
        return self.delegate.headers_received(start_line, headers)


class ProxydHTTPServer(HTTPServer):
    """Tornado's HTTPServer with a connection cap, a first-head timeout and an accept handler that backs off."""

    def initialize(self, request_callback: Any, *, max_connections: int, header_timeout_s: float,
                   **kwargs: Any) -> None:
        super().initialize(request_callback, **kwargs)
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        # Connections with no request in progress, longest idle first (dicts keep insertion order).
        self._idle: dict[Any, None] = {}
        # Connections waiting for their first head: the timer that closes them if it does not come.
        self._first_head: dict[Any, Any] = {}
        # Closed by us, not yet gone from _connections (Tornado removes them a loop turn later).
        self._closing: set[Any] = set()
        self.refused = self.evicted = 0
        self.say_evicted = _EveryFewSeconds()  # one limiter per kind of line: one must not hide another
        self.say_refused = _EveryFewSeconds()
        self.say_accept = _EveryFewSeconds()
        self._io_loop = IOLoop.current()

    @property
    def open_connections(self) -> int:
        return len(self._connections) - len(self._closing)

    def add_sockets(self, sockets: Any) -> None:
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = _Acceptor(self, sock).stop

    # -- connection states -------------------------------------------------------------------------------

    def start_request(self, server_conn: Any, request_conn: Any) -> httputil.HTTPMessageDelegate:
        # Called when the connection starts waiting for a request head: right after accept, and after
        # each response on a keep-alive connection.
        self._idle[server_conn] = None
        if server_conn not in self._first_head:
            self._first_head[server_conn] = self._io_loop.call_later(self.header_timeout_s, self._no_head, server_conn)
        return _HeadWatch(self, server_conn, super().start_request(server_conn, request_conn))

    def request_started(self, server_conn: Any) -> None:
        self._idle.pop(server_conn, None)
        timer = self._first_head.get(server_conn)
        if timer is not None:
            self._io_loop.remove_timeout(timer)
            self._first_head[server_conn] = None  # kept: its later heads are not first heads

    def on_close(self, server_conn: Any) -> None:
        super().on_close(server_conn)
        self._idle.pop(server_conn, None)
        self._closing.discard(server_conn)
        timer = self._first_head.pop(server_conn, None)
        if timer is not None:
            self._io_loop.remove_timeout(timer)

    def _no_head(self, server_conn: Any) -> None:
        self._first_head[server_conn] = None
        if server_conn in self._idle:
            self._close(server_conn)

    def close_longest_idle(self) -> bool:
        """Closes the connection idle the longest, if any; True if one was closed."""
        conn = next(iter(self._idle), None)
        if conn is None:
            return False
        self._close(conn)
        return True

    def _close(self, server_conn: Any) -> None:
        # Closing the stream frees its descriptor now; Tornado's request loop then ends and calls on_close.
        self._idle.pop(server_conn, None)
        self._closing.add(server_conn)
        server_conn.stream.close()
