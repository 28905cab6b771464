"""Wire transcripts (issue #13): what a client gets for a fixed set of requests, byte for byte.

Each case sends one request (or a short sequence) through the real proxy over loopback and compares
the status, the response headers and the body bytes (SSE streams included) with a file recorded under
tests/transcripts/. Values that differ by nature between runs are replaced by placeholders before the
comparison: request ids and the ids built from them, ``created`` timestamps, calendar instants, waits
measured in milliseconds. Everything else must match exactly, so a refactoring of the request path
that changes a header, a byte of an envelope or the framing of a stream fails here.

Record again (only when a change of the wire is intended, and say so in the commit):
``PROXYD_RECORD_TRANSCRIPTS=1 python -m pytest -q tests/test_transcript.py``.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from tests.fixtures_images import data_url, make_image
from tests.harness import Harness

DIR = Path(__file__).parent / "transcripts"
RECORD = os.environ.get("PROXYD_RECORD_TRANSCRIPTS") == "1"
MODEL = "llama3.2:1b"

# Headers that describe the transport, not the answer (Date) or follow from the body (Content-Length,
# compared through the body itself).
_SKIP_HEADERS = {"date", "content-length"}

_IDS = re.compile(r"\b(req_|chatcmpl-|cmpl-)[0-9a-f]{28}\b")
_CREATED = re.compile(r'"created":\s*\d+')
_INSTANT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z")
_TRY_AGAIN = re.compile(r"Try again in [0-9.e+-]+s")


def normalize_text(text: str) -> str:
    text = _IDS.sub(lambda m: m.group(1) + "<id>", text)
    text = _CREATED.sub('"created":<t>', text)
    text = _INSTANT.sub("<instant>", text)
    return _TRY_AGAIN.sub("Try again in <s>s", text)


def normalize_headers(headers: httpx.Headers) -> list[list[str]]:
    out = []
    for name, value in headers.multi_items():
        name = name.lower()
        if name in _SKIP_HEADERS:
            continue
        if name == "retry-after-ms":
            value = "<ms>"
        elif name == "retry-after" and headers.get("x-proxyd-limit-reset"):
            value = "<s>"  # seconds until a calendar period ends
        elif name.startswith("x-ratelimit-reset-") and value != "1m0s":
            value = "<duration>"  # a refusal's: until the newest entry leaves the window
        elif name == "etag":
            value = "<etag>"
        out.append([name, normalize_text(value)])
    return sorted(out)


def transcript(r: httpx.Response) -> dict[str, Any]:
    body = r.content.decode("utf-8")
    return {"status": r.status_code, "headers": normalize_headers(r.headers), "body": normalize_text(body)}


# -- the world ---------------------------------------------------------------------------------------------

CONFIG = {
    "server.max_body_bytes": 200_000,
    "server.max_connections_per_key": 1,
    "server.cors_origins": ["https://app.example"],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    h = Harness(str(tmp_path_factory.mktemp("transcript") / "proxyd.db"), config=CONFIG).start()
    yield h
    h.close()


class Client:
    """Raw HTTP: the bytes as they come, no SDK in between."""

    def __init__(self, world: Harness, key: str | None) -> None:
        self.world, self.key = world, key

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        return {**h, **(extra or {})}

    def post(self, path: str, body: Any = None, *, content: bytes | None = None, headers: dict | None = None) -> httpx.Response:
        if content is None:
            content = json.dumps(body).encode()
        return httpx.post(self.world.url + path, content=content,
                          headers=self.headers({"Content-Type": "application/json", **(headers or {})}), timeout=30)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.world.url + path, headers=self.headers(), timeout=30)


def chat(content: str = "Hi", **kw) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **kw}


_users = iter(range(1_000_000))
_made: list[str] = []  # the users the running case made (its ledger rows are compared too)


def new_user_id() -> str:
    _made.append(f"u{next(_users)}")
    return _made[-1]


def user(world: Harness, limits: dict[str, Any] | None = None) -> Client:
    return Client(world, world.new_user(new_user_id(), limits))


def ledger(world: Harness) -> list[list[Any]]:
    """The case's ledger rows: how each request ended (settled or voided, with what) — the wire's other half."""
    marks = ",".join("?" * len(_made))
    rows = world.rows("SELECT endpoint, stream, status, http_status, reserved_prompt, reserved_completion, prompt_tokens,"
                      f" completion_tokens, usage_source, error FROM requests WHERE user_id IN ({marks}) ORDER BY rowid",
                      tuple(_made))
    return [[normalize_text(v) if isinstance(v, str) else v for v in row] for row in rows]


# -- the cases: name -> function(world) -> the responses to compare -----------------------------------------

CASES: dict[str, Callable[[Harness], list[httpx.Response]]] = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


@case
def chat_once(w):
    return [user(w).post("/v1/chat/completions", chat("[[emu:reply_tokens=5]] Hi", max_tokens=50))]


@case
def chat_once_default_budget(w):
    return [user(w).post("/chat/completions", chat("Hi"))]  # no /v1; proxyd picks max_tokens


@case
def chat_once_cors(w):
    return [user(w).post("/v1/chat/completions", chat("Hi", max_tokens=20), headers={"Origin": "https://app.example"})]


@case
def chat_stream(w):
    return [user(w).post("/v1/chat/completions", chat("[[emu:reply_tokens=4]] Hi", stream=True))]


@case
def chat_stream_include_usage(w):
    return [user(w).post("/v1/chat/completions", chat("[[emu:reply_tokens=4]] Hi", stream=True, max_tokens=30,
                                                      stream_options={"include_usage": True}))]


@case
def chat_stream_include_usage_upstream_sends_none(w):
    # proxyd adds the usage chunk the client asked for, with what it billed.
    return [user(w).post("/v1/chat/completions", chat("[[emu:fault=no_usage]] [[emu:reply_tokens=3]] Hi", stream=True,
                                                      stream_options={"include_usage": True}))]


@case
def chat_stream_cut_mid_stream(w):
    return [user(w).post("/v1/chat/completions", chat("[[emu:fault=cut_after:2]] [[emu:reply_tokens=6]] Hi",
                                                      stream=True, max_tokens=40))]


@case
def chat_upstream_500(w):
    return [user(w).post("/v1/chat/completions", chat("[[emu:fault=error500]] Hi", max_tokens=10))]


@case
def chat_upstream_503(w):
    return [user(w).post("/v1/chat/completions", chat("[[emu:fault=busy503]] Hi", max_tokens=10))]


@case
def chat_stream_upstream_500(w):
    return [user(w).post("/v1/chat/completions", chat("[[emu:fault=error500]] Hi", stream=True))]


@case
def chat_unknown_model(w):
    return [user(w).post("/v1/chat/completions", {**chat("Hi", max_tokens=10), "model": "no-such-model"})]


@case
def chat_vision_data_url(w):
    content = [{"type": "text", "text": "What is this? [[emu:reply_tokens=3]]"},
               {"type": "image_url", "image_url": {"url": data_url(make_image())}}]
    return [user(w).post("/v1/chat/completions", {"model": "moondream", "messages": [{"role": "user", "content": content}],
                                                   "max_tokens": 30})]


@case
def chat_image_to_a_model_without_vision(w):
    content = [{"type": "text", "text": "What is this?"},
               {"type": "image_url", "image_url": {"url": data_url(make_image())}}]
    return [user(w).post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": content}],
                                                   "max_tokens": 30})]


@case
def completions_once(w):
    return [user(w).post("/v1/completions", {"model": MODEL, "prompt": "Once upon [[emu:reply_tokens=5]]", "max_tokens": 20})]


@case
def completions_stream(w):
    return [user(w).post("/v1/completions", {"model": MODEL, "prompt": "Once upon [[emu:reply_tokens=3]]", "stream": True})]


@case
def completions_stream_include_usage(w):
    return [user(w).post("/v1/completions", {"model": MODEL, "prompt": "Once upon [[emu:reply_tokens=3]]", "stream": True,
                                             "max_tokens": 20, "stream_options": {"include_usage": True}})]


@case
def embeddings(w):
    return [user(w).post("/v1/embeddings", {"model": "nomic-embed-text", "input": ["alpha beta", "gamma"]})]


@case
def embeddings_unknown_model(w):
    return [user(w).post("/v1/embeddings", {"model": "no-such-model", "input": "alpha"})]


@case
def models_list(w):
    return [user(w).get("/v1/models")]


@case
def models_one(w):
    c = user(w)
    return [c.get("/v1/models/llama3.2:1b"), c.get("/v1/models/no-such-model"), c.get("/v1/models/a%2Fb")]


@case
def bad_bodies(w):
    c = user(w)
    return [
        c.post("/v1/chat/completions", content=b"{not json"),
        c.post("/v1/chat/completions", content=b""),
        c.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
        c.post("/v1/chat/completions", chat("Hi", max_tokens=-1)),
        c.post("/v1/completions", {"model": MODEL}),
        c.post("/v1/embeddings", {"model": "nomic-embed-text"}),
        c.post("/v1/chat/completions", [1, 2]),
    ]


@case
def unauthorized(w):
    return [Client(w, None).post("/v1/chat/completions", chat("Hi")),
            Client(w, "sk-proxyd-wrong").post("/v1/chat/completions", chat("Hi")),
            Client(w, "sk-proxyd-wrong").get("/v1/models")]


@case
def too_large(w):
    return [user(w).post("/v1/chat/completions", chat("x" * 250_000))]


@case
def unknown_path_and_method(w):
    c = user(w)
    return [c.get("/v1/nothing-here"), c.get("/v1/chat/completions")]


@case
def per_minute_limit(w):
    c = user(w, {"requests_per_minute": 1, "tokens_per_minute": 1000})
    return [c.post("/v1/chat/completions", chat("Hi", max_tokens=10)), c.post("/v1/chat/completions", chat("Hi", max_tokens=10))]


@case
def per_minute_tokens_shrink_the_default_budget(w):
    c = user(w, {"tokens_per_minute": 200})
    return [c.post("/v1/chat/completions", chat("[[emu:reply_tokens=3]] Hi")),
            c.post("/v1/chat/completions", chat("Hi", max_tokens=500))]


@case
def daily_quota(w):
    c = user(w, {"requests_per_day": 1, "models": {MODEL: {"tokens_per_day": 5000}}})
    return [c.post("/v1/chat/completions", chat("Hi", max_tokens=10)), c.post("/v1/chat/completions", chat("Hi", max_tokens=10))]


@case
def cost_quota_too_large(w):
    c = user(w, {"total_tokens": 50, "cost_per_month_usd": "0"})
    return [c.post("/v1/chat/completions", chat("Hi", max_tokens=100))]


@case
def quota_zero(w):
    c = user(w, {"tokens_per_month": 0})
    return [c.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 5})]


@case
def concurrency_limits(w):
    # One request held open (a slow first byte); the key's second request meets the per-key cap, a
    # second key of the same user meets max_concurrent_requests.
    limits = {"max_concurrent_requests": 1}
    c = user(w, limits)
    user_id = new_user_id()
    first = Client(w, w.new_user(user_id, limits))
    second_key = w.admin("POST", f"/admin/users/{user_id}/keys", {}).json()["api_key"]
    held: list[httpx.Response] = []
    t = threading.Thread(target=lambda: held.append(
        first.post("/v1/chat/completions", chat("[[emu:fault=slow_first_byte:1.5]] Hi", max_tokens=5))))
    t.start()
    deadline = time.time() + 10
    while w.ctx.meter.limiter.pending == 0 and time.time() < deadline:
        time.sleep(0.01)
    out = [first.post("/v1/chat/completions", chat("Hi", max_tokens=5)),
           Client(w, second_key).post("/v1/chat/completions", chat("Hi", max_tokens=5))]
    t.join()
    del c
    return out + held


@pytest.mark.parametrize("name", sorted(CASES))
def test_transcript(world, name):
    _made.clear()
    got = [transcript(r) for r in CASES[name](world)]
    world.settle_all()
    got.append({"ledger": ledger(world)})
    path = DIR / f"{name}.json"
    if RECORD:
        DIR.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1, ensure_ascii=False) + "\n")
    want = json.loads(path.read_text())
    assert got == want
