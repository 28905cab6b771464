"""Ollama's native API through proxyd (issue #14), driven by the official ``ollama`` Python client.

/api/chat, /api/generate, /api/embed and /api/embeddings are metered like chat completions: billed what
the emulated Ollama reported (the final ``done`` object's counts), or counted when it reports none; the
limits are the same limits; every error is ``{"error": ...}`` so ``ollama.ResponseError`` carries it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time

import httpx
import ollama
import openai
import pytest

from proxyd.ndjson import NDJSONParser
from tests.fixtures_images import GIF, PNG, make_noise_png

MODEL = "llama3.2:1b"
HI = [{"role": "user", "content": "hi"}]


def client(world, key: str, **kw) -> ollama.Client:
    return ollama.Client(host=world.url, headers={"Authorization": f"Bearer {key}"}, **kw)


def ledger(world) -> list[tuple]:
    world.settle_all()
    return world.rows("SELECT endpoint, status, http_status, prompt_tokens, completion_tokens, usage_source"
                      " FROM requests ORDER BY created_at")


def upstream_bodies(world, path: str) -> list[dict]:
    return [r["body"] for r in world.emu.requests if r["path"] == path]


def post(world, path: str, body, key: str | None = None, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(world.url + path, content=content, headers={**headers, "Content-Type": "application/json"},
                      timeout=30, **kw)


# -- metered, billed as reported -------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["once", "stream"])
def test_chat_is_billed_what_ollama_reported(world, stream):
    key = world.new_user("alice")
    c = client(world, key)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "[[emu:reply_tokens=7]] Hello there"}]
    if stream:
        parts = list(c.chat(model=MODEL, messages=messages, stream=True))
        final, text = parts[-1], "".join(p.message.content for p in parts)
        assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    else:
        final = c.chat(model=MODEL, messages=messages)
        text = final.message.content
    assert len(text.split()) == 7 and final.done_reason == "stop"
    assert final.eval_count == 8 and final.prompt_eval_count > 0  # 7 words and the counted EOS
    assert ledger(world) == [("api.chat", "settled", 200, final.prompt_eval_count, 8, "reported")]
    # The reserved budget went to Ollama as its cap; the stream flag is written out; nothing else changed.
    [sent] = upstream_bodies(world, "/api/chat")
    [(reserved,)] = world.rows("SELECT reserved_completion FROM requests")
    assert sent["options"] == {"num_predict": reserved} and sent["stream"] is stream
    assert sent["messages"] == messages


@pytest.mark.parametrize("stream", [False, True], ids=["once", "stream"])
def test_generate_is_billed_what_ollama_reported(world, stream):
    key = world.new_user("alice")
    c = client(world, key)
    kw = {"model": MODEL, "prompt": "[[emu:reply_tokens=5]] Why is the sky blue?", "system": "Answer in verse."}
    if stream:
        parts = list(c.generate(**kw, stream=True))
        final, text = parts[-1], "".join(p.response for p in parts)
    else:
        final = c.generate(**kw)
        text = final.response
    assert len(text.split()) == 5 and final.context  # not raw: the conversation's token ids come back
    assert ledger(world) == [("api.generate", "settled", 200, final.prompt_eval_count, 6, "reported")]


def test_generate_raw_suffix_and_template_are_estimated_as_ollama_renders_them(make_world):
    coder = "qwen2.5-coder:1.5b"
    world = make_world(emulator={"models": (MODEL, "moondream", "nomic-embed-text", coder), "insert_models": (coder,)})
    c = client(world, world.new_user("alice"))
    raw = c.generate(model=MODEL, prompt="<|begin_of_text|>plain text", raw=True)
    assert raw.context is None  # raw: no context
    fim = c.generate(model=coder, prompt="def add(a, b):", suffix="    return c")
    own = c.generate(model=MODEL, prompt="hello", template="Q: {{ .Prompt }} A:")
    world.settle_all()
    rows = world.rows("SELECT reserved_prompt, prompt_tokens FROM requests ORDER BY created_at")
    assert [p for _, p in rows] == [raw.prompt_eval_count, fim.prompt_eval_count, own.prompt_eval_count]
    # Estimates are upper bounds of what Ollama counted (the BOS a model adds: at most one token under).
    assert all(reserved >= billed - 1 for reserved, billed in rows), rows


def test_generate_raw_with_a_template_is_refused_before_anything_is_reserved(world):
    key = world.new_user("alice")
    with pytest.raises(ollama.ResponseError) as e:
        client(world, key).generate(model=MODEL, prompt="x", raw=True, system="s")
    assert e.value.status_code == 400 and "raw mode does not support" in e.value.error
    assert world.rows("SELECT COUNT(*) FROM requests") == [(0,)] and not upstream_bodies(world, "/api/generate")


def test_embed_and_the_older_embeddings(world):
    key = world.new_user("alice")
    c = client(world, key)
    inputs = ["the quick brown fox", "jumps over the lazy dog"]
    r = c.embed(model="nomic-embed-text", input=inputs)
    assert len(r.embeddings) == 2 and r.prompt_eval_count == sum(world.emu.tokens.count("nomic-embed-text", t) for t in inputs)
    old = c.embeddings(model="nomic-embed-text", prompt="the quick brown fox")
    assert len(old.embedding) == world.emu.options.embedding_dims
    # /api/embeddings reports no usage: proxyd counts the prompt (the emulator's own count agrees).
    assert ledger(world) == [
        ("api.embed", "settled", 200, r.prompt_eval_count, 0, "reported"),
        ("api.embeddings", "settled", 200, world.emu.tokens.count("nomic-embed-text", "the quick brown fox"), 0, "counted"),
    ]


def test_an_empty_request_only_loads_the_model_and_is_billed_nothing(world):
    key = world.new_user("alice")
    c = client(world, key)
    assert c.chat(model=MODEL, messages=[]).done_reason == "load"
    assert c.generate(model=MODEL, prompt="").done_reason == "load"
    assert [r[:5] for r in ledger(world)] == [("api.chat", "settled", 200, 0, 0), ("api.generate", "settled", 200, 0, 0)]


def test_num_predict_is_the_clients_cap_and_minus_one_asks_for_none(world):
    key = world.new_user("alice")
    c = client(world, key)
    r = c.chat(model=MODEL, messages=[{"role": "user", "content": "[[emu:reply_tokens=50]] go"}], options={"num_predict": 5})
    assert (r.done_reason, r.eval_count) == ("length", 5)
    resp = post(world, "/api/chat", {"model": MODEL, "stream": False, "messages": HI,
                                     "options": {"num_predict": -1, "temperature": 0}}, key)
    assert resp.status_code == 200 and resp.headers["x-proxyd-max-tokens-reason"] == "default"
    budget = int(resp.headers["x-proxyd-max-tokens"])
    sent = upstream_bodies(world, "/api/chat")
    assert sent[0]["options"] == {"num_predict": 5}
    assert sent[1]["options"] == {"num_predict": budget, "temperature": 0}
    world.settle_all()
    assert world.rows("SELECT reserved_completion FROM requests ORDER BY created_at") == [(5,), (budget,)]


def test_keep_alive_is_not_forwarded(world):
    """How long a model stays loaded is the operator's setting: keep_alive 0 would unload a model
    others are using."""
    key = world.new_user("alice")
    client(world, key).chat(model=MODEL, messages=HI, keep_alive=0)
    client(world, key).embed(model="nomic-embed-text", input="x", keep_alive="24h")
    assert all("keep_alive" not in b for b in upstream_bodies(world, "/api/chat") + upstream_bodies(world, "/api/embed"))


def test_the_final_object_is_sent_after_the_ledger_has_the_request(world):
    key = world.new_user("alice")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "[[emu:reply_tokens=4]] x"}]}  # stream by default
    with httpx.stream("POST", world.url + "/api/chat", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = []
        for line in r.iter_lines():
            doc = json.loads(line)
            lines.append(doc)
            if doc["done"]:
                # Read straight from the database, without waiting for the writer: already settled.
                assert world.rows("SELECT status, completion_tokens FROM requests") == [("settled", 5)]
    assert len(lines) == 5 and lines[-1]["eval_count"] == 5


# -- faults: billed for what was delivered, nothing left reserved --------------------------------------


def test_a_cut_stream_is_billed_for_what_was_relayed(world):
    key = world.new_user("alice")
    world.emu.add_fault("cut_after:4")
    got = []
    with pytest.raises(ollama.ResponseError) as e:  # the {"error"} line proxyd ends the stream with
        for part in client(world, key).chat(model=MODEL, messages=HI, stream=True):
            got.append(part.message.content)
    assert len(got) == 4 and "upstream" in e.value.error.lower()
    [(endpoint, status, http, prompt, completion, source)] = ledger(world)
    [(estimate,)] = world.rows("SELECT reserved_prompt FROM requests")
    assert (endpoint, status, http, prompt, completion, source) == ("api.chat", "settled", 502, estimate, 4, "counted")
    assert world.ctx.meter.limiter.pending == 0


@pytest.mark.parametrize("stream", [False, True], ids=["once", "stream"])
def test_an_upstream_without_usage_is_counted_and_the_client_sees_the_bill(world, stream):
    key = world.new_user("alice")
    prompt = "[[emu:fault=no_usage]] [[emu:reply_tokens=6]] tell me"
    if stream:
        final = list(client(world, key).generate(model=MODEL, prompt=prompt, stream=True))[-1]
    else:
        final = client(world, key).generate(model=MODEL, prompt=prompt)
    [(endpoint, status, http, billed_prompt, completion, source)] = ledger(world)
    [(estimate,)] = world.rows("SELECT reserved_prompt FROM requests")
    # The relayed text is counted (6 one-token words; the EOS Ollama would count never shows).
    assert (status, billed_prompt, completion, source) == ("settled", estimate, 6, "counted")
    if stream:  # the final object, sent after the settle, carries what was billed
        assert (final.prompt_eval_count, final.eval_count) == (estimate, 6)


def test_a_client_that_leaves_mid_stream_is_billed_for_what_was_relayed(make_world):
    world = make_world(emulator={"token_delay_s": 0.05})
    key = world.new_user("alice")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "[[emu:reply_tokens=200]] long"}]}
    with httpx.stream("POST", world.url + "/api/chat", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        for n, _ in enumerate(r.iter_lines(), 1):
            if n == 3:
                break
    deadline = time.time() + 5
    while time.time() < deadline and (world.emu.cancelled_streams == 0 or world.ctx.meter.limiter.pending):
        time.sleep(0.02)
    assert world.emu.cancelled_streams == 1  # Ollama was told to stop
    [(_, status, http, prompt, completion, _)] = ledger(world)
    [(estimate,)] = world.rows("SELECT reserved_prompt FROM requests")
    assert (status, http, prompt) == ("settled", 499, estimate) and 3 <= completion < 200


def test_upstream_errors_pass_in_the_native_shape_and_are_voided(world):
    key = world.new_user("alice")
    c = client(world, key)
    world.emu.add_fault("error500")
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(model=MODEL, messages=HI)
    assert e.value.status_code == 500 and "runner process has terminated" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        c.generate(model="nope:1b", prompt="hi")
    assert (e.value.status_code, e.value.error) == (404, "model 'nope:1b' not found")
    assert [r[:3] for r in ledger(world)] == [("api.chat", "voided", 500), ("api.generate", "voided", 404)]


def test_a_revoked_key_ends_its_stream_with_an_error_line_billed_for_what_was_relayed(make_world):
    world = make_world(emulator={"token_delay_s": 0.05})
    r = world.admin("POST", "/admin/users", {"user_id": "alice"})
    key, key_id = r.json()["api_key"], r.json()["key_id"]
    got = []
    with pytest.raises(ollama.ResponseError) as e:
        for part in client(world, key).generate(model=MODEL, prompt="[[emu:reply_tokens=200]] go", stream=True):
            got.append(part.response)
            if len(got) == 5:
                assert world.admin("DELETE", f"/admin/keys/{key_id}").status_code == 204
    assert e.value.error == "This API key was revoked."
    deadline = time.time() + 5
    while time.time() < deadline and world.ctx.meter.limiter.pending:
        time.sleep(0.02)
    [(_, status, http, _, completion, source)] = ledger(world)
    assert (status, http, completion, source) == ("settled", 401, len(got), "counted")


def test_relay_event_relays_lines_withholds_the_done_object_and_raises_on_an_error_line():
    from proxyd.endpoints.native import NativeChat
    from proxyd.errors import UpstreamError

    class Call:
        texts: list = []
        usage = last_event = None
        upstream_done = False

    call, chat = Call(), NativeChat()
    call.texts = []
    line = b'{"model":"m","message":{"role":"assistant","content":"Hi"},"done":false}'
    assert chat.relay_event(line, call) == line + b"\n" and call.texts == ["Hi"]
    done = b'{"model":"m","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","eval_count":3}'
    assert chat.relay_event(done, call) is None and call.upstream_done
    assert call.usage == {"prompt_tokens": 0, "completion_tokens": 3}  # omitempty: an absent count is 0
    assert json.loads(chat.stream_end(call, None))["eval_count"] == 3
    with pytest.raises(UpstreamError) as e:
        chat.relay_event(b'{"error":"an error was encountered while running the model: unexpected EOF"}', call)
    assert e.value.status == 502 and "unexpected EOF" in e.value.message


# -- images ------------------------------------------------------------------------------------------------


def test_images_are_checked_converted_and_counted(world):
    key = world.new_user("alice")
    c = client(world, key)
    r = c.chat(model="moondream", messages=[{"role": "user", "content": "What is this?", "images": [PNG]}])
    assert r.prompt_eval_count > world.emu.options.image_tokens
    g = c.generate(model="moondream", prompt="Describe", images=[base64.b64encode(GIF).decode()])
    assert g.done
    chat_image = upstream_bodies(world, "/api/chat")[0]["messages"][0]["images"][0]
    gen_image = upstream_bodies(world, "/api/generate")[0]["images"][0]
    assert base64.b64decode(chat_image) == PNG  # a format Ollama takes passes unchanged
    assert base64.b64decode(gen_image).startswith(b"\x89PNG")  # GIF became PNG
    world.settle_all()
    assert all(reserved > 729 for (reserved,) in world.rows("SELECT reserved_prompt FROM requests"))


def test_bad_and_oversized_images_are_refused_before_anything_is_reserved(make_world):
    world = make_world(config={"images.max_bytes": 20_000})
    key = world.new_user("alice")
    cases = [
        ({"images": ["not base64!"]}, 400, "messages[0].images[0]"),
        ({"images": [base64.b64encode(b"hello, not an image").decode()]}, 400, "not a valid image"),
        ({"images": [base64.b64encode(make_noise_png((200, 200))).decode()]}, 413, "larger than 20000 bytes"),
        ({"images": [123]}, 400, "base64 strings"),
    ]
    for extra, status, words in cases:
        r = post(world, "/api/chat", {"model": "moondream", "messages": [{"role": "user", "content": "x", **extra}]}, key)
        assert r.status_code == status and words in r.json()["error"], r.text
        assert list(r.json()) == ["error"]
    assert world.rows("SELECT COUNT(*) FROM requests") == [(0,)] and not upstream_bodies(world, "/api/chat")


# -- errors in the native shape -------------------------------------------------------------------------


BAD = [
    ("/api/chat", b"", 400, "empty"),
    ("/api/chat", b"{not json", 400, "not valid JSON"),
    ("/api/chat", [1], 400, "JSON object"),
    ("/api/chat", {"messages": HI}, 400, "model is required"),
    ("/api/chat", {"model": "bad name!", "messages": HI}, 400, "invalid model name"),
    ("/api/chat", {"model": MODEL, "messages": "hi"}, 400, "'messages' must be an array"),
    ("/api/chat", {"model": MODEL, "messages": [{"content": "x"}]}, 400, "role must be a string"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": ["x"]}]}, 400, "content must be a string"),
    ("/api/chat", {"model": MODEL, "messages": HI, "Options": {"num_predict": 99999}}, 400, "case-sensitive"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "Content": "x"}]}, 400, "case-sensitive"),
    ("/api/chat", {"model": MODEL, "messages": HI, "options": {"num_predict": "5"}}, 400, "num_predict"),
    ("/api/chat", {"model": MODEL, "messages": HI, "options": {"num_predict": 2**40}}, 400, "num_predict"),
    ("/api/chat", {"model": MODEL, "messages": HI, "options": []}, 400, "'options' must be an object"),
    ("/api/chat", {"model": MODEL, "messages": HI, "stream": "yes"}, 400, "'stream' must be a boolean"),
    ("/api/chat", {"model": MODEL, "messages": HI, "_debug_render_only": True}, 400, "_debug_render_only"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f",
                   "arguments": "{}"}}]}]}, 400, "tool_calls"),
    ("/api/generate", {"model": MODEL, "prompt": 5}, 400, "'prompt' must be a string"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "context": ["a"]}, 400, "'context'"),
    ("/api/embed", {"model": "nomic-embed-text", "input": [1, 2]}, 400, "'input'"),
    ("/api/embed", {"input": "x"}, 400, "model is required"),
    ("/api/embeddings", {"model": "nomic-embed-text", "prompt": ["x"]}, 400, "'prompt' must be a string"),
]


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_error_object_and_never_reaches_the_ledger(world, path, body, status, words):
    key = world.new_user("alice")
    r = post(world, path, body, key)
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"] and words in r.json()["error"], r.text
    assert world.rows("SELECT COUNT(*) FROM requests") == [(0,)]
    assert not [x for x in world.emu.requests if x["path"].startswith("/api/")]


def test_auth_method_size_and_unknown_paths_answer_in_the_native_shape(make_world):
    world = make_world(config={"server.max_body_bytes": 10_000})
    key = world.new_user("alice")
    with pytest.raises(ollama.ResponseError) as e:
        client(world, "sk-proxyd-wrong").chat(model=MODEL, messages=HI)
    assert e.value.status_code == 401 and "API key" in e.value.error
    for method, path, status in [("GET", "/api/chat", 405), ("GET", "/api/nothing", 404), ("POST", "/api/status", 404),
                                 ("DELETE", "/api/tags", 405)]:
        r = httpx.request(method, world.url + path, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == status and list(r.json()) == ["error"], (method, path, r.text)
    r = post(world, "/api/generate", {"model": MODEL, "prompt": "x" * 20_000}, key)
    assert r.status_code == 413 and list(r.json()) == ["error"]
    r = httpx.post(world.url + "/api/show", json={"model": MODEL})
    assert r.status_code == 401 and list(r.json()) == ["error"]


def test_model_management_is_refused(world):
    key = world.new_user("alice")
    c = client(world, key)
    for call in (lambda: c.pull(MODEL), lambda: c.push(MODEL), lambda: c.create("mine", from_=MODEL),
                 lambda: c.delete(MODEL), lambda: c.copy(MODEL, "mine"), lambda: c.create_blob(__file__)):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 403 and "managed by its operator" in e.value.error
    digest = "sha256:" + "0" * 64
    r = httpx.head(world.url + f"/api/blobs/{digest}", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 403
    assert not [x for x in world.emu.requests if x["path"].startswith("/api/")]


def test_the_model_routes_are_passed_through_unmetered(world):
    key = world.new_user("alice")
    c = client(world, key)
    assert [m.model for m in c.list().models] == ["llama3.2:1b", "moondream:latest", "nomic-embed-text:latest"]
    assert "vision" in c.show("moondream").capabilities
    assert c.ps().models == []
    with pytest.raises(ollama.ResponseError) as e:
        c.show("nope")
    assert (e.value.status_code, e.value.error) == (404, "model 'nope' not found")
    r = httpx.get(world.url + "/api/version", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200 and r.json()["version"]
    assert httpx.get(world.url + "/api/version").status_code == 401
    head = httpx.head(world.url + "/api/tags", headers={"Authorization": f"Bearer {key}"})
    assert head.status_code == 200 and head.content == b""
    assert world.rows("SELECT COUNT(*) FROM requests") == [(0,)]


# -- limits ---------------------------------------------------------------------------------------------------


def test_a_limit_refusal_is_a_429_response_error_with_retry_after(world):
    key = world.new_user("alice", limits={"requests_per_minute": 1})
    c = client(world, key)
    c.chat(model=MODEL, messages=HI)
    with pytest.raises(ollama.ResponseError) as e:
        c.generate(model=MODEL, prompt="hi")
    assert e.value.status_code == 429 and "limit" in e.value.error
    r = post(world, "/api/embed", {"model": "nomic-embed-text", "input": "x"}, key)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and list(r.json()) == ["error"]


def test_a_model_limit_holds_across_dialects_at_20_way_concurrency(world):
    limit = 1200
    key = world.new_user("alice", limits={"models": {MODEL: {"total_tokens": limit}}})
    content = "[[emu:reply_tokens=50]] Hi"  # every answer runs into its cap: it bills what it reserved

    async def run():
        native = ollama.AsyncClient(host=world.url, headers={"Authorization": f"Bearer {key}"})
        oa = world.async_client(key)
        sem = asyncio.Semaphore(20)
        outcomes = []

        async def one(i):
            async with sem:
                try:
                    if i % 3 == 0:
                        await native.chat(model=MODEL, messages=[{"role": "user", "content": content}],
                                          options={"num_predict": 20})
                    elif i % 3 == 1:
                        await native.generate(model=MODEL, prompt=content, options={"num_predict": 20}, stream=False)
                    else:
                        await oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                                         max_tokens=20)
                    outcomes.append((i % 3, "ok"))
                except ollama.ResponseError as e:
                    assert e.status_code == 429, e
                    outcomes.append((i % 3, "refused"))
                except openai.RateLimitError:
                    outcomes.append((i % 3, "refused"))

        await asyncio.gather(*[one(i) for i in range(90)])
        await oa.close()
        return outcomes

    outcomes = asyncio.run(run())
    world.settle_all()
    [(billed,)] = world.rows("SELECT SUM(prompt_tokens + completion_tokens) FROM requests WHERE status='settled'")
    assert billed <= limit
    assert {d for d, o in outcomes if o == "ok"} == {0, 1, 2}  # each dialect got some of it
    assert {d for d, o in outcomes if o == "refused"} == {0, 1, 2}  # and each was refused at the limit
    assert world.ctx.meter.limiter.pending == 0


def test_usage_groups_by_the_native_endpoints(world):
    key = world.new_user("alice")
    c = client(world, key)
    c.chat(model=MODEL, messages=HI)
    list(c.chat(model=MODEL, messages=HI, stream=True))
    c.generate(model=MODEL, prompt="hi")
    c.embed(model="nomic-embed-text", input="x")
    c.embeddings(model="nomic-embed-text", prompt="x")
    world.client(key).chat.completions.create(model=MODEL, messages=HI)
    world.settle_all()
    data = world.get("/v1/usage", key, group_by="endpoint").json()["data"]
    assert [(r["endpoint"], r["requests"]) for r in data] == [
        ("api.chat", 2), ("api.embed", 1), ("api.embeddings", 1), ("api.generate", 1), ("chat.completions", 1)]


# -- the emulator's native API, as Ollama's server/routes.go answers ---------------------------------------


def test_the_emulator_streams_ndjson_by_default_and_answers_errors_as_ollama(world):
    emu = world.upstream_url
    r = httpx.post(emu + "/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "[[emu:reply_tokens=2]] x"}]})
    assert r.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert [x["done"] for x in lines] == [False, False, True]
    # created_at as Go writes a time.Time: RFC 3339 in UTC, nanoseconds without trailing zeros
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d*[1-9])?Z", x["created_at"]) for x in lines)
    assert list(lines[-1])[:5] == ["model", "created_at", "message", "done", "done_reason"]
    assert lines[-1]["eval_count"] == 3 and lines[-1]["total_duration"] > 0
    once = httpx.post(emu + "/api/generate", json={"model": MODEL, "prompt": "[[emu:fault=no_usage]] x", "stream": False})
    assert once.headers["content-type"] == "application/json; charset=utf-8"
    assert "eval_count" not in once.json() and "prompt_eval_count" not in once.json() and once.json()["context"]
    for path, body, status, error in [
        ("/api/chat", b"", 400, "missing request body"),
        ("/api/chat", {"messages": []}, 400, "model is required"),
        ("/api/chat", {"model": "nope", "messages": []}, 404, "model 'nope' not found"),
        ("/api/generate", {"model": ""}, 404, "model '' not found"),
        ("/api/generate", {"model": MODEL, "prompt": "x", "raw": True, "system": "s"}, 400,
         "raw mode does not support template, system, or context"),
        ("/api/embed", {"model": "nope", "input": "x"}, 404, 'model "nope" not found, try pulling it first'),
        ("/api/embed", {"model": "nomic-embed-text", "input": [1]}, 400, "invalid input type"),
        ("/api/embeddings", {"prompt": "x"}, 400, "model is required"),
    ]:
        r = httpx.post(emu + path, content=body if isinstance(body, bytes) else json.dumps(body))
        assert (r.status_code, r.json()) == (status, {"error": error}), (path, body, r.text)


# -- the NDJSON parser ----------------------------------------------------------------------------------------


def test_ndjson_lines_split_anywhere_come_out_whole():
    lines = [b'{"a":1}', b'{"b":{"c":[1,2]}}', b'{"done":true}']
    data = b"\n".join(lines) + b"\n"
    for cut in range(1, len(data)):
        p = NDJSONParser()
        assert p.feed(data[:cut]) + p.feed(data[cut:]) == lines, cut
        assert p.tail() == b""


def test_ndjson_crlf_blank_lines_and_an_object_without_a_newline():
    p = NDJSONParser()
    assert p.feed(b'{"a":1}\r\n\n  \n{"b":') == [b'{"a":1}']
    assert p.tail() == b'{"b":'
    assert p.feed(b'2}') == [b'{"b":2}']  # gin's c.JSON answer: one object, no newline
    assert p.tail() == b""
