"""proxyd as a process: kill -9 under load loses no answered request; SIGTERM drains (issues #3, #6)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADMIN = "proc-admin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited early with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise AssertionError(f"{url} did not come up")


@pytest.fixture
def emulator():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ollama_emulator", "--port", str(port), "--token-delay", "0.02"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/", proc)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def start_proxy(tmp_path, upstream: str, port: int) -> subprocess.Popen:
    cfg = tmp_path / "config.yaml"
    # pending_row_after_s 0: every request gets its pending row, so a crash leaves some to expire
    cfg.write_text("logging:\n  access_log: false\nserver:\n  shutdown_grace_s: 10\ndatabase:\n  pending_row_after_s: 0\n")
    env = {**os.environ, "PROXYD_PORT": str(port), "PROXYD_UPSTREAM": upstream,
           "PROXYD_DB": str(tmp_path / "ledger.db"), "PROXYD_ADMIN_TOKEN": ADMIN, "PROXYD_CONFIG": str(cfg)}
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    return proc


def new_key(base: str, user: str) -> str:
    r = httpx.post(base + "/admin/users", json={"user_id": user}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 201, r.text
    return r.json()["api_key"]


def test_kill_9_under_load_loses_no_answered_request(tmp_path, emulator):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_proxy(tmp_path, emulator, port)
    key = new_key(base, "alice")
    answered: list[str] = []
    stop = threading.Event()

    def worker(i: int) -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                body = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "[[emu:reply_tokens=3]] hi"}],
                        "stream": i % 2 == 0}
                try:
                    r = client.post(base + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
                    if r.status_code == 200 and (not body["stream"] or r.text.rstrip().endswith("data: [DONE]")):
                        answered.append(r.headers["x-request-id"])
                except httpx.HTTPError:
                    pass

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    stop.set()
    for t in threads:
        t.join(15)
    assert len(answered) > 20

    proc = start_proxy(tmp_path, emulator, port)  # same database: crash recovery on start
    try:
        out = subprocess.run([sys.executable, "app.py", "--check-ledger"], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "PROXYD_DB": str(tmp_path / "ledger.db")})
        check = json.loads(out.stdout)
        assert out.returncode == 0 and check["ok"], check
        assert "pending" not in check["requests_by_status"]
        import sqlite3

        conn = sqlite3.connect(tmp_path / "ledger.db")
        status = dict(conn.execute("SELECT id, status FROM requests").fetchall())
        missing = [rid for rid in answered if status.get(rid) != "settled"]
        assert not missing, f"{len(missing)} answered requests not settled in the ledger: {missing[:5]}"
    finally:
        proc.terminate()
        proc.wait(15)


def test_sigterm_drains_streams_and_exits_0(tmp_path, emulator):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_proxy(tmp_path, emulator, port)
    key = new_key(base, "alice")
    body = {"model": "llama3.2:1b", "stream": True,
            "messages": [{"role": "user", "content": "[[emu:reply_tokens=40]] story"}]}
    events = []
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}"}) as r:
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            events.append(line)
            if len(events) == 2:
                proc.send_signal(signal.SIGTERM)
    # The stream that was running when SIGTERM came finished completely (40 tokens at 20 ms each).
    assert events[-1] == "data: [DONE]"
    assert proc.wait(20) == 0
    log = proc.stdout.read()
    assert "stopped cleanly; 0 reservations left pending" in log
    import sqlite3

    conn = sqlite3.connect(tmp_path / "ledger.db")
    assert conn.execute("SELECT status, completion_tokens FROM requests").fetchall() == [("settled", 41)]


def test_admin_api_on_its_own_port(tmp_path, emulator):
    port, admin_port = free_port(), free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"logging:\n  access_log: false\nadmin:\n  port: {admin_port}\n  address: 127.0.0.1\n")
    env = {**os.environ, "PROXYD_PORT": str(port), "PROXYD_UPSTREAM": emulator,
           "PROXYD_DB": str(tmp_path / "ledger.db"), "PROXYD_ADMIN_TOKEN": ADMIN, "PROXYD_CONFIG": str(cfg)}
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        hdr = {"Authorization": f"Bearer {ADMIN}"}
        r = httpx.post(f"http://127.0.0.1:{port}/admin/users", json={"user_id": "a"}, headers=hdr)
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"  # not on the users' port
        key = new_key(f"http://127.0.0.1:{admin_port}", "a")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "llama3.2:1b", "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200
        r = httpx.post(f"http://127.0.0.1:{admin_port}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "llama3.2:1b", "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 404  # and no model API on the admin port
    finally:
        proc.terminate()
        assert proc.wait(15) == 0


def test_demo_mode_serves_the_readme_snippet_from_a_ledger_of_its_own(tmp_path):
    """The README's first command: `app.py --demo` with no Ollama around. It prints a key that works
    through the openai SDK, says it is in demo mode (banner and /healthz), and keeps its emulated
    usage and demo keys out of the configured ledger."""
    import openai

    port = free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"database:\n  path: {tmp_path / 'real.db'}\nupstream:\n  url: http://127.0.0.1:9\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXYD_")}
    proc = subprocess.Popen([sys.executable, "app.py", "--demo", "--port", str(port), "--config", str(cfg)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        banner = []
        for line in proc.stdout:
            banner.append(line)
            if "Your usage:" in line:
                break
        text = "".join(banner)
        key = text.split('api_key="')[1].split('"')[0]
        assert "Ollama emulator" in text and str(tmp_path / "proxyd-demo.db") in text, text
        client = openai.OpenAI(base_url=f"http://localhost:{port}", api_key=key, max_retries=0)
        r = client.chat.completions.create(model="llama3.2:1b", messages=[{"role": "user", "content": "What is 2+2?"}],
                                           max_tokens=20)
        assert r.choices[0].message.content and r.usage.total_tokens > 0
        assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="llama3.2:1b", stream=True, messages=[{"role": "user", "content": "Tell me a story"}]))
        admin = text.split("Admin token for this run: ")[1].split()[0]
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5, headers={"Authorization": f"Bearer {admin}"}).json()
        assert health["upstream"]["kind"] == "emulator" and health["status"] == "ok", health
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert (tmp_path / "proxyd-demo.db").exists() and not (tmp_path / "real.db").exists()
