"""Client connections against the open-file limit (issue #12, item 2).

The proxy runs as a process under a soft RLIMIT_NOFILE of 1,024, the common default, while a client
holds more idle TCP connections than that: a valid request must still be answered promptly, the log
must stay small and the loop must not spin.
"""

import os
import resource
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.test_process import ADMIN, ROOT, emulator, free_port, new_key, wait_http  # noqa: F401 (fixture)

MSG = [{"role": "user", "content": "Hi"}]


def start_limited_proxy(tmp_path, upstream: str, nofile: tuple[int, int], config: str = "") -> tuple[subprocess.Popen, str]:
    """app.py with RLIMIT_NOFILE set to (soft, hard) in the child before it starts; its log goes to a file."""
    port = free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text("logging:\n  access_log: false\n" + config)
    env = {**os.environ, "PROXYD_PORT": str(port), "PROXYD_UPSTREAM": upstream,
           "PROXYD_DB": str(tmp_path / "ledger.db"), "PROXYD_ADMIN_TOKEN": ADMIN, "PROXYD_CONFIG": str(cfg)}
    log = open(tmp_path / "proxy.log", "wb")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile))
    log.close()
    wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    return proc, f"http://127.0.0.1:{port}"


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def open_idle(port: int, n: int) -> list[socket.socket]:
    """n TCP connections that never send a byte (non-blocking: past the listen backlog they just wait)."""
    socks = []
    for i in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
        if i % 50 == 49:
            # Past a full accept queue (128) the kernel drops the handshake's last ACK and retries it
            # seconds later: paced, every connection reaches the proxy at once, as a slow flood would.
            time.sleep(0.05)
    return socks


@pytest.fixture
def many_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2000:
        pytest.skip(f"the test process itself needs ~1,200 files (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2000) if hard == resource.RLIM_INFINITY else max(soft, min(hard, 4096)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_idle_connections_past_the_file_limit_do_not_lock_out_a_valid_request(tmp_path, emulator, many_files):
    # Hard limit 1,024 too: raising the soft limit cannot help, the cap and the accept back-off must.
    proc, base = start_limited_proxy(tmp_path, emulator, (1024, 1024))
    idle: list[socket.socket] = []
    try:
        key = new_key(base, "alice")
        idle = open_idle(int(base.rsplit(":", 1)[1]), 1100)
        time.sleep(1.5)  # the proxy takes what it can of them
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(2.0)
        busy = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
        start = time.monotonic()
        r = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=10).chat.completions.create(
            model="llama3.2:1b", messages=MSG, max_tokens=5)
        took = time.monotonic() - start
        assert r.usage.completion_tokens > 0
        assert took < 3, f"a valid request took {took:.1f}s behind 1,100 idle connections"
        assert busy < 0.3, f"the proxy used {busy:.0%} of a core while the connections sat idle"
        assert proc.poll() is None
    finally:
        for s in idle:
            s.close()
        proc.terminate()
        proc.wait(20)
    log = (tmp_path / "proxy.log").read_text(errors="replace")
    assert len(log) < 100_000, f"{len(log)} bytes of log; it starts: {log[:3000]}"
    assert "Traceback" not in log, log[:3000]
    assert "client connections capped at" in log, log


