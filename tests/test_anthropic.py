"""Anthropic's Messages API through proxyd (issue #14), driven by the official ``anthropic`` SDK.

The emulator speaks Ollama's /v1/messages (ollama_emulator/anthropic.py); proxyd meters it as a dialect
of the same pipeline: the same keys, limits and ledger as chat completions, with Anthropic's wire, errors
and headers.
"""

from __future__ import annotations

import base64
import concurrent.futures
import datetime
import json
import time

import anthropic
import httpx
import openai
import pytest

from tests.fixtures_images import GIF, PNG, image_server

MODEL = "llama3.2:1b"
HELLO = [{"role": "user", "content": "Hello there"}]
ROWS = "SELECT endpoint, status, http_status, prompt_tokens, completion_tokens, usage_source, reserved_prompt FROM requests"


def client(world, key: str, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=world.url, api_key=key, max_retries=0, **kw)


def post(world, body, key: str | None = None, path: str = "/v1/messages", **kw) -> httpx.Response:
    headers = {"x-api-key": key} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(world.url + path, content=body, headers=headers, timeout=30, **kw)
    return httpx.post(world.url + path, json=body, headers=headers, timeout=30, **kw)


def upstream_bodies(world) -> list[dict]:
    return [r["body"] for r in world.emu.requests if r["path"] == "/v1/messages"]


def wait_until(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.01)


def assert_envelope(r: httpx.Response, status: int, error_type: str) -> dict:
    assert r.status_code == status, r.text
    doc = r.json()
    assert doc["type"] == "error" and set(doc["error"]) == {"type", "message"}, doc
    assert doc["error"]["type"] == error_type and doc["error"]["message"], doc
    assert r.headers["request-id"] == r.headers["x-request-id"]
    return doc


# -- answers and billing ---------------------------------------------------------------------------------


def test_non_stream_is_billed_what_the_upstream_reported(make_world):
    # The emulator reports 7 more prompt tokens than it counts: the bill must follow its report, not
    # proxyd's estimate (which equals the emulator's own count for llama3.2, checked too).
    world = make_world(emulator={"prompt_token_skew": 7})
    key = world.new_user("alice")
    raw = client(world, key).messages.with_raw_response.create(
        model=MODEL, max_tokens=100, system=[{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}])
    msg = raw.parse()
    assert msg.type == "message" and msg.role == "assistant" and msg.stop_reason == "end_turn"
    assert msg.content[0].text.startswith("alpha beta")
    assert msg.id == "msg_" + raw.headers["x-request-id"][4:] and msg._request_id == raw.headers["x-request-id"]
    world.settle_all()
    [(endpoint, status, http, prompt, completion, source, reserved)] = world.rows(ROWS)
    assert (endpoint, status, http, source) == ("messages", "settled", 200, "reported")
    assert (prompt, completion) == (msg.usage.input_tokens, msg.usage.output_tokens) == (reserved + 7, 13)
    [sent] = upstream_bodies(world)
    assert sent["max_tokens"] == 100 and sent["system"][1]["text"] == "brief."


def test_stream_is_billed_the_final_usage_not_the_estimate_in_message_start(world):
    key = world.new_user("alice")
    with client(world, key).messages.stream(model=MODEL, max_tokens=5, messages=HELLO) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    # Ollama's message_start carries its len/4 guess (3 for "Hello there" + "user"), message_delta the count.
    assert events[0].message.usage.input_tokens == 3 and events[0].message.id == final.id
    assert final.stop_reason == "max_tokens" and final.content[0].text == "alpha beta gamma delta epsilon"
    world.settle_all()
    [(endpoint, status, http, prompt, completion, source, _)] = world.rows(ROWS)
    assert (endpoint, status, http, source) == ("messages", "settled", 200, "reported")
    assert (prompt, completion) == (final.usage.input_tokens, final.usage.output_tokens) == (27, 5)


