"""Browser clients through CORS (issue #12, item 10), in a real headless Chromium.

A page served from one loopback origin calls the proxy on another with ``fetch`` carrying exactly the
headers the openai JS SDK sends (read from the npm package ``openai`` 6.49.0: client.mjs buildHeaders
and internal/detect-platform.mjs for a browser), so Chromium makes the same preflight the SDK's calls
cause. The test drives Chromium over the DevTools protocol (its websocket, with aiohttp's client) and
reads what the page's script could see: statuses, bodies, and the response headers a client needs.

Skipped only when Chromium is missing on a developer's machine; under CI (env CI set) it must run:
.ci/run installs Debian's ``chromium``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiohttp
import httpx
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# The headers the openai JS SDK (6.49.0) sends from a browser, besides any the caller adds
# (OpenAI-Organization / OpenAI-Project when configured, X-Stainless-Helper-Method for helpers).
SDK_HEADERS_JS = """{
  "Authorization": "Bearer " + key,
  "Content-Type": "application/json",
  "Accept": "application/json",
  "User-Agent": "OpenAI/JS 6.49.0",
  "X-Stainless-Retry-Count": "0",
  "X-Stainless-Timeout": "600",
  "X-Stainless-Lang": "js",
  "X-Stainless-Package-Version": "6.49.0",
  "X-Stainless-OS": "Unknown",
  "X-Stainless-Arch": "unknown",
  "X-Stainless-Runtime": "browser:chrome",
  "X-Stainless-Runtime-Version": "156.0.0",
  "OpenAI-Organization": "org-test",
  "OpenAI-Project": "proj-test",
}"""

# What a browser client needs to read (and sees as null unless exposed).
READ = ["x-request-id", "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
        "retry-after", "retry-after-ms", "x-should-retry", "x-proxyd-limit", "x-proxyd-limit-quota",
        "x-proxyd-limit-remaining", "x-proxyd-limit-reset", "content-type"]

SCRIPT = """
(async () => {
  const base = %(base)s;
  const read = %(read)s;
  const sdkHeaders = (key) => (%(headers)s);
  async function call(key, path, body) {
    try {
      const init = {method: body ? "POST" : "GET", headers: sdkHeaders(key)};
      if (body) init.body = JSON.stringify(body);
      const r = await fetch(base + path, init);
      const text = await r.text();
      const headers = {};
      for (const n of read) headers[n] = r.headers.get(n);
      return {status: r.status, headers, body: text};
    } catch (e) {
      return {error: String(e)};
    }
  }
  const chat = (extra) => Object.assign({model: "llama3.2:1b", messages: [{role: "user", content: "Hi"}]}, extra);
  const out = {};
  out.ok = await call(%(key)s, "/chat/completions", chat({}));
  out.stream = await call(%(key)s, "/chat/completions", chat({stream: true, stream_options: {include_usage: true}}));
  out.models = await call(%(key)s, "/models");
  out.limited = await call(%(key)s, "/chat/completions", chat({}));
  out.quota = await call(%(quota_key)s, "/chat/completions", chat({max_tokens: 60}));
  out.bad_key = await call("sk-not-a-key", "/chat/completions", chat({}));
  out.bad_body = await call(%(key)s, "/chat/completions", {model: "llama3.2:1b"});
  return out;
})()
"""


class _Page(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        body = b"<!doctype html><title>proxyd CORS test</title><p>page</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def page_origin():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def chromium(tmp_path):
    """A headless Chromium with its DevTools websocket; yields the browser's websocket URL."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); required under CI")
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    log_file = open(tmp_path / "chromium.log", "wb")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         "--remote-debugging-address=127.0.0.1", "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file,
        start_new_session=True,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if proc.poll() is not None or time.time() > deadline:
                log = (tmp_path / "chromium.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"chromium did not start (exit {proc.poll()}): {log}")
            time.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        yield f"ws://127.0.0.1:{port}{path}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the group this fixture started (chromium and its children)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log_file.close()


async def _run_in_page(ws_url: str, page_url: str, expression: str, timeout: float = 60) -> dict:
    """Opens page_url in a new tab, waits for its load event, evaluates expression (a promise) there."""
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        ids = itertools.count(1)
        events: list[dict] = []

        async def send(method: str, params: dict | None = None, sid: str | None = None) -> dict:
            n = next(ids)
            await ws.send_json({"id": n, "method": method, "params": params or {}, **({"sessionId": sid} if sid else {})})
            while True:
                msg = await ws.receive_json()
                if msg.get("id") == n:
                    if "error" in msg:
                        raise AssertionError(f"{method}: {msg['error']}")
                    return msg["result"]
                events.append(msg)

        async def until_loaded(sid: str) -> None:
            while True:
                if any(e.get("method") == "Page.loadEventFired" and e.get("sessionId") == sid for e in events):
                    return
                events.append(await ws.receive_json())

        async def run() -> dict:
            target = (await send("Target.createTarget", {"url": "about:blank"}))["targetId"]
            sid = (await send("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
            await send("Page.enable", sid=sid)
            events.clear()
            await send("Page.navigate", {"url": page_url}, sid=sid)
            await until_loaded(sid)
            result = await send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                     "returnByValue": True}, sid=sid)
            if "exceptionDetails" in result:
                raise AssertionError(result["exceptionDetails"])
            return result["result"]["value"]

        return await asyncio.wait_for(run(), timeout)


def test_the_openai_sdk_headers_work_from_a_browser(make_world, page_origin, chromium):
    world = make_world(config={"server.cors_origins": [page_origin]})
    key = world.new_user("alice", limits={"requests_per_minute": 2})
    quota_key = world.new_user("bob", limits={"tokens_per_day": 50})
    script = SCRIPT % {"base": json.dumps(world.url + "/v1"), "read": json.dumps(READ), "headers": SDK_HEADERS_JS,
                       "key": json.dumps(key), "quota_key": json.dumps(quota_key)}
    out = asyncio.run(_run_in_page(chromium, page_origin + "/", script))

    # Before the fix the preflight's "X-Stainless-*" (not a wildcard) rejected every call:
    # {'error': 'TypeError: Failed to fetch'}, the SDK's "Connection error".
    for name, r in out.items():
        assert "error" not in r, (name, r)
        assert r["headers"]["x-request-id"].startswith("req_"), (name, r)  # exposed, also on errors

    ok = out["ok"]
    assert ok["status"] == 200 and json.loads(ok["body"])["choices"], ok
    assert (ok["headers"]["x-ratelimit-limit-requests"], ok["headers"]["x-ratelimit-remaining-requests"]) == ("2", "1"), ok
    assert ok["headers"]["x-ratelimit-reset-requests"] == "1m0s", ok

    stream = out["stream"]
    assert stream["status"] == 200 and stream["headers"]["content-type"].startswith("text/event-stream"), stream
    assert stream["body"].rstrip().endswith("data: [DONE]") and '"usage"' in stream["body"], stream
    assert stream["headers"]["x-ratelimit-remaining-requests"] == "0", stream

    assert out["models"]["status"] == 200 and json.loads(out["models"]["body"])["data"], out["models"]

    limited = out["limited"]  # the 3rd request in the minute: a retryable 429 a browser client can pace by
    assert limited["status"] == 429, limited
    h = limited["headers"]
    assert 0 < int(h["retry-after"]) <= 60 and int(h["retry-after-ms"]) > 0, limited
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("2", "0"), limited
    assert h["x-should-retry"] is None, limited

    quota = out["quota"]  # a long-term limit: not retryable, named in proxyd's own headers
    assert quota["status"] == 429 and json.loads(quota["body"])["error"]["code"] == "request_too_large", quota
    h = quota["headers"]
    assert (h["x-should-retry"], h["x-proxyd-limit"], h["x-proxyd-limit-quota"]) == ("false", "tokens_per_day", "50"), quota
    assert h["x-proxyd-limit-reset"].endswith("Z") and h["x-ratelimit-limit-tokens"] is None, quota

    # Errors raised before or after admission go through Tornado's send_error, which clears every
    # header: the CORS headers must survive it, or the browser hides the status and the envelope.
    assert out["bad_key"]["status"] == 401, out["bad_key"]
    assert json.loads(out["bad_key"]["body"])["error"]["code"] == "invalid_api_key", out["bad_key"]
    assert out["bad_body"]["status"] == 400 and json.loads(out["bad_body"]["body"])["error"]["param"] == "messages", out["bad_body"]


# -- the same rules over plain HTTP (fast; no browser) --------------------------------------------------------


def test_preflight_reflects_valid_requested_headers_only(make_world):
    origin = "https://app.example"
    world = make_world(config={"server.cors_origins": [origin]})
    url = world.url + "/v1/chat/completions"
    asked = "authorization,content-type,x-stainless-arch,x-stainless-retry-count,x-stainless-helper-method"
    r = httpx.options(url, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                    "Access-Control-Request-Headers": asked})
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == origin
    allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    assert set(asked.split(",")) <= allowed, r.headers
    assert not any("*" in h for h in allowed), r.headers
    assert "POST" in r.headers["access-control-allow-methods"]
    vary = {v.strip().lower() for v in r.headers["vary"].split(",")}
    assert {"origin", "access-control-request-headers"} <= vary, r.headers

    # Not header names (RFC 9110 tokens): nothing is reflected, so the browser refuses the call.
    for bad in ("x-a b", "x-a\tb", "x-ok, (bad)", "x-ok,,x-b;", "x-" + "a" * 5000):
        r = httpx.options(url, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                        "Access-Control-Request-Headers": bad})
        assert r.status_code == 204 and "access-control-allow-headers" not in r.headers, (bad, r.headers)

    # No origin match: no CORS headers at all.
    r = httpx.options(url, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
                                    "Access-Control-Request-Headers": "authorization"})
    assert "access-control-allow-origin" not in r.headers and "access-control-allow-headers" not in r.headers