def test_soft_file_limit_is_raised_when_the_hard_limit_allows(tmp_path, emulator):
    proc, base = start_limited_proxy(tmp_path, emulator, (1024, 4096))
    try:
        with open(f"/proc/{proc.pid}/limits") as fh:
            line = next(row for row in fh if row.startswith("Max open files"))
        assert line.split()[3:5] == ["4096", "4096"], line
    finally:
        proc.terminate()
        proc.wait(20)
    log = (tmp_path / "proxy.log").read_text()
    assert "open files: soft limit raised from 1024 to 4096" in log, log


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection (or limit_s passes): (bytes, seconds)."""
    sock.settimeout(limit_s)
    start, got = time.monotonic(), b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except socket.timeout:
        return got, float("inf")
    return got, time.monotonic() - start


def test_a_connection_without_a_request_head_is_closed_after_the_header_timeout(tmp_path, emulator):
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    proc, base = start_limited_proxy(tmp_path, emulator, nofile, "server:\n  header_timeout_s: 0.5\n")
    port = int(base.rsplit(":", 1)[1])
    try:
        silent = socket.create_connection(("127.0.0.1", port))
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"GET /healthz HTTP/1.1\r\n")
        for _ in range(3):  # a head sent a line at a time (slowloris) is no better
            time.sleep(0.2)
            try:
                slow.sendall(b"X-Padding: 1\r\n")
            except OSError:
                break
        assert read_until_closed(silent, 5)[1] < 2
        assert read_until_closed(slow, 5)[1] < 2
        # A keep-alive connection that sent its request is not a head timeout's business: it stays open
        # idle for server.idle_connection_timeout_s (120 s) and serves its next request.
        kept = socket.create_connection(("127.0.0.1", port))
        for _ in range(2):
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                head += kept.recv(65536)
            assert head.startswith(b"HTTP/1.1 200"), head
            time.sleep(1.2)
        kept.close()
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(20)


def test_at_the_cap_idle_connections_make_room_and_busy_ones_do_not(tmp_path, emulator):
    import threading

    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    proc, base = start_limited_proxy(tmp_path, emulator, nofile, "server:\n  max_connections: 3\n")
    port = int(base.rsplit(":", 1)[1])
    idle: list[socket.socket] = []
    try:
        key = new_key(base, "alice")
        client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=10)
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        time.sleep(0.3)
        # Three idle connections fill the cap: a request still gets in, by closing the longest idle one.
        assert client.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=3).usage.total_tokens
        assert read_until_closed(idle[0], 2)[1] < 2  # the longest idle was the one closed
        # Three streams in progress fill the cap with connections in requests: a fourth is closed at
        # once (the SDK sees a connection error and would retry), and served once a stream ends.
        started = threading.Barrier(4)
        done: list[int] = []

        def stream() -> None:
            with httpx.stream("POST", base + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                              json={"model": "llama3.2:1b", "stream": True,
                                    "messages": [{"role": "user", "content": "[[emu:reply_tokens=60]] go"}]},
                              timeout=20) as r:
                lines = r.iter_lines()
                next(lines)
                started.wait(10)
                done.append(sum(1 for _ in lines))

        threads = [threading.Thread(target=stream) for _ in range(3)]
        for t in threads:
            t.start()
        started.wait(10)
        with pytest.raises(openai.APIConnectionError):
            client.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=3)
        for t in threads:
            t.join(20)
        assert len(done) == 3
        assert client.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=3).usage.total_tokens
    finally:
        for s in idle:
            s.close()
        proc.terminate()
        proc.wait(20)
    log = (tmp_path / "proxy.log").read_text()
    assert "closed the longest-idle one to make room" in log and "all in requests: closed a new one at once" in log, log


def test_accept_failing_for_lack_of_files_backs_off_with_one_log_line(caplog):
    """Tornado's accept handler lets EMFILE escape: the listening socket stays readable, so the loop
    calls it again at once, with a traceback each time. Here accepting pauses, with one line per 10 s."""
    import asyncio
    import errno
    import logging

    import tornado.ioloop
    import tornado.web

    from proxyd.connections import ProxydHTTPServer

    class OutOfFiles:
        """A listening socket with a connection waiting (so it is readable) whose accept() fails."""

        def __init__(self) -> None:
            self.real = socket.socket()
            self.real.bind(("127.0.0.1", 0))
            self.real.listen()
            self.client = socket.create_connection(self.real.getsockname())
            self.calls = 0

        def fileno(self) -> int:
            return self.real.fileno()

        def accept(self):
            self.calls += 1
            raise OSError(errno.EMFILE, "Too many open files")

        def close(self) -> None:
            self.client.close()
            self.real.close()

    async def run() -> tuple[OutOfFiles, list[float], list[int]]:
        sock = OutOfFiles()
        io_loop = tornado.ioloop.IOLoop.current()
        pauses: list[float] = []  # the back-off delays asked for, in order
        resumes: list = []  # what each pause would run when it ends
        call_later = io_loop.call_later

        def pause(delay: float, callback, *args):  # recorded; the test ends each pause itself
            pauses.append(delay)
            handle = call_later(3600, callback, *args)  # a real handle, for stop() to remove
            resumes.append((handle, callback, args))
            return handle

        io_loop.call_later = pause
        tries_per_pause = []
        try:
            server = ProxydHTTPServer(tornado.web.Application(), max_connections=10, header_timeout_s=1)
            server.add_sockets([sock])
            for _ in range(7):
                for _turn in range(20):  # loop turns while paused: an acceptor that spins tries again here
                    await asyncio.sleep(0)
                tries_per_pause.append(sock.calls)
                handle, callback, args = resumes[-1]
                io_loop.remove_timeout(handle)
                callback(*args)  # the pause is over
            server.stop()
        finally:
            del io_loop.call_later
        return sock, pauses, tries_per_pause

    with caplog.at_level(logging.WARNING):
        sock, pauses, tries = asyncio.run(run())
    lines = [r for r in caplog.records if "cannot accept client connections" in r.getMessage()]
    # Back-off 0.05, 0.1, 0.2, 0.4, 0.8, then 1 s; one try per pause, not one per loop turn.
    assert pauses[:7] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]), pauses
    assert tries == [1, 2, 3, 4, 5, 6, 7], tries
    assert len(lines) == 1 and lines[0].exc_info is None and "Too many open files" in lines[0].getMessage()