def test_the_last_event_comes_after_the_ledger_row(world):
    """Durable before the last byte: message_stop is sent only once the request is settled."""
    key = world.new_user("alice")
    with httpx.stream("POST", world.url + "/v1/messages", headers={"x-api-key": key}, timeout=30,
                      json={"model": MODEL, "max_tokens": 20, "stream": True, "messages": HELLO}) as r:
        for line in r.iter_lines():
            if line == "event: message_stop":
                assert world.ctx.meter.limiter.pending == 0  # settled: nothing reserved any more
    world.settle_all()
    assert world.rows("SELECT status FROM requests") == [("settled",)]


def test_tools_and_tool_results_reach_the_upstream_and_are_counted(world):
    key = world.new_user("alice")
    tools = [{"name": "get_weather", "description": "Weather in a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 21C"}]},
    ]
    c = client(world, key)
    msg = c.messages.create(model=MODEL, max_tokens=50, tools=tools, messages=messages)
    without = c.messages.create(model=MODEL, max_tokens=50, messages=messages)
    assert msg.usage.input_tokens > without.usage.input_tokens  # the template wrote the tools
    world.settle_all()
    rows = world.rows("SELECT prompt_tokens, reserved_prompt FROM requests ORDER BY created_at")
    assert [r[0] for r in rows] == [msg.usage.input_tokens, without.usage.input_tokens]
    assert rows[0][1] > rows[1][1]  # the estimate counts the tools too
    assert upstream_bodies(world)[0]["tools"] == tools


def test_x_api_key_and_bearer_both_authenticate(world):
    key = world.new_user("alice")
    assert post(world, {"model": MODEL, "max_tokens": 5, "messages": HELLO}, key).status_code == 200
    # ANTHROPIC_AUTH_TOKEN (Claude Code): Authorization: Bearer
    msg = anthropic.Anthropic(base_url=world.url, auth_token=key, max_retries=0).messages.create(
        model=MODEL, max_tokens=5, messages=HELLO)
    assert msg.usage.output_tokens == 5
    world.settle_all()
    assert world.rows("SELECT COUNT(*) FROM requests WHERE status = 'settled'") == [(2,)]


# -- errors ----------------------------------------------------------------------------------------------


def test_auth_errors_are_anthropic_errors(world):
    key = world.new_user("alice")
    with pytest.raises(anthropic.AuthenticationError) as e:
        client(world, "sk-proxyd-wrong").messages.create(model=MODEL, max_tokens=5, messages=HELLO)
    assert e.value.body["error"]["type"] == "authentication_error"
    assert_envelope(post(world, {"model": MODEL, "max_tokens": 5, "messages": HELLO}), 401, "authentication_error")
    assert world.admin("PATCH", "/admin/users/alice", {"disabled": True}).status_code == 200
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        client(world, key).messages.create(model=MODEL, max_tokens=5, messages=HELLO)
    assert e.value.body["error"]["type"] == "permission_error"
    world.settle_all()
    assert world.rows("SELECT COUNT(*) FROM requests") == [(0,)]


