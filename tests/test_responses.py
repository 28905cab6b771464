"""OpenAI's Responses API through proxyd (issue #14): the real ``openai`` SDK's ``client.responses.create``
against the emulator's /v1/responses (built from Ollama's openai/responses.go)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest

from tests.fixtures_images import PNG, data_url, image_server
from tests.harness import Harness

MODEL = "llama3.2:1b"


def upstream_bodies(world, path: str = "/v1/responses") -> list[dict]:
    return [r["body"] for r in world.emu.requests if r["path"] == path]


def ledger(world) -> list[tuple]:
    world.settle_all()
    return world.rows("SELECT endpoint, status, http_status, prompt_tokens, completion_tokens, usage_source "
                      "FROM requests ORDER BY rowid")


def no_pending(world) -> None:
    world.settle_all()
    assert world.ctx.meter.limiter.pending == 0
    assert all(b.reserved == [0, 0, 0] for b in world.ctx.meter.limiter.buckets.values())


# -- answers and billing ------------------------------------------------------------------------------------


def test_non_stream_bills_the_reported_usage_under_proxyds_own_id(world):
    key = world.new_user("alice")
    reported = []
    for v1 in (True, False):  # /v1/responses and /responses
        raw = world.client(key, v1=v1).responses.with_raw_response.create(
            model=MODEL, input="What is 2+2?", instructions="Answer briefly.")
        r = raw.parse()
        assert r.output_text == " ".join(["alpha", "beta", "gamma", "delta", "epsilon", "eta", "theta", "lambda",
                                          "mu", "nu", "xi", "pi"])
        assert r.status == "completed" and r.store is False
        assert r.id == "resp_" + raw.headers["x-request-id"][4:]  # proxyd's own id, not Ollama's resp_<0..999999>
        assert r.usage.output_tokens == 13  # 12 words + Ollama's counted EOS
        reported.append(("responses", "settled", 200, r.usage.input_tokens, r.usage.output_tokens, "reported"))
    assert ledger(world) == reported
    # Estimated as Ollama renders the chat request it builds (instructions = a system message): exact here.
    assert world.rows("SELECT reserved_prompt FROM requests") == [(reported[0][3],)] * 2
    by_endpoint = world.get("/v1/usage", key, group_by="endpoint").json()["data"]
    assert [(e["endpoint"], e["requests"]) for e in by_endpoint] == [("responses", 2)]


def test_stream_bills_the_usage_of_its_terminal_event_settled_before_it_is_sent(world):
    key = world.new_user("alice")
    events, seen_when_completed = [], None
    stream = world.client(key).responses.create(
        model=MODEL, input=[{"role": "user", "content": [{"type": "input_text", "text": "[[emu:reply_tokens=5]] go"}]}],
        stream=True)
    for ev in stream:
        events.append(ev)
        if ev.type == "response.completed":
            # Durable before the last byte: the row is settled by the time the client has the usage.
            seen_when_completed = world.rows("SELECT status, prompt_tokens, completion_tokens FROM requests")
    types = [e.type for e in events]
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added"] + ["response.output_text.delta"] * 5 + [
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = events[-1].response
    assert done.id == events[0].response.id and done.id.startswith("resp_") and len(done.id) > 20
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == done.output_text
    assert seen_when_completed == [("settled", done.usage.input_tokens, done.usage.output_tokens)]
    assert ledger(world) == [("responses", "settled", 200, done.usage.input_tokens, 6, "reported")]


def test_the_budget_is_forwarded_as_max_output_tokens(world):
    key = world.new_user("alice")
    client = world.client(key)
    r = client.responses.create(model=MODEL, input="[[emu:reply_tokens=50]] go", max_output_tokens=5)
    assert r.usage.output_tokens == 5 and len(r.output_text.split()) == 5
    raw = client.responses.with_raw_response.create(model=MODEL, input="hi")  # no cap: proxyd's default
    bodies = upstream_bodies(world)
    assert bodies[0]["max_output_tokens"] == 5
    assert bodies[1]["max_output_tokens"] == int(raw.headers["x-proxyd-max-tokens"])
    assert raw.headers["x-proxyd-max-tokens-reason"] == "default"
    world.settle_all()
    assert world.rows("SELECT reserved_completion FROM requests") == [(5,), (bodies[1]["max_output_tokens"],)]


def test_items_tools_and_function_calls(world):
    """A conversation as item list: developer and user messages, a function call with its output, a
    reasoning item, tools (a namespace too). Ollama builds chat messages from them; proxyd estimates that
    chat request and bills what the emulator reports."""
    key = world.new_user("alice")
    weather = {"type": "function", "name": "get_weather", "description": "Weather of a city", "strict": True,
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    r = world.client(key).responses.create(
        model=MODEL,
        instructions="You are terse.",
        tools=[weather, {"type": "namespace", "name": "maps", "description": "maps",
                         "tools": [{**weather, "name": "distance"}]}],
        input=[
            {"type": "message", "role": "developer", "content": "Use tools."},
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "I should call the tool."},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sunny."}]},
            {"role": "user", "content": [{"type": "input_text", "text": "And "}, {"type": "input_text", "text": "Rome?"}]},
        ],
    )
    assert r.output_text
    [(prompt, completion, reserved)] = world.rows("SELECT prompt_tokens, completion_tokens, reserved_prompt FROM requests")
    assert (prompt, completion) == (r.usage.input_tokens, r.usage.output_tokens)
    assert reserved >= prompt  # the estimate covers the prompt Ollama rendered (tools and tool calls included)
    assert upstream_bodies(world)[0]["tools"][1]["tools"][0]["name"] == "distance"  # forwarded as sent


def test_store_true_is_answered_with_store_false(world):
    key = world.new_user("alice")
    r = world.client(key).responses.create(model=MODEL, input="hi", store=True, reasoning={"effort": ""})
    assert r.store is False  # Ollama keeps nothing: the response says so rather than pretend
    s = list(world.client(key).responses.create(model=MODEL, input="hi", store=True, stream=True))
    assert s[0].response.store is False and s[-1].response.store is False


# -- refusals and bad input -----------------------------------------------------------------------------------


def test_previous_response_id_is_a_clear_400(world):
    key = world.new_user("alice")
    with pytest.raises(openai.BadRequestError) as e:
        world.client(key).responses.create(model=MODEL, input="and then?", previous_response_id="resp_123")
    assert "Ollama keeps no responses" in e.value.message and e.value.body["param"] == "previous_response_id"
    assert ledger(world) == [] and upstream_bodies(world) == []


BAD = [
    {"input": "hi"},  # no model
    {"model": MODEL},  # no input
    {"model": MODEL, "input": ""},
    {"model": MODEL, "input": []},
    {"model": MODEL, "input": 5},
    {"model": MODEL, "input": "hi", "instructions": ["a"]},
    {"model": MODEL, "input": "hi", "temperature": "hot"},
    {"model": MODEL, "input": "hi", "reasoning": "high"},
    {"model": MODEL, "input": "hi", "reasoning": {"effort": "extreme"}},
    {"model": MODEL, "input": "hi", "store": "yes"},
    {"model": MODEL, "input": "hi", "max_output_tokens": 0},
    {"model": MODEL, "input": "hi", "max_output_tokens": "10"},
    {"model": MODEL, "input": "hi", "stream": "yes"},
    {"model": MODEL, "input": "hi", "MAX_OUTPUT_TOKENS": 10},  # Ollama (Go) would read it; proxyd would not
    {"model": MODEL, "input": "hi", "conversation": "conv_1"},
    {"model": MODEL, "input": "hi", "background": True},
    {"model": MODEL, "input": [{"type": "video", "url": "x"}]},
    {"model": MODEL, "input": [{"content": "no role, no type"}]},
    {"model": MODEL, "input": ["hi"]},
    {"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
    {"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]},
    {"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_text", "TEXT": "x", "text": ""}]}]},
    {"model": MODEL, "input": [{"role": "user", "content": 5}]},
    {"model": MODEL, "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{not json"}]},
    {"model": MODEL, "input": [{"type": "function_call_output", "call_id": "c", "output": 5}]},
    {"model": MODEL, "input": "hi", "tools": [{"type": "web_search"}]},
    {"model": MODEL, "input": "hi", "tools": {"type": "function"}},
    {"model": MODEL, "input": "hi", "tools": [{"type": "function", "name": "f", "parameters": "x"}]},
]


def test_bad_input_gets_openais_400_envelope_and_writes_nothing(world):
    key = world.new_user("alice")
    for body in BAD:
        r = httpx.post(world.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
    for raw in (b"{not json", b"[]", b""):
        r = httpx.post(world.url + "/v1/responses", content=raw, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 400 and "error" in r.json(), raw
    assert ledger(world) == [] and upstream_bodies(world) == []


def test_upstream_errors_reach_the_client_in_openais_envelope(world):
    key = world.new_user("alice")
    with pytest.raises(openai.NotFoundError) as e:
        world.client(key).responses.create(model="nosuchmodel", input="hi")
    assert "not found" in e.value.message
    world.emu.add_fault("error500")
    with pytest.raises(openai.InternalServerError):
        world.client(key).responses.create(model=MODEL, input="hi")
    assert [row[:3] for row in ledger(world)] == [("responses", "voided", 404), ("responses", "voided", 500)]
    no_pending(world)


def test_limit_refusals_are_openais_429s_with_the_quota_vs_rate_split(world):
    minute = world.client(world.new_user("bob", limits={"requests_per_minute": 1}))
    minute.responses.create(model=MODEL, input="hi")
    with pytest.raises(openai.RateLimitError) as e:
        minute.responses.create(model=MODEL, input="hi", stream=True)
    assert e.value.body["code"] == "rate_limit_exceeded" and int(e.value.response.headers["retry-after"]) > 0
    day = world.client(world.new_user("carol", limits={"requests_per_day": 1}))
    day.responses.create(model=MODEL, input="hi")
    with pytest.raises(openai.RateLimitError) as e:
        day.responses.create(model=MODEL, input="hi")
    assert e.value.body["code"] == "insufficient_quota" and e.value.response.headers["x-should-retry"] == "false"
    assert [r[:2] for r in ledger(world)] == [("responses", "settled")] * 2


def test_a_per_model_limit_is_shared_with_chat_completions(make_world):
    world = make_world(config={"limits": {"models": {MODEL: {"requests_per_day": 3}}}})
    client = world.client(world.new_user("alice"))
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    client.responses.create(model=MODEL, input="hi")
    client.responses.create(model=MODEL, input="hi", stream=True).close()
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert f"for model {MODEL}" in e.value.message
    with pytest.raises(openai.RateLimitError):
        client.responses.create(model=MODEL, input="hi")
    client.responses.create(model="moondream", input="hi")  # another model is not limited


def test_a_token_limit_holds_across_dialects_at_20_way_concurrency(make_world):
    limit = 1000
    world = make_world(config={"limits": {"models": {MODEL: {"total_tokens": limit}}}},
                       emulator={"token_delay_s": 0.002})
    key = world.new_user("alice")

    async def one(client, i):
        text = "[[emu:reply_tokens=30]] tell me"
        try:
            if i % 4 == 0:
                await client.chat.completions.create(model=MODEL, max_tokens=40,
                                                     messages=[{"role": "user", "content": text}])
            elif i % 4 == 1:
                stream = await client.chat.completions.create(model=MODEL, max_tokens=40, stream=True,
                                                              messages=[{"role": "user", "content": text}])
                async for _ in stream:
                    pass
            elif i % 4 == 2:
                await client.responses.create(model=MODEL, input=text, max_output_tokens=40)
            else:
                stream = await client.responses.create(model=MODEL, input=text, max_output_tokens=40, stream=True)
                async for _ in stream:
                    pass
            return "ok"
        except openai.RateLimitError:
            return "refused"

    async def run():
        client = world.async_client(key)
        out = await asyncio.gather(*[one(client, i) for i in range(40)])
        await client.close()
        return out

    results = asyncio.run(run())
    rows = ledger(world)
    used = sum(p + c for _, status, _, p, c, _ in rows if status == "settled")
    assert used <= limit, (used, rows)
    assert "refused" in results and results.count("ok") == len(rows)
    assert {r[0] for r in rows} == {"chat.completions", "responses"}
    no_pending(world)


# -- images ----------------------------------------------------------------------------------------------------


def image_input(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "input_image", "image_url": url, "detail": "auto"},
                                         {"type": "input_text", "text": "What is in this image?"}]}]


def test_image_by_data_url(world):
    key = world.new_user("alice")
    r = world.client(key).responses.create(model="moondream", input=image_input(data_url(PNG)))
    assert r.usage.input_tokens > 729  # the emulator charges 729 positions per image, like moondream
    assert upstream_bodies(world)[0]["input"][0]["content"][0]["image_url"] == data_url(PNG)
    [(reserved, prompt)] = world.rows("SELECT reserved_prompt, prompt_tokens FROM requests")
    assert reserved >= 729 and prompt == r.usage.input_tokens


def test_image_by_http_url_arrives_as_a_data_url(make_world):
    world = make_world(config={"images.allow_private_networks": True})
    cm = image_server()
    server = world.call(cm.__aenter__())
    try:
        key = world.new_user("alice")
        r = world.client(key).responses.create(model="moondream", input=image_input(server.url("/redirect/png")))
        assert r.usage.input_tokens > 729
        sent = upstream_bodies(world)[0]["input"][0]["content"][0]["image_url"]
        assert sent.startswith("data:image/png;base64,")
    finally:
        world.call(cm.__aexit__(None, None, None))


def test_a_refused_image_url_is_a_400_naming_the_input_part(world):
    key = world.new_user("alice")
    with pytest.raises(openai.BadRequestError) as e:
        world.client(key).responses.create(model="moondream", input=image_input("http://169.254.169.254/latest"))
    assert "input[0].content[0]" in e.value.message and "messages[" not in e.value.message, e.value.message
    assert e.value.body["param"].startswith("input[0].content[0]"), e.value.body
    assert ledger(world) == [] and upstream_bodies(world) == []


# -- disconnects, cuts and missing usage, as for chat -------------------------------------------------------


def test_a_cut_stream_is_billed_for_what_was_relayed(world):
    key = world.new_user("alice")
    world.emu.add_fault("cut_after:4")
    deltas = []
    with pytest.raises(openai.APIError) as e:
        for ev in world.client(key).responses.create(model=MODEL, input="hi", stream=True):
            if ev.type == "response.output_text.delta":
                deltas.append(ev.delta)
    assert len(deltas) == 4 and "upstream" in e.value.message.lower()
    [(endpoint, status, http, prompt, completion, source)] = ledger(world)
    [(reserved,)] = world.rows("SELECT reserved_prompt FROM requests")
    assert (endpoint, status, http, prompt, completion, source) == ("responses", "settled", 502, reserved, 4, "counted")
    no_pending(world)


def test_a_cut_before_the_answer_is_voided(world):
    key = world.new_user("alice")
    world.emu.add_fault("cut_after:0")
    with pytest.raises(openai.APIStatusError) as e:
        world.client(key).responses.create(model=MODEL, input="hi")
    assert e.value.status_code == 502
    assert [r[:3] for r in ledger(world)] == [("responses", "voided", 502)]
    no_pending(world)


@pytest.mark.parametrize("how", ["fault", "option"])
def test_an_upstream_that_reports_no_usage_is_billed_by_count_and_the_client_still_gets_usage(make_world, how):
    world = make_world(emulator={"send_usage": how != "option"})
    key = world.new_user("alice")
    text = "[[emu:fault=no_usage]] hi" if how == "fault" else "hi"
    events = list(world.client(key).responses.create(model=MODEL, input=text, stream=True))
    assert events[-1].type == "response.completed"
    usage = events[-1].response.usage  # what proxyd billed: OpenAI always reports usage
    [(_, status, _, prompt, completion, source)] = ledger(world)
    [(reserved,)] = world.rows("SELECT reserved_prompt FROM requests")
    assert (status, source, prompt, completion) == ("settled", "counted", reserved, 12)  # 12 one-token words
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (prompt, completion, prompt + completion)
    r = world.client(key).responses.create(model=MODEL, input=text)  # not streamed: counted too
    assert r.usage is None
    assert ledger(world)[1][3:] == (reserved, 12, "counted")


def test_a_client_disconnect_is_billed_for_what_was_relayed_and_stops_the_upstream(make_world):
    world = make_world(emulator={"token_delay_s": 0.05})
    key = world.new_user("alice")
    body = {"model": MODEL, "stream": True, "input": "[[emu:reply_tokens=200]] long"}
    with httpx.stream("POST", world.url + "/v1/responses", json=body,
                      headers={"Authorization": f"Bearer {key}"}) as r:
        deltas = 0
        for line in r.iter_lines():
            deltas += line == "event: response.output_text.delta"
            if deltas == 3:
                break
    deadline = time.time() + 5
    while time.time() < deadline and (world.emu.cancelled_streams == 0 or world.ctx.meter.limiter.pending):
        time.sleep(0.02)
    assert world.emu.cancelled_streams == 1  # Ollama was told to stop generating
    [(endpoint, status, http, prompt, completion, _)] = ledger(world)
    [(reserved,)] = world.rows("SELECT reserved_prompt FROM requests")
    assert (endpoint, status, http, prompt) == ("responses", "settled", 499, reserved)
    assert 3 <= completion < 200
    no_pending(world)


def test_mixed_faults_leak_no_reservation(make_world):
    world = make_world(emulator={"token_delay_s": 0.002})
    key = world.new_user("alice")
    faults = ["error500", "busy503", "cut_after:2", "no_usage", "bad_json", "stall_after:1", None]

    async def one(client, i):
        fault = faults[i % len(faults)]
        text = f"[[emu:fault={fault}]] hi" if fault else "hi"
        try:
            if i % 2:
                async for _ in await client.responses.create(model=MODEL, input=text, stream=True):
                    pass
            else:
                await client.responses.create(model=MODEL, input=text)
        except (openai.APIError, httpx.HTTPError):
            pass

    async def run():
        client = world.async_client(key, timeout=2)
        await asyncio.gather(*[one(client, i) for i in range(28)])
        await client.close()

    asyncio.run(run())
    deadline = time.time() + 10
    while time.time() < deadline and world.ctx.meter.limiter.pending:
        time.sleep(0.02)
    no_pending(world)
    assert all(v == 0 for v in world.ctx.meter.limiter.concurrent.values())


# -- the emulator's wire (Ollama's openai/responses.go) -----------------------------------------------------


def test_the_emulator_speaks_ollamas_responses_wire(world):
    url = world.upstream_url + "/v1/responses"
    r = httpx.post(url, json={"model": MODEL, "input": "hi", "max_output_tokens": 3})
    doc = r.json()
    assert r.headers["content-type"] == "application/json" and r.content.endswith(b"}\n")
    assert list(doc)[:10] == ["id", "object", "created_at", "completed_at", "status", "incomplete_details", "model",
                              "previous_response_id", "instructions", "output"]  # ToResponse's struct order
    assert doc["id"].startswith("resp_") and doc["output"][0]["id"].startswith("msg_")
    assert doc["status"] == "completed" and doc["store"] is False and doc["max_output_tokens"] == 3
    assert doc["usage"] == {"input_tokens": doc["usage"]["input_tokens"], "output_tokens": 3,
                            "total_tokens": doc["usage"]["input_tokens"] + 3,
                            "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}

    with httpx.stream("POST", url, json={"model": MODEL, "input": "[[emu:reply_tokens=2]] hi", "stream": True}) as s:
        raw = s.read().decode()
    assert s.headers["content-type"] == "text/event-stream" and "[DONE]" not in raw
    blocks = [b for b in raw.split("\n\n") if b]
    for n, block in enumerate(blocks):
        event, data = block.split("\n")
        doc = json.loads(data[len("data: "):])
        assert event == "event: " + doc["type"] and doc["sequence_number"] == n
        assert list(doc) == sorted(doc)  # a Go map: keys sorted
    assert json.loads(blocks[-1].split("data: ")[1])["response"]["usage"]["output_tokens"] == 3

    r = httpx.post(url, json={"model": "nosuchmodel", "input": "hi"})
    assert r.status_code == 404 and r.json() == {"error": {"message": "model 'nosuchmodel' not found",
                                                           "type": "not_found_error", "param": None, "code": None}}
    r = httpx.post(url, json={"model": MODEL, "input": [{"type": "video"}]})
    assert r.status_code == 400 and r.json()["error"]["message"] == 'input[0]: unknown input item type: "video"'
    r = httpx.post(url, json={"model": "moondream", "input": image_input("http://example.com/x.png")})
    assert r.status_code == 400 and "image URLs are not currently supported" in r.json()["error"]["message"]


# -- upstreams other than Ollama: other terminal events, a [DONE] line, an error event --------------------


def _event(kind: str, **data) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


def _response(status: str, usage: dict | None = None) -> dict:
    return {"id": "resp_1", "object": "response", "status": status, "model": MODEL, "output": [], "usage": usage}


STUB_STREAMS = {
    "incomplete": _event("response.created", sequence_number=0, response=_response("in_progress"))
    + _event("response.output_text.delta", sequence_number=1, item_id="m", output_index=0, content_index=0, delta="alpha")
    + _event("response.incomplete", sequence_number=2,
             response=_response("incomplete", {"input_tokens": 7, "output_tokens": 1, "total_tokens": 8})),
    "done_line": _event("response.created", sequence_number=0, response=_response("in_progress"))
    + _event("response.output_text.delta", sequence_number=1, item_id="m", output_index=0, content_index=0, delta="alpha")
    + _event("response.output_text.delta", sequence_number=2, item_id="m", output_index=0, content_index=0, delta=" beta")
    + b"data: [DONE]\n\n",
    "error": _event("response.created", sequence_number=0, response=_response("in_progress"))
    + _event("response.output_text.delta", sequence_number=1, item_id="m", output_index=0, content_index=0, delta="alpha")
    + b"\0"  # written apart: the client has the text before the error comes
    + _event("error", sequence_number=2, code="server_error", message="the runner died"),
}


class _StubUpstream(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        data = STUB_STREAMS[body["input"]]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(data) - data.count(b"\0")))
        self.end_headers()
        for i, part in enumerate(data.split(b"\0")):
            if i:
                time.sleep(0.2)
            self.wfile.write(part)
            self.wfile.flush()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stub_world(tmp_path):
    stub = ThreadingHTTPServer(("127.0.0.1", 0), _StubUpstream)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    world = Harness(str(tmp_path / "p.db"), upstream_url=f"http://127.0.0.1:{stub.server_address[1]}").start()
    yield world
    world.close()
    stub.shutdown()


def test_other_terminal_events_and_a_done_line_end_the_stream(stub_world):
    world = stub_world
    client = world.client(world.new_user("alice"))
    events = list(client.responses.create(model=MODEL, input="incomplete", stream=True))
    assert [e.type for e in events] == ["response.created", "response.output_text.delta", "response.incomplete"]
    assert events[-1].response.id == events[0].response.id != "resp_1"  # proxyd's id on both
    assert (events[-1].response.usage.input_tokens, events[-1].response.usage.output_tokens) == (7, 1)
    # A stream that ends with [DONE] and no terminal event still gets one, with the usage proxyd billed.
    events = list(client.responses.create(model=MODEL, input="done_line", stream=True))
    assert [e.type for e in events][-1] == "response.completed"
    [_, (_, status, http, prompt, completion, source)] = ledger(world)
    [_, (reserved,)] = world.rows("SELECT reserved_prompt FROM requests ORDER BY rowid")
    assert (status, http, prompt, completion, source) == ("settled", 200, reserved, 2, "counted")
    assert (events[-1].response.usage.input_tokens, events[-1].response.usage.output_tokens) == (prompt, 2)
    assert ledger(world)[0][1:] == ("settled", 200, 7, 1, "reported")


def test_an_error_event_ends_the_stream_as_an_error_and_bills_what_was_relayed(stub_world):
    world = stub_world
    with pytest.raises(openai.APIError) as e:
        list(world.client(world.new_user("alice")).responses.create(model=MODEL, input="error", stream=True))
    assert "the runner died" in e.value.message
    [(_, status, http, _, completion, source)] = ledger(world)
    assert (status, http, completion, source) == ("settled", 502, 1, "counted")
    no_pending(world)
