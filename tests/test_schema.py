"""docs/openapi.yaml against the live proxy: schemathesis explores every operation (issue #6).

A module-wide world (Ollama emulator + proxyd on loopback) answers every generated request. Checks:

* no 5xx at all: the emulator has no faults queued and no ``[[emu:...]]`` directive can be generated,
  so a 502/503/504 (or an Ollama 500 passed through) would be a bug on one side or the other;
* every non-2xx answer is OpenAI's envelope with exactly ``message, type, param, code``;
* status code, content type, declared headers and body conform to the document;
* methods the document does not list are refused with 405 (in the envelope).

Nothing leaves the machine: image URLs in generated bodies are pinned to data: URLs and
``http://127.0.0.1/...`` (refused as loopback), the proxy's image fetcher gets a resolver that refuses
every name and a deny-everything network list, and DNS lookups of anything but loopback fail in this
process for the module's duration.

Deterministic (derandomized, fixed seed): per operation the document's examples, schemathesis' coverage
cases (boundaries, missing/extra fields, wrong types, unlisted methods) and up to ``MAX_EXAMPLES`` fuzzed
cases, positive and negative; about 2,700 requests, ~20 s on 2 cores.

The second half holds regression tests for what this fuzzing (and tests/test_properties.py) turned up,
each on a fresh world.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import ipaddress
import json
import logging
import re
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import yaml

schemathesis = pytest.importorskip("schemathesis")

# After the skip above, so that a machine without schemathesis skips instead of failing to import.
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.harness import ADMIN_TOKEN, Harness  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
MAX_EXAMPLES = 50
ENVELOPE_KEYS = {"message", "type", "param", "code"}

# A 1x1 PNG and a 1x1 GIF (the GIF is converted to PNG by proxyd): real images for the vision path.
PNG_1PX = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8/5+hHgAHggJ/PchI7wAAAABJRU5ErkJggg=="
)
GIF_1PX = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"
SAFE_URL = "http://127.0.0.1/refused.png"  # refused by proxyd (loopback) before any connection
MODELS = ["llama3.2:1b", "moondream", "nomic-embed-text"]


# -- the document, narrowed for safe and productive generation ------------------------------------


def _test_document() -> dict[str, Any]:
    """The published document with two test-only narrowings: image URLs are data: URLs or a loopback URL
    (never a public host name), and model names are mostly ones the emulator has."""
    doc = yaml.safe_load(DOC.read_text())
    schemas = doc["components"]["schemas"]
    schemas["ImageUrlString"] = {
        "anyOf": [
            {"type": "string", "enum": [PNG_1PX, GIF_1PX, SAFE_URL]},
            {"type": "string", "pattern": r"^data:image/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/]{0,40}={0,2}$"},
        ]
    }
    model = copy.deepcopy(schemas["ModelName"])
    schemas["ModelName"] = {"anyOf": [{"type": "string", "enum": MODELS}, model]}
    return doc


CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 20240607,
        "generation": {
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            "database": "none",
            # credentials are supplied per operation below, not fuzzed
            "with-security-parameters": False,
        },
        "phases": {"stateful": {"enabled": False}},
        # reproductions must show max_tokens & co. (their names contain "token")
        "output": {"sanitization": {"enabled": False}},
    }
)
schema = schemathesis.openapi.from_dict(_test_document(), config=CONFIG)


# -- the world ----------------------------------------------------------------------------------------


class Live:
    def __init__(self, harness: Harness, user_key: str, errors: ErrorLog) -> None:
        self.h = harness
        self.url = harness.url
        self.user_key = user_key
        self.errors = errors
        self.session = requests.Session()
        self.seen: dict[str, list[int]] = {}


class ErrorLog(logging.Handler):
    """Collects ERROR records of the proxy (and of Tornado, which logs uncaught handler exceptions):
    a crash a client never sees (a failed ledger write, an exception in on_connection_close) is a bug too."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("proxyd", "tornado")):
            self.records.append(record)

    def describe(self) -> str:
        out = []
        for r in self.records:
            text = r.getMessage()
            if r.exc_info and r.exc_info[1] is not None:
                text += f" -> {type(r.exc_info[1]).__name__}: {r.exc_info[1]}"
            out.append(f"{r.name}: {text}")
        return "\n".join(out)