def test_bad_input_gets_anthropic_4xx_and_nothing_reaches_the_ledger(make_world):
    world = make_world(config={"server.max_body_bytes": 20_000})
    key = world.new_user("alice")
    ok = {"model": MODEL, "max_tokens": 5, "messages": HELLO}
    cases = [
        b"{not json", b"[]", b"",
        {"model": MODEL, "messages": HELLO},  # no max_tokens: Anthropic requires it
        {**ok, "max_tokens": 0},
        {**ok, "max_tokens": "5"},
        {**ok, "MAX_TOKENS": 10_000},  # Go would read it as max_tokens: the budget would not hold
        {"max_tokens": 5, "messages": HELLO},
        {**ok, "model": "bad model name!"},
        {**ok, "messages": []},
        {**ok, "messages": [{"role": "system", "content": "x"}]},
        {**ok, "messages": [{"role": "user", "content": 5}]},
        {**ok, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
        {**ok, "messages": [{"role": "user", "content": [{"type": "text", "Text": "hidden"}]}]},
        {**ok, "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}]},
        {**ok, "messages": [{"role": "user", "content": [{"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": "not base64!"}}]}]},
        {**ok, "messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "f"}]}]},
        {**ok, "system": 5},
        {**ok, "tools": [{"name": "f", "input_schema": "object"}]},
        {**ok, "stream": "yes"},
        {**ok, "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]},
        {**ok, "temperature": "hot"},  # Ollama would refuse it after the reservation
        {**ok, "stop_sequences": [1]},
    ]
    for body in cases:
        r = post(world, body, key)
        assert_envelope(r, 400, "invalid_request_error")
    assert_envelope(post(world, {**ok, "messages": [{"role": "user", "content": "x" * 30_000}]}, key),
                    413, "request_too_large")
    r = httpx.get(world.url + "/v1/messages", headers={"x-api-key": key})
    assert_envelope(r, 405, "invalid_request_error")
    assert r.headers["allow"] == "POST"
    with pytest.raises(anthropic.BadRequestError):
        client(world, key).messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": 5}])
    assert_envelope(httpx.get(world.url + "/v1/messages/batches", headers={"x-api-key": key}), 404, "not_found_error")
    world.settle_all()
    assert world.rows("SELECT COUNT(*) FROM requests") == [(0,)]
    assert upstream_bodies(world) == []


def test_upstream_errors_keep_their_status_in_anthropic_envelopes(world):
    key = world.new_user("alice")
    c = client(world, key)
    with pytest.raises(anthropic.NotFoundError) as e:
        c.messages.create(model="nope:1b", max_tokens=5, messages=HELLO)
    assert e.value.body["error"] == {"type": "not_found_error", "message": "model 'nope:1b' not found"}
    world.emu.add_fault("busy503")
    with pytest.raises(anthropic.InternalServerError) as e:
        c.messages.create(model=MODEL, max_tokens=5, messages=HELLO)
    assert e.value.status_code == 503 and e.value.body["error"]["type"] == "overloaded_error"
    assert e.value.response.headers["retry-after"]
    world.settle_all()
    assert world.rows("SELECT status, http_status FROM requests ORDER BY created_at") == [("voided", 404), ("voided", 503)]


# -- limits ----------------------------------------------------------------------------------------------


def test_rate_limit_headers_on_answers(world):
    key = world.new_user("alice", limits={"requests_per_minute": 10, "tokens_per_minute": 5000})
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    raw = client(world, key).messages.with_raw_response.create(model=MODEL, max_tokens=50, messages=HELLO)
    h = raw.headers
    assert (h["anthropic-ratelimit-requests-limit"], h["anthropic-ratelimit-requests-remaining"]) == ("10", "9")
    world.settle_all()
    [(estimate,)] = world.rows("SELECT reserved_prompt FROM requests")
    reserved = estimate + 50  # prompt estimate plus max_tokens, as reserved when the answer's headers were written
    for name in ("tokens", "input-tokens", "output-tokens"):
        assert h[f"anthropic-ratelimit-{name}-limit"] == "5000"
        assert h[f"anthropic-ratelimit-{name}-remaining"] == str(5000 - reserved)
    reset = datetime.datetime.fromisoformat(h["anthropic-ratelimit-requests-reset"])
    assert before + datetime.timedelta(seconds=59) <= reset <= before + datetime.timedelta(seconds=62)
    assert not [name for name in h if name.startswith("x-ratelimit-")]  # OpenAI's headers are not Anthropic's


def test_a_limit_refusal_is_anthropic_rate_limit_error(world):
    key = world.new_user("alice", limits={"requests_per_minute": 1})
    c = client(world, key)
    c.messages.create(model=MODEL, max_tokens=5, messages=HELLO)
    with pytest.raises(anthropic.RateLimitError) as e:
        c.messages.create(model=MODEL, max_tokens=5, messages=HELLO)
    assert e.value.body["error"]["type"] == "rate_limit_error"
    h = e.value.response.headers
    assert int(h["retry-after"]) >= 1
    assert (h["anthropic-ratelimit-requests-limit"], h["anthropic-ratelimit-requests-remaining"]) == ("1", "0")
    datetime.datetime.fromisoformat(h["anthropic-ratelimit-requests-reset"])


def test_a_quota_refusal_tells_the_sdk_not_to_retry(world):
    key = world.new_user("bob", limits={"tokens_per_day": 60})
    retrying = anthropic.Anthropic(base_url=world.url, api_key=key, max_retries=3)
    with pytest.raises(anthropic.RateLimitError) as e:
        retrying.messages.create(model=MODEL, max_tokens=100, messages=HELLO)
    assert e.value.response.headers["x-should-retry"] == "false"
    assert e.value.response.headers["x-proxyd-limit"] == "tokens_per_day"
    world.settle_all()
    assert world.rows("SELECT COUNT(*) FROM requests") == [(0,)]


def test_a_model_limit_holds_when_dialects_are_mixed_20_way(make_world):
    world = make_world(emulator={"token_delay_s": 0.01})
    key = world.new_user("alice", limits={"models": {MODEL: {"requests_per_day": 10}}})
    oa, an = world.client(key), client(world, key)

    def chat(i: int) -> str:
        try:
            oa.chat.completions.create(model=MODEL, max_tokens=5, messages=HELLO)
            return "ok"
        except openai.RateLimitError:
            return "refused"

    def messages(i: int) -> str:
        try:
            an.messages.create(model=MODEL, max_tokens=5, messages=HELLO)
            return "ok"
        except anthropic.RateLimitError:
            return "refused"

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda i: (chat if i % 2 else messages)(i), range(20)))
    assert results.count("ok") == 10 and results.count("refused") == 10
    world.settle_all()
    rows = world.rows("SELECT endpoint, COUNT(*) FROM requests WHERE status = 'settled' GROUP BY endpoint")
    assert sum(n for _, n in rows) == 10 and {e for e, _ in rows} <= {"chat.completions", "messages"}
    usage = world.get("/v1/usage", key, group_by="endpoint").json()
    assert sorted((r["endpoint"], r["requests"]) for r in usage["data"]) == sorted(rows)


# -- count_tokens ----------------------------------------------------------------------------------------


def test_count_tokens_is_the_estimate_and_leaves_no_trace(world):
    key = world.new_user("alice", limits={"requests_per_minute": 1})
    body = {"model": MODEL, "system": "Be brief.", "messages": HELLO}
    c = client(world, key)
    counted = c.messages.count_tokens(**body)
    assert post(world, body, key, path="/v1/messages/count_tokens").json() == {"input_tokens": counted.input_tokens}
    world.settle_all()
    assert world.rows("SELECT COUNT(*) FROM requests") == [(0,)] and upstream_bodies(world) == []
    c.messages.create(max_tokens=5, **body)  # the one request a minute is still there: no limit touched
    world.settle_all()
    assert world.rows("SELECT reserved_prompt FROM requests") == [(counted.input_tokens,)]
    assert_envelope(post(world, body, "sk-proxyd-wrong", path="/v1/messages/count_tokens"), 401, "authentication_error")
    assert_envelope(post(world, {"model": MODEL}, key, path="/v1/messages/count_tokens"), 400, "invalid_request_error")


# -- images ----------------------------------------------------------------------------------------------


def test_base64_and_url_images_reach_ollama_as_base64(make_world):
    world = make_world(config={"images.allow_private_networks": True})
    cm = image_server()
    server = world.call(cm.__aenter__())
    try:
        key = world.new_user("alice")
        png = base64.b64encode(PNG).decode()
        gif = base64.b64encode(GIF).decode()
        msg = client(world, key).messages.create(model="moondream", max_tokens=20, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
            {"type": "image", "source": {"type": "base64", "media_type": "image/gif", "data": gif}},
            {"type": "image", "source": {"type": "url", "url": server.url("/png")}},
            {"type": "text", "text": "What are these?"}]}])
        assert msg.usage.input_tokens > 3 * 729  # the emulator charges 729 positions per image
        [sent] = upstream_bodies(world)
        sources = [b["source"] for b in sent["messages"][0]["content"][:3]]
        assert sources[0] == {"type": "base64", "media_type": "image/png", "data": png}  # unchanged
        assert sources[1]["media_type"] == "image/png" and sources[1]["data"] != gif  # GIF converted
        assert sources[2] == {"type": "base64", "media_type": "image/png", "data": png}  # fetched
        world.settle_all()
        [(reserved,)] = world.rows("SELECT reserved_prompt FROM requests")
        assert reserved >= 3 * 729
    finally:
        world.call(cm.__aexit__(None, None, None))


