"""A realistic load test of proxyd with Locust: many users, each with its own key, a mixed workload.

    # proxyd with an admin token, in front of Ollama or the emulator, e.g.
    #   python -m ollama_emulator --port 11434 --token-delay 0.01 &
    #   PROXYD_ADMIN_TOKEN=bench-admin-token PROXYD_DB=/tmp/locust.db python app.py &
    locust -f load/locustfile.py --host http://127.0.0.1:8000                            # web UI, :8089
    locust -f load/locustfile.py --host http://127.0.0.1:8000 --headless -u 50 -r 10 -t 30s

A headless run without ``-t`` is given ``-t 60s``: it always stops by itself.

At test start (``events.test_start``) the file creates its users through the admin API (token from
``PROXYD_ADMIN_TOKEN``, default ``bench-admin-token`` as in ``load.bench``): ``LOCUST_PROXYD_USERS``
keys (default 20), of which ``LOCUST_PROXYD_TIGHT`` (default 2) belong to users limited to
``LOCUST_PROXYD_TIGHT_RPM`` requests per minute (default 5). Each simulated user takes the next key.
The others get limits high enough not to be hit (the per-model moondream limit too).

Workload (task weights): non-stream chat with llama3.2:1b (5), streamed chat (3), embeddings with
nomic-embed-text (2), a small vision request to moondream with a 16x16 PNG made with Pillow at import
time, sent as a base64 data URL (1). Every answer is checked (JSON shape, usage, ``[DONE]`` at the end
of a stream). Streams are reported twice: ``chat stream`` with the time to the last byte and
``chat stream: first token`` with the time to the first event.

A 429 of a tight user is an expected outcome: it counts as a success under the name
``429 (expected)``, so the limits show up in their own row instead of as failures. A 429 of a user
with generous limits is a failure (``429 (unexpected)``).

Client: Locust's ``FastHttpUser`` (geventhttpclient) rather than ``HttpUser`` (requests) or the
``openai`` SDK (httpx + pydantic): it costs several times less CPU per request, so one Locust process
can drive far more users before the generator, not the proxy, becomes the bottleneck; on a 2-core
machine that shares its cores with the proxy and Ollama, that matters more than the SDK's fidelity
(which tests/ already covers with the real SDK).
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import logging
import os
import time
import urllib.error
import urllib.request

from locust import FastHttpUser, between, events, task
from locust.runners import MasterRunner

log = logging.getLogger("locustfile")

ADMIN_TOKEN = os.environ.get("PROXYD_ADMIN_TOKEN") or "bench-admin-token"
N_USERS = int(os.environ.get("LOCUST_PROXYD_USERS", "20"))
N_TIGHT = int(os.environ.get("LOCUST_PROXYD_TIGHT", "2"))
TIGHT_RPM = int(os.environ.get("LOCUST_PROXYD_TIGHT_RPM", "5"))

GENEROUS = {
    "requests_per_minute": 100_000,
    "tokens_per_minute": 100_000_000,
    "max_concurrent_requests": 256,
    "models": {"moondream": {"requests_per_minute": 100_000}},
}


def _tiny_png_data_url() -> str:
    from PIL import Image

    img = Image.new("RGB", (16, 16), (30, 120, 200))
    for x in range(16):
        img.putpixel((x, x), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGE_URL = _tiny_png_data_url()

QUESTIONS = [
    "What is 2+2?",
    "Name three primary colours.",
    "Translate 'good morning' into French.",
    "Give me a haiku about the sea.",
    "What is the capital of Australia?",
]

_keys: list[tuple[str, bool]] = []  # (api key, tight?)
_next_key = itertools.count()


def _admin_post(host: str, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(host.rstrip("/") + path, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", "Bearer " + ADMIN_TOKEN)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read())
        except ValueError:
            return e.code, {}


@events.init.add_listener
def _bounded_headless(environment, **_kw) -> None:
    opts = environment.parsed_options
    if opts is not None and getattr(opts, "headless", False) and not getattr(opts, "run_time", None):
        opts.run_time = 60
        log.warning("headless run without -t/--run-time: stopping after 60 s")


@events.test_start.add_listener
def _create_users(environment, **_kw) -> None:
    """One key per proxyd user; ids unique per run so a rerun against the same database works."""
    if isinstance(environment.runner, MasterRunner):
        return  # the workers make their own users
    host = environment.host or "http://127.0.0.1:8000"
    run = f"{int(time.time())}-{os.getpid()}"
    _keys.clear()
    for i in range(N_USERS):
        tight = i < N_TIGHT
        limits = {"requests_per_minute": TIGHT_RPM} if tight else GENEROUS
        status, doc = _admin_post(host, "/admin/users", {"user_id": f"locust-{run}-{i}", "limits": limits})
        if status != 201:
            log.error("creating a user through %s/admin/users failed: HTTP %s %s (is PROXYD_ADMIN_TOKEN right?)",
                      host, status, doc)
            environment.process_exit_code = 2
            if environment.runner is not None:
                environment.runner.quit()
            return
        _keys.append((doc["api_key"], tight))
    log.info("created %d proxyd users (%d limited to %d requests/minute)", N_USERS, N_TIGHT, TIGHT_RPM)


class ProxydUser(FastHttpUser):
    wait_time = between(0.2, 1.5)
    network_timeout = 120.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        if not _keys:
            raise RuntimeError("no proxyd keys: user creation failed at test start")
        self.key, self.tight = _keys[next(_next_key) % len(_keys)]
        self.headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}

    # -- helpers ----------------------------------------------------------------------------------

    def _limited(self, resp) -> bool:
        """A 429: expected (success, own row) for a tight user; a failure for everyone else."""
        if resp.status_code != 429:
            return False
        if self.tight:
            resp.request_meta["name"] = "429 (expected)"
            resp.success()
        else:
            resp.request_meta["name"] = "429 (unexpected)"
            resp.failure(f"429 for a user with generous limits: {resp.text[:200]}")
        return True

    def _check_json(self, resp, what: str) -> None:
        if self._limited(resp):
            return
        if resp.status_code != 200:
            resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
            return
        try:
            doc = resp.json()
        except ValueError:
            resp.failure("answer is not JSON")
            return
        if what == "embeddings":
            ok = isinstance(doc.get("data"), list) and doc["data"] and doc["data"][0].get("embedding")
        else:
            ok = doc.get("choices") and isinstance(doc["choices"][0].get("message", {}).get("content"), str)
        if not ok or not isinstance(doc.get("usage"), dict):
            resp.failure(f"unexpected {what} answer: {str(doc)[:200]}")
        else:
            resp.success()

    # -- tasks -------------------------------------------------------------------------------------

    @task(5)
    def chat(self) -> None:
        body = {"model": "llama3.2:1b", "max_tokens": 64, "temperature": 0.7, "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": QUESTIONS[next(_next_key) % len(QUESTIONS)]}]}
        with self.client.post("/v1/chat/completions", data=json.dumps(body), headers=self.headers,
                              name="chat", catch_response=True) as resp:
            self._check_json(resp, "chat")

    @task(3)
    def chat_stream(self) -> None:
        body = {"model": "llama3.2:1b", "stream": True, "max_tokens": 128,
                "messages": [{"role": "user", "content": "Tell me a short story."}]}
        t0 = time.perf_counter()
        with self.client.post("/v1/chat/completions", data=json.dumps(body), headers=self.headers,
                              name="chat stream", stream=True, catch_response=True) as resp:
            if self._limited(resp):
                return
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            first = None
            done = False
            error = None
            raw = resp._response  # geventhttpclient response: readline() returns as soon as a line is in
            try:
                while True:
                    line = raw.readline(b"\n")
                    if not line:
                        break
                    if first is None and line.startswith(b"data: "):
                        first = time.perf_counter()
                    if line.startswith(b"data: [DONE]"):
                        done = True
                    elif line.startswith(b'data: {"error"'):
                        error = line[6:200].decode(errors="replace")
            except Exception as exc:  # noqa: BLE001 - a connection cut mid-stream, whatever its type
                error = repr(exc)
            total_ms = (time.perf_counter() - t0) * 1000
            resp.request_meta["response_time"] = total_ms
            if first is not None:
                self.environment.events.request.fire(
                    request_type="SSE", name="chat stream: first token", response_time=(first - t0) * 1000,
                    response_length=0, exception=None, context={}, url=None, response=None, start_time=None,
                )
            if error or not done:
                resp.failure(f"stream ended without [DONE]: {error or 'connection closed'}")
            else:
                resp.success()

    @task(2)
    def embeddings(self) -> None:
        body = {"model": "nomic-embed-text", "input": ["the quick brown fox", "jumps over the lazy dog"]}
        with self.client.post("/v1/embeddings", data=json.dumps(body), headers=self.headers,
                              name="embeddings", catch_response=True) as resp:
            self._check_json(resp, "embeddings")

    @task(1)
    def vision(self) -> None:
        body = {"model": "moondream", "max_tokens": 64, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": IMAGE_URL}},
            {"type": "text", "text": "Describe this image."}]}]}
        with self.client.post("/v1/chat/completions", data=json.dumps(body), headers=self.headers,
                              name="vision (moondream)", catch_response=True) as resp:
            self._check_json(resp, "vision")
