"""Requests that proxyd ends itself, and what clients and operators learn about it (issue #12).

A client that stops reading (item 3), a revoked key or disabled user (14), the shutdown deadline (15):
each ends the upstream request, bills what was relayed and says so. Errors name no internal address
(13); refusals carry their model in the metrics (16); a max_tokens proxyd chose is announced (17).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest

from tests.harness import Harness
from tests.test_process import ADMIN, free_port, new_key, wait_http

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MSG = [{"role": "user", "content": "Hi"}]
LONG = [{"role": "user", "content": "[[emu:reply_tokens=400]] a long story"}]


def wait_until(predicate, timeout: float) -> None:
    """Polls ``predicate`` until true (raises if it is not within ``timeout`` seconds)."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s")
        time.sleep(0.01)


# -- item 3: a client that stops reading -------------------------------------------------------------


def open_stream_and_stop_reading(port: int, key: str, content: str) -> tuple[socket.socket, bytes]:
    """A raw client with a tiny receive buffer that reads the response headers, then nothing more."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: it sets the TCP window
    s.connect(("127.0.0.1", port))
    body = json.dumps({"model": "llama3.2:1b", "stream": True, "max_tokens": 100_000,
                       "messages": [{"role": "user", "content": content}]}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
              + b"\r\n\r\n" + body)
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1024)
    return s, head


def test_a_client_that_stops_reading_frees_the_upstream_and_is_billed_for_what_was_relayed(make_world, caplog):
    stall = 0.5
    world = make_world(config={"server.write_stall_timeout_s": stall})
    key = world.new_user("alice")
    caplog.set_level("INFO")
    # 100,000 tokens sent as fast as the loop goes: far more than every socket buffer on the way holds.
    s, head = open_stream_and_stop_reading(world.port, key, "[[emu:reply_tokens=100000]] go")
    try:
        assert head.startswith(b"HTTP/1.1 200"), head
        # Backpressure first fills the buffers (client, proxyd, aiohttp, the emulator's socket); then
        # proxyd's flush stalls, and stall seconds later the upstream request must be gone.
        wait_until(lambda: world.emu.active_streams == 0 and world.ctx.meter.admission.pending == 0, 15)
        assert world.emu.cancelled_streams == 1 and world.emu.completed == 0  # Ollama was told to stop
        # ... by the stall timeout, not by anything else that could end a stream
        assert any(f"the client took nothing for {stall:g}s; request ended" in r.getMessage() for r in caplog.records)
        world.settle_all()
        [(status, http, prompt, estimate, completion, source)] = world.rows(
            "SELECT status, http_status, prompt_tokens, reserved_prompt, completion_tokens, usage_source FROM requests")
        # Billed: the prompt and what proxyd relayed (counted: the usage chunk never came), not the 100,000.
        assert (status, http, prompt, source) == ("settled", 499, estimate, "counted")
        assert 0 < completion < 100_000, completion
        s.settimeout(5)
        rest = b""
        while chunk := s.recv(65536):  # proxyd closed the connection: reading it now ends
            rest += chunk
        assert b"data: [DONE]" not in rest
    finally:
        s.close()


def test_a_slow_reader_that_keeps_reading_is_not_cut_off(make_world):
    """The stall timeout bounds a flush that makes no progress, not the stream: a client that reads
    slowly but steadily gets its whole answer."""
    world = make_world(config={"server.write_stall_timeout_s": 0.3})
    key = world.new_user("alice")
    s, head = open_stream_and_stop_reading(world.port, key, "[[emu:reply_tokens=20000]] go")
    got = head
    try:
        s.settimeout(10)
        while not got.endswith(b"\r\n0\r\n\r\n"):  # the chunked end after data: [DONE]
            chunk = s.recv(8192)
            assert chunk, got[-300:]  # closed by proxyd before the end
            got += chunk
            time.sleep(0.002)  # ~2 MB/s through a 4 KB window: slower than the emulator writes
    finally:
        s.close()
    assert b"data: [DONE]" in got
    world.settle_all()
    assert world.rows("SELECT status, http_status, completion_tokens FROM requests") == [("settled", 200, 20001)]


# -- item 13: no internal address in client errors ----------------------------------------------------


def _no_address(text: str, port: int) -> None:
    assert "127.0.0.1" not in text and str(port) not in text and "http://" not in text, text


def test_a_cut_upstream_is_reported_without_its_address(world, caplog):
    key = world.new_user("alice")
    port = int(world.upstream_url.rsplit(":", 1)[1])
    world.emu.add_fault("cut_after:3")
    with caplog.at_level("WARNING", logger="proxyd.http"):
        with pytest.raises(openai.APIError) as e:
            for _ in world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG, stream=True):
                pass
    assert "Connection to upstream lost" in e.value.message
    _no_address(e.value.message, port)
    _no_address(json.dumps(e.value.body), port)
    # The operator still learns where: the log line has the request id and the address.
    assert any(world.upstream_url in r.getMessage() and "req_" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_an_unreachable_upstream_is_reported_without_its_address(tmp_path, stream):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = Harness(str(tmp_path / "p.db"), upstream_url=f"http://127.0.0.1:{port}").start()
    try:
        key = world.new_user("alice")
        with pytest.raises(openai.APIStatusError) as e:
            r = world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG, stream=stream)
            list(r) if stream else None
        assert e.value.status_code == 502 and "Connection refused" in e.value.message
        _no_address(e.value.response.text, port)
    finally:
        world.close()


class _RunnerErrors(BaseHTTPRequestHandler):
    """An upstream whose errors name its runner's URL, as Ollama's do ('Post "http://...": EOF')."""

    ERROR = {"error": {"message": 'Post "http://127.0.0.1:39123/completion": EOF', "type": "api_error"}}

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("stream"):
            chunk = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
                     "choices": [{"index": 0, "delta": {"content": "alpha"}, "finish_reason": None}]}
            data = b"data: " + json.dumps(chunk).encode() + b"\n\ndata: " + json.dumps(self.ERROR).encode() + b"\n\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
        else:
            data = json.dumps(self.ERROR).encode()
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_upstream_error_messages_lose_their_addresses(tmp_path, stream):
    stub = ThreadingHTTPServer(("127.0.0.1", 0), _RunnerErrors)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    world = Harness(str(tmp_path / "p.db"), upstream_url=f"http://127.0.0.1:{stub.server_address[1]}").start()
    try:
        key = world.new_user("alice")
        with pytest.raises(openai.APIError) as e:
            r = world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG, stream=stream)
            list(r) if stream else None
        assert 'Post "<upstream>": EOF' in e.value.message, e.value.message
        _no_address(e.value.message, 39123)
    finally:
        world.close()
        stub.shutdown()


# -- item 14: revoking a key or disabling a user ends its streams ---------------------------------------


@pytest.mark.parametrize("how", ["revoke_key", "disable_user"])
def test_revoking_a_key_or_disabling_a_user_ends_its_stream_within_a_second(make_world, how):
    world = make_world(emulator={"token_delay_s": 0.05})
    r = world.admin("POST", "/admin/users", {"user_id": "alice"})
    key, key_id = r.json()["api_key"], r.json()["key_id"]
    bystander = world.new_user("bob")  # another user's stream goes on
    other = world.client(bystander).chat.completions.create(model="llama3.2:1b", messages=LONG, stream=True)
    next(iter(other))
    got, cut = [], None
    with pytest.raises(openai.APIError) as e:
        for ch in world.client(key).chat.completions.create(model="llama3.2:1b", messages=LONG, stream=True):
            if ch.choices and ch.choices[0].delta.content:
                got.append(ch.choices[0].delta.content)
            if len(got) == 5 and cut is None:
                cut = time.monotonic()  # the second counts from the admin request
                if how == "revoke_key":
                    assert world.admin("DELETE", f"/admin/keys/{key_id}").status_code == 204
                else:
                    assert world.admin("PATCH", "/admin/users/alice", {"disabled": True}).status_code == 200
    took = time.monotonic() - cut
    assert took < 1.0, took
    expected = ("This API key was revoked.", "invalid_api_key", 401) if how == "revoke_key" else (
        "User alice is disabled.", "user_disabled", 403)
    assert (e.value.message, e.value.body["code"]) == expected[:2], e.value.body
    wait_until(lambda: world.emu.cancelled_streams == 1, 2)  # Ollama stopped generating for alice
    # bob's stream is still running: wait for alice's row only
    wait_until(lambda: len(world.rows("SELECT id FROM requests WHERE user_id='alice' AND status!='pending'")) == 1, 2)
    [(status, http, completion, source)] = world.rows(
        "SELECT status, http_status, completion_tokens, usage_source FROM requests WHERE user_id='alice'")
    # Billed for what alice received: every relayed event reached her before the error event.
    assert (status, http, completion, source) == ("settled", expected[2], len(got), "counted")
    assert world.emu.active_streams == 1  # bob's
    other.close()


def test_revoking_a_key_ends_a_request_waiting_for_its_answer(make_world):
    """A non-stream request waits for Ollama's whole answer before any byte: the revoke cancels it
    there (Ollama stops), the client gets the 401, and nothing is billed (nothing was delivered)."""
    world = make_world(emulator={"token_delay_s": 0.05})
    r = world.admin("POST", "/admin/users", {"user_id": "alice"})
    key, key_id = r.json()["api_key"], r.json()["key_id"]
    errors = []

    def call() -> None:
        try:
            world.client(key).chat.completions.create(model="llama3.2:1b", messages=LONG)
        except openai.APIError as exc:
            errors.append((exc, time.monotonic()))

    t = threading.Thread(target=call)
    t.start()
    # Reserved, forwarded, and Ollama is generating: the request waits for its answer.
    wait_until(lambda: any(r["path"] == "/v1/chat/completions" for r in world.emu.requests), 5)
    cut = time.monotonic()
    assert world.admin("DELETE", f"/admin/keys/{key_id}").status_code == 204
    t.join(5)
    [(exc, at)] = errors
    assert isinstance(exc, openai.AuthenticationError) and exc.message.endswith("This API key was revoked.")
    assert at - cut < 1.0
    wait_until(lambda: world.emu.cancelled_answers == 1, 2)
    world.settle_all()
    assert world.rows("SELECT status, http_status FROM requests") == [("voided", 401)]


# -- item 15: the shutdown deadline --------------------------------------------------------------------


def test_the_shutdown_deadline_ends_streams_with_an_error_event_and_bills_them(tmp_path):
    emu_port, port = free_port(), free_port()
    emu = subprocess.Popen([sys.executable, "-m", "ollama_emulator", "--port", str(emu_port), "--token-delay", "0.02"],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{emu_port}/", emu)
        cfg = tmp_path / "config.yaml"
        cfg.write_text("server:\n  shutdown_grace_s: 0.5\n")  # the access log is on by default
        env = {**os.environ, "PROXYD_PORT": str(port), "PROXYD_UPSTREAM": f"http://127.0.0.1:{emu_port}",
               "PROXYD_DB": str(tmp_path / "ledger.db"), "PROXYD_ADMIN_TOKEN": ADMIN, "PROXYD_CONFIG": str(cfg)}
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(base + "/healthz", proc)
            client = openai.OpenAI(base_url=base + "/v1", api_key=new_key(base, "alice"), max_retries=0)
            got, sent = [], None
            with pytest.raises(openai.APIError) as e:
                # 2,000 tokens at 20 ms: 40 s, far past the grace period
                for ch in client.chat.completions.create(model="llama3.2:1b", stream=True, messages=[
                        {"role": "user", "content": "[[emu:reply_tokens=2000]] story"}]):
                    if ch.choices and ch.choices[0].delta.content:
                        got.append(ch.choices[0].delta.content)
                    if len(got) == 3 and sent is None:
                        proc.send_signal(signal.SIGTERM)
                        sent = time.monotonic()
            assert time.monotonic() - sent < 0.5 + 2.0
            assert (e.value.body or {}).get("code") == "service_unavailable", e.value  # an error event, not a broken transfer
            assert "shutting down" in e.value.message
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        out = proc.stdout.read()
    finally:
        emu.terminate()
        emu.wait(10)
    assert "stopped cleanly; 0 reservations left pending" in out, out
    [line] = [json.loads(row.split("proxyd.access: ", 1)[1]) for row in out.splitlines()
              if "proxyd.access: " in row and "chat/completions" in row]
    assert line["status"] == 503 and line["cut_off"] == "shutdown" and "client_gone" not in line, line
    import sqlite3

    conn = sqlite3.connect(tmp_path / "ledger.db")
    [(status, http, completion)] = conn.execute("SELECT status, http_status, completion_tokens FROM requests").fetchall()
    assert (status, http) == ("settled", 503)
    assert completion == len(got) and 3 <= completion < 2000, (completion, len(got))


# -- item 16: refusals carry their model ---------------------------------------------------------------------


def test_refusals_carry_the_model_in_the_request_metrics(world):
    key = world.new_user("alice", limits={"requests_per_minute": 1})
    client = world.client(key)
    client.chat.completions.create(model="llama3.2:1b", messages=MSG)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="llama3.2:1b", messages=MSG)
    metrics = httpx.get(world.url + "/metrics").text
    assert re.search(r'proxyd_requests_total\{model="llama3.2:1b",route="ChatCompletionsHandler",status="429"\} 1\.0',
                     metrics), [row for row in metrics.splitlines() if "proxyd_requests_total" in row]


# -- item 17: a max_tokens proxyd chose is announced ---------------------------------------------------------


def _sent_max_tokens(world) -> int:
    return [r for r in world.emu.requests if r["path"] == "/v1/chat/completions"][-1]["body"]["max_tokens"]


def test_the_max_tokens_proxyd_sets_is_named_in_headers(make_world):
    world = make_world(config={"estimate.default_max_tokens": 512})
    client = world.client(world.new_user("alice"))
    raw = client.chat.completions.with_raw_response.create(model="llama3.2:1b", messages=MSG)
    assert (raw.headers["x-proxyd-max-tokens"], raw.headers["x-proxyd-max-tokens-reason"]) == ("512", "default")
    assert _sent_max_tokens(world) == 512
    # moondream's context window (2,048 in the default config) leaves less than the default 4,096
    world = make_world()
    client = world.client(world.new_user("alice"))
    raw = client.chat.completions.with_raw_response.create(model="moondream", messages=MSG, stream=True)
    assert raw.headers["x-proxyd-max-tokens-reason"] == "context_window"
    assert int(raw.headers["x-proxyd-max-tokens"]) == _sent_max_tokens(world) < 2048
    list(raw.parse())
    # the client's own max_tokens: nothing to announce
    raw = client.chat.completions.with_raw_response.create(model="llama3.2:1b", messages=MSG, max_tokens=7)
    assert "x-proxyd-max-tokens" not in raw.headers and "x-proxyd-max-tokens-reason" not in raw.headers


def test_a_default_budget_shrunk_to_the_allowance_is_named_in_headers(world):
    client = world.client(world.new_user("alice", limits={"tokens_per_day": 60}))
    raw = client.chat.completions.with_raw_response.create(
        model="llama3.2:1b", messages=[{"role": "user", "content": "[[emu:reply_tokens=100]] go"}])
    cap = int(raw.headers["x-proxyd-max-tokens"])
    assert raw.headers["x-proxyd-max-tokens-reason"] == "allowance" and cap == _sent_max_tokens(world) < 60
    answer = raw.parse()
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == cap