def test_a_private_image_url_is_refused_naming_the_block(world):
    key = world.new_user("alice")
    with pytest.raises(anthropic.BadRequestError) as e:
        client(world, key).messages.create(model="moondream", max_tokens=20, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is it?"},
            {"type": "image", "source": {"type": "url", "url": "http://169.254.169.254/latest/meta-data"}}]}])
    assert e.value.body["error"]["message"].startswith("image in messages.0.content.1: refusing to fetch")
    world.settle_all()
    assert world.rows("SELECT COUNT(*) FROM requests") == [(0,)]


# -- interrupted streams ---------------------------------------------------------------------------------


def test_an_upstream_cut_mid_stream_is_an_error_event_and_billed_for_what_was_relayed(world):
    key = world.new_user("alice")
    with pytest.raises(anthropic.APIStatusError) as e:
        with client(world, key).messages.stream(model=MODEL, max_tokens=100, messages=[
                {"role": "user", "content": "[[emu:fault=cut_after:3]] go"}]) as stream:
            for _ in stream:
                pass
    assert e.value.body["error"]["type"] == "api_error"
    world.settle_all()
    [(_, status, http, prompt, completion, source, reserved)] = world.rows(ROWS)
    assert (status, http, source, completion) == ("settled", 502, "counted", 3) and prompt == reserved
    assert world.ctx.meter.limiter.pending == 0