def _loopback_only(real):
    def getaddrinfo(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in (None, "localhost"):
            try:
                ok = ipaddress.ip_address(name.strip("[]")).is_loopback
            except ValueError:
                ok = False
            if not ok:
                raise socket.gaierror(socket.EAI_NONAME, f"test_schema: no DNS for {name!r}")
        return real(host, *args, **kwargs)

    return getaddrinfo


async def _refuse_every_name(host: str, port: int) -> list[str]:
    raise OSError(f"test_schema: resolving {host!r} is not allowed")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setattr(socket, "getaddrinfo", _loopback_only(socket.getaddrinfo))
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    h = Harness(
        str(tmp_path_factory.mktemp("schema") / "proxyd.db"),
        config={
            "pricing": {
                "llama3.2:1b": {"input_per_million_usd": "0.10", "output_per_million_usd": "0.40"},
                "moondream": {"input_per_million_usd": "0.05", "output_per_million_usd": "0.20"},
            }
        },
    ).start()
    try:
        # The image fetcher may not resolve or connect anywhere (every address is denied).
        images = h.ctx.images
        images.policy = dataclasses.replace(images.policy, deny_networks=("0.0.0.0/0", "::/0"))
        images.resolver = _refuse_every_name
        # "alice" is the document's example user (admin operations act on her, PATCH may disable her);
        # the fuzzed user API runs as "fuzzer", whom no example names.
        h.new_user("alice", {"tokens_per_day": 1_000_000, "models": {"llama3.2:1b": {"cost_per_day_usd": "5"}}})
        key = h.new_user(
            "fuzzer",
            {"requests_per_minute": 100_000, "tokens_per_month": 10**10, "cost_per_month_usd": "1000",
             "models": {"moondream": {"requests_per_day": 100_000}}},
        )
        client = h.client(key)
        client.chat.completions.create(model="llama3.2:1b", messages=[{"role": "user", "content": "hi"}])
        client.embeddings.create(model="nomic-embed-text", input=["a", "b"])
        live = Live(h, key, errors)
        yield live
        live.session.close()
    finally:
        h.close()
        mp.undo()
        logging.getLogger().removeHandler(errors)


# -- checks -------------------------------------------------------------------------------------------


def error_envelope(ctx, response, case) -> None:
    """Every non-2xx answer is exactly {"error": {"message", "type", "param", "code"}}; on Ollama's
    native routes (/api/...) Ollama's {"error": "..."}; Anthropic's {"type": "error", "error": {"type",
    "message"}} on its routes."""
    if 200 <= response.status_code < 300:
        return
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{response.status_code} body is not JSON: {response.content[:300]!r}") from None
    if case.path.startswith("/api/"):
        assert isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str), body
        assert body["error"] and _header(response, "Content-Type").startswith("application/json"), response.headers
        return
    if case.path.startswith("/v1/messages"):
        assert isinstance(body, dict) and set(body) == {"type", "error"} and body["type"] == "error", body
        assert set(body["error"]) == {"type", "message"} and body["error"]["message"], body
        assert _header(response, "Content-Type").startswith("application/json"), response.headers
        return
    assert isinstance(body, dict) and set(body) == {"error"}, f"not an envelope: {body!r}"
    err = body["error"]
    assert isinstance(err, dict) and set(err) == ENVELOPE_KEYS, f"envelope keys {sorted(err)}: {body!r}"
    assert isinstance(err["message"], str) and err["message"], body
    assert isinstance(err["type"], str) and err["type"], body
    assert err["param"] is None or isinstance(err["param"], str), body
    assert err["code"] is None or isinstance(err["code"], str), body
    assert _header(response, "Content-Type").startswith("application/json"), response.headers


def stream_integrity(ctx, response, case) -> None:
    """A 200 event stream ends with [DONE] and every other event is a JSON object without an error."""
    if response.status_code != 200 or not _header(response, "Content-Type").startswith("text/event-stream"):
        return
    text = response.content.decode("utf-8")
    if case.path == "/v1/responses":  # no [DONE]: named events, the last one terminal (issue #14)
        blocks = [block.split("\n", 1) for block in text.split("\n\n") if block]
        assert blocks and blocks[-1][0] in ("event: response.completed", "event: response.incomplete",
                                            "event: response.failed"), f"no terminal event: {text[-300:]!r}"
        for event, data in blocks:
            doc = json.loads(data[len("data: "):])
            assert event == "event: " + doc["type"] and "error" not in doc, data
        return
    if case.path.startswith("/v1/messages"):  # Anthropic's: named events, the last one message_stop
        blocks = text.strip().split("\n\n")
        assert blocks and blocks[-1] == 'event: message_stop\ndata: {"type":"message_stop"}', text[-300:]
        for block in blocks:
            name, data = block.split("\n")
            assert name != "event: error" and json.loads(data[len("data: "):])["type"] == name[len("event: "):]
        return
    events = [block[len("data: "):] for block in text.split("\n\n") if block.startswith("data: ")]
    assert events and events[-1] == "[DONE]", f"stream does not end with [DONE]: {text[-300:]!r}"
    for data in events[:-1]:
        doc = json.loads(data)
        assert isinstance(doc, dict) and "error" not in doc, data