def test_cors_headers_and_exposed_headers_survive_errors(make_world):
    origin = "https://app.example"
    world = make_world(config={"server.cors_origins": [origin]})
    key = world.new_user("alice", limits={"requests_per_minute": 1})
    body = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "Hi"}]}
    cases = {
        "ok": httpx.post(world.url + "/v1/chat/completions", json=body,
                         headers={"Origin": origin, "Authorization": f"Bearer {key}"}),
        "limited": httpx.post(world.url + "/v1/chat/completions", json=body,
                              headers={"Origin": origin, "Authorization": f"Bearer {key}"}),
        "unauthorized": httpx.post(world.url + "/v1/chat/completions", json=body, headers={"Origin": origin}),
        "unknown path": httpx.get(world.url + "/v1/nope", headers={"Origin": origin}),
        "method": httpx.delete(world.url + "/v1/models", headers={"Origin": origin, "Authorization": f"Bearer {key}"}),
    }
    assert [r.status_code for r in cases.values()] == [200, 429, 401, 404, 405]
    for name, r in cases.items():
        assert r.headers.get("access-control-allow-origin") == origin, (name, r.headers)
        exposed = {h.strip().lower() for h in r.headers.get("access-control-expose-headers", "").split(",")}
        for needed in ("x-request-id", "x-ratelimit-remaining-requests", "x-ratelimit-reset-tokens", "retry-after",
                       "retry-after-ms", "x-should-retry", "x-proxyd-limit", "x-proxyd-limit-reset",
                       "x-proxyd-max-tokens"):
            assert needed in exposed, (name, needed, r.headers)
    # Without an Origin (not a browser), no CORS headers are added.
    r = httpx.get(world.url + "/v1/nope")
    assert "access-control-allow-origin" not in r.headers and "access-control-expose-headers" not in r.headers