def test_an_upstream_without_usage_gets_the_billed_usage_in_message_delta(world):
    key = world.new_user("alice")
    with client(world, key).messages.stream(model=MODEL, max_tokens=100, messages=[
            {"role": "user", "content": "[[emu:fault=no_usage]] [[emu:reply_tokens=8]] go"}]) as stream:
        final = stream.get_final_message()
    world.settle_all()
    [(_, status, http, prompt, completion, source, reserved)] = world.rows(ROWS)
    assert (status, http, source) == ("settled", 200, "counted")
    assert (final.usage.input_tokens, final.usage.output_tokens) == (prompt, completion) == (reserved, 8)


def test_a_client_that_leaves_mid_stream_is_billed_for_what_was_relayed(make_world):
    world = make_world(emulator={"token_delay_s": 0.02})
    key = world.new_user("alice")
    with httpx.stream("POST", world.url + "/v1/messages", headers={"x-api-key": key}, timeout=30, json={
            "model": MODEL, "max_tokens": 1000, "stream": True,
            "messages": [{"role": "user", "content": "[[emu:reply_tokens=500]] go"}]}) as r:
        deltas = 0
        for line in r.iter_lines():
            deltas += line.startswith("event: content_block_delta")
            if deltas == 5:
                break
    wait_until(lambda: world.emu.cancelled_streams == 1 and world.ctx.meter.limiter.pending == 0)
    world.settle_all()
    [(_, status, http, prompt, completion, source, reserved)] = world.rows(ROWS)
    assert (status, http, source, prompt) == ("settled", 499, "counted", reserved)
    assert 5 <= completion < 500


def test_a_stream_error_event_is_anthropic_shaped(world):
    key = world.new_user("alice")
    with httpx.stream("POST", world.url + "/v1/messages", headers={"x-api-key": key}, timeout=30, json={
            "model": MODEL, "max_tokens": 100, "stream": True,
            "messages": [{"role": "user", "content": "[[emu:fault=cut_after:2]] go"}]}) as r:
        text = "".join(r.iter_text())
    last = text.strip().split("\n\n")[-1]
    event, data = last.split("\n")
    assert event == "event: error" and "message_stop" not in text
    assert json.loads(data[len("data: "):])["error"]["type"] == "api_error"