def _header(response, name: str) -> str:
    value = response.headers.get(name.lower(), response.headers.get(name, ""))
    return value[0] if isinstance(value, list) and value else value or ""


def request_id(ctx, response, case) -> None:
    assert re.fullmatch(r"req_[0-9a-f]{28}", _header(response, "x-request-id")), response.headers


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    error_envelope,
    stream_integrity,
    request_id,
]


# -- the test -----------------------------------------------------------------------------------------

_URL_LIKE = re.compile(r"^\s*[A-Za-z][A-Za-z0-9+.\-]*:/")


def _pin_urls(value: Any) -> Any:
    """Any string in a body that could be fetched (a URL other than data: or the loopback one) becomes
    the loopback URL. Belt and braces: the schema already generates only those."""
    if isinstance(value, dict):
        return {k: _pin_urls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_pin_urls(v) for v in value]
    fetchable = isinstance(value, str) and ("//" in value or "\\" in value or _URL_LIKE.match(value))
    if fetchable and not (value[:5].lower() == "data:" or value.startswith("http://127.0.0.1/")):
        return SAFE_URL
    return value


def _auth(live: Live, path: str) -> dict[str, str]:
    if path.startswith("/admin/"):
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    if path in ("/healthz", "/metrics"):
        return {}
    return {"Authorization": f"Bearer {live.user_key}"}


@schema.parametrize()
def test_openapi_conformance(case, live):
    if case.body is not None and not isinstance(case.body, (bytes, str)):
        pinned = _pin_urls(case.body)
        if pinned != case.body:
            case.body = pinned
    response = case.call(base_url=live.url, session=live.session, headers=_auth(live, case.path), timeout=60)
    live.seen.setdefault(case.operation.label, []).append(response.status_code)
    case.validate_response(response, checks=CHECKS, headers=_auth(live, case.path))


# -- what the fuzzing leaves behind ----------------------------------------------------------------


def test_world_is_consistent_after_fuzzing(live):
    """After all of the above: nothing reserved, the ledger's aggregates match its rows, and the user API
    still answers the fuzzing user (the fuzz never reached it through the admin API)."""
    live.h.settle_all()
    for op, codes in sorted(live.seen.items()):  # shown with -s: what the fuzzing reached
        print(f"{op:45s} {len(codes):4d} {dict(sorted(collections.Counter(codes).items()))}")
    # Every operation was reached, and all but key revocation (its ids are random) also succeeded.
    assert len(live.seen) == len(list(schema.get_all_operations())), sorted(live.seen)
    no_success = [op for op, codes in live.seen.items() if not any(200 <= c < 300 for c in codes)]
    assert no_success in ([], ["DELETE /admin/keys/{key_id}"]), no_success
    check = requests.get(live.url + "/admin/ledger/check", headers=_auth(live, "/admin/"), timeout=30).json()
    assert check["ok"], check
    assert check["reserved_in_flight"] == 0
    r = requests.get(live.url + "/v1/limits", headers=_auth(live, "/v1/"), timeout=30)
    assert r.status_code == 200, r.text
    users = requests.get(live.url + "/admin/users", headers=_auth(live, "/admin/"), timeout=30)
    assert users.status_code == 200, users.text
    assert live.h.ctx.in_flight <= 1, live.h.ctx.in_flight  # this request's own handler may still count
    assert not live.h.ctx.open_per_key, live.h.ctx.open_per_key
    assert not live.errors.records, "the proxy logged errors while fuzzed:\n" + live.errors.describe()


# -- regressions: what fuzzing the live API turned up (each on a fresh world) ---------------------------