# -- the emulator's /v1/messages, as Ollama's source writes it ---------------------------------------------


def test_emulator_speaks_ollamas_messages_wire(world):
    url = world.upstream_url + "/v1/messages"
    r = httpx.post(url, json={"model": MODEL, "max_tokens": 3, "stream": True, "messages": HELLO})
    assert r.headers["content-type"] == "text/event-stream"
    blocks = r.text.strip().split("\n\n")
    names = [b.split("\n")[0][len("event: "):] for b in blocks]
    assert names == ["message_start", "content_block_start"] + ["content_block_delta"] * 3 + [
        "content_block_stop", "message_delta", "message_stop"]
    start = json.loads(blocks[0].split("\n")[1][len("data: "):])
    assert start["message"]["id"].startswith("msg_") and len(start["message"]["id"]) == 4 + 24
    assert start["message"]["usage"] == {"input_tokens": len("userHello there") // 4, "output_tokens": 0}
    delta = json.loads(blocks[-2].split("\n")[1][len("data: "):])
    assert delta == {"type": "message_delta", "delta": {"stop_reason": "max_tokens"},
                     "usage": {"input_tokens": 27, "output_tokens": 3}}
    # an empty reply: the first chunk is the last, so message_start has the real count and no block opens
    r = httpx.post(url, json={"model": MODEL, "max_tokens": 3, "stream": True,
                              "messages": [{"role": "user", "content": "[[emu:reply_tokens=0]] x"}]})
    names = [b.split("\n")[0] for b in r.text.strip().split("\n\n")]
    assert names == ["event: message_start", "event: message_delta", "event: message_stop"]
    # errors: gin's (validation, no newline) and the writer's (json.Encoder's newline), Anthropic's envelope
    r = httpx.post(url, json={"model": MODEL, "messages": HELLO})
    assert (r.status_code, r.headers["content-type"]) == (400, "application/json; charset=utf-8")
    assert r.json()["error"] == {"type": "invalid_request_error", "message": "max_tokens is required and must be positive"}
    assert r.json()["request_id"].startswith("req_") and not r.text.endswith("\n")
    r = httpx.post(url, json={"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "http://example.com/x.png"}}]}]})
    assert r.json()["error"]["message"] == "invalid image source type: url. Only base64 images are supported."
    r = httpx.post(url, json={"model": "nope", "max_tokens": 3, "messages": HELLO})
    assert (r.status_code, r.json()["error"]["type"]) == (404, "not_found_error") and r.text.endswith("\n")
    r = httpx.post(url + "/count_tokens", json={"model": MODEL, "messages": HELLO})
    assert (r.status_code, r.text) == (404, "404 page not found")  # Ollama has no such route


def test_revoking_the_key_ends_its_stream_with_an_authentication_error_event(make_world):
    world = make_world(emulator={"token_delay_s": 0.05})
    r = world.admin("POST", "/admin/users", {"user_id": "alice"})
    key, key_id = r.json()["api_key"], r.json()["key_id"]
    got = []
    with pytest.raises(anthropic.APIStatusError) as e:
        with client(world, key).messages.stream(model=MODEL, max_tokens=1000, messages=[
                {"role": "user", "content": "[[emu:reply_tokens=400]] a long story"}]) as stream:
            for text in stream.text_stream:
                got.append(text)
                if len(got) == 5:
                    assert world.admin("DELETE", f"/admin/keys/{key_id}").status_code == 204
    assert e.value.body["error"] == {"type": "authentication_error", "message": "This API key was revoked."}
    wait_until(lambda: world.emu.cancelled_streams == 1 and world.ctx.meter.limiter.pending == 0)
    world.settle_all()
    [(_, status, http, _, completion, source, _)] = world.rows(ROWS)
    assert (status, http, completion, source) == ("settled", 401, len(got), "counted")