def _envelope(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ENVELOPE_KEYS, body
    return body["error"]


def _ledger_ok(world) -> None:
    world.settle_all()
    check = world.admin("GET", "/admin/ledger/check").json()
    assert check["ok"] and check["reserved_in_flight"] == 0, check


def _chat(world, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(world.url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}"})


@pytest.mark.parametrize("tool_calls", [5, True, 1.5, {"a": 1}, "x", [5], [{"function": "f"}]])
def test_malformed_tool_calls_are_a_400(world, tool_calls):
    """tool_calls that are not an array of {type, function: {name, arguments}} objects: refused by proxyd
    itself (a 500 from the token counter or from Ollama's decoder is not an answer)."""
    key = world.new_user("u")
    for content in ("hi", None):
        r = _chat(world, key, {"model": "llama3.2:1b",
                               "messages": [{"role": "assistant", "content": content, "tool_calls": tool_calls},
                                            {"role": "user", "content": "hi"}]})
        assert r.status_code == 400, r.text
        _envelope(r)
    _ledger_ok(world)


@pytest.mark.parametrize("limits", [
    {"cost_per_day_usd": 1e20},
    {"total_cost_usd": "123456789012345678901234567890"},
    {"models": {"llama3.2:1b": {"cost_per_month_usd": 3.2e306}}},
    {"cost_per_day_usd": "1e999999"},
    {"cost_per_day_usd": "1e-999999999"},
    {"tokens_per_day": 1e300},
])
def test_extreme_limit_values_never_break_the_admin_api(world, limits):
    """Any limits document is either stored and shown back (GET /admin/users, /v1/limits keep working),
    or refused with a 400; never a 500, and never a user record that breaks every later listing."""
    key = world.new_user("u")
    r = world.admin("PUT", "/admin/users/u/limits", limits)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        _envelope(r)
    for path in ("/admin/users", "/admin/users/u", "/admin/users/u/limits"):
        assert world.admin("GET", path).status_code == 200, path
    assert world.get("/v1/limits", key).status_code == 200
    r = world.admin("POST", "/admin/users", {"user_id": "v", "limits": limits})
    assert r.status_code in (201, 400), r.text
    assert world.admin("GET", "/admin/users").status_code == 200


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_beyond_sqlite_integers(world, field):
    """A cap of 2**63 or more cannot be written to the ledger (SQLite INTEGER is 64-bit): it must be
    refused (or clamped) up front, never admitted with its pending row lost."""
    key = world.new_user("u")
    for value in (2**63, 10**40):
        r = _chat(world, key, {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}], field: value})
        assert r.status_code < 500, r.text
        if r.status_code >= 400:
            _envelope(r)
    _ledger_ok(world)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/admin/users",
                                  "/v1/usage"])
def test_client_that_leaves_mid_upload_releases_its_slots(make_world, path):
    """A client that disconnects while sending its body must not keep a request slot: in_flight (which a
    graceful shutdown waits for) and the per-key open-request count return to zero."""
    world = make_world(config={"server.max_connections_per_key": 2})
    key = world.new_user("u")
    auth = ADMIN_TOKEN if path.startswith("/admin") else key
    for declared in (1000, 10**12):  # under the body limit (body read starts), over it (413 at once)
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", world.port)) as s:
                s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {auth}\r\n"
                          f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n{{".encode())
                time.sleep(0.05)
    deadline = time.time() + 2
    while time.time() < deadline and (world.ctx.in_flight or world.ctx.open_per_key):
        time.sleep(0.02)
    assert world.ctx.in_flight == 0 and not world.ctx.open_per_key, (world.ctx.in_flight, world.ctx.open_per_key)
    assert world.get("/v1/models", key).status_code == 200


def test_user_id_with_trailing_newline_is_refused(world):
    r = world.admin("POST", "/admin/users", {"user_id": "abc\n"})
    assert r.status_code == 400, r.text
    assert _envelope(r)["param"] == "user_id"


@pytest.mark.parametrize("raw", [
    b'{"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}], "user": "\\ud800"}',
    b'{"model": "llama3.2:1b\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
    b'{"model": "nomic-embed-text", "input": "\\udfff"}',
], ids=["in-user-field", "in-model", "in-embedding-input"])
def test_lone_surrogates_in_json_strings(world, raw):
    """JSON may escape a lone UTF-16 surrogate, which no UTF-8 text (the ledger, Ollama's Go decoder) can
    hold. proxyd answers without a 5xx and without a failed ledger write."""
    key = world.new_user("u")
    path = "/v1/embeddings" if b"input" in raw else "/v1/chat/completions"
    r = httpx.post(world.url + path, content=raw, timeout=30,
                   headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        _envelope(r)
    _ledger_ok(world)


def test_image_sent_to_a_text_only_model_is_a_client_error(world):
    """Ollama answers an image part to a model without vision with HTTP 500 ("this model is missing data
    required for image input"). That is the client's mistake: proxyd answers 400, so SDKs do not retry."""
    key = world.new_user("u")
    r = _chat(world, key, {"model": "llama3.2:1b", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                     {"type": "image_url", "image_url": {"url": PNG_1PX}}]}]})
    assert r.status_code == 400, r.text
    _envelope(r)
    _ledger_ok(world)


def test_model_path_parameter_is_escaped_upstream(world):
    """GET /v1/models/{model}: '?' and '#' in a decoded name never start a query or fragment of Ollama's
    URL. They are not model-name characters, so the name is refused as Ollama refuses it (400 "invalid
    model name", issue #12 item 6) before any upstream URL is built; a valid name goes percent-encoded."""
    key = world.new_user("u")
    for quoted, name in (("a%3Fb", "a?b"), ("a%23b", "a#b"), ("a%3Fb%3Dc%26d", "a?b=c&d")):
        r = world.get("/v1/models/" + quoted, key)
        assert r.status_code == 400, r.text
        assert f"'{name}'" in _envelope(r)["message"], r.text
    assert not any(q["path"].startswith("/v1/models/") for q in world.emu.requests)
