"""The OpenAI-compatible surface, end to end: openai SDK -> proxyd -> Ollama emulator (issue #2)."""

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest

from tests.harness import Harness

MSG = [{"role": "user", "content": "Hi"}]


def test_chat_with_and_without_v1(world):
    key = world.new_user("alice")
    for v1 in (True, False):
        r = world.client(key, v1=v1).chat.completions.create(
            model="llama3.2:1b",
            messages=[{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": "What is 2+2?"}],
            temperature=0.7, max_tokens=100,
        )
        assert r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
        assert r.id.startswith("chatcmpl-") and len(r.id) > 20  # proxyd's own unique id, not Ollama's 0..998


def test_request_id_header_is_unique_and_in_time_order(world):
    key = world.new_user("alice")
    ids = []
    for _ in range(5):
        raw = world.client(key).chat.completions.with_raw_response.create(model="llama3.2:1b", messages=MSG)
        ids.append(raw.headers["x-request-id"])
        assert raw.parse().id.endswith(raw.headers["x-request-id"][4:])
        time.sleep(0.002)  # ids order by the millisecond; within one they are random
    assert len(set(ids)) == 5
    # Time first, so the ledger's primary key grows at its end (load/ledger_bench.py: cheaper inserts).
    assert ids == sorted(ids)  # random ids: 1 chance in 120
    world.settle_all()
    assert [r[0] for r in world.rows("SELECT id FROM requests ORDER BY rowid")] == ids


def test_stream_arrives_chunk_by_chunk(make_world):
    world = make_world(emulator={"token_delay_s": 0.05})
    key = world.new_user("alice")
    upstream_done, texts = [], []
    stream = world.client(key).chat.completions.create(
        model="llama3.2:1b", messages=[{"role": "user", "content": "[[emu:reply_tokens=8]] go"}], stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            texts.append(chunk.choices[0].delta.content)
            upstream_done.append(world.emu.completed)  # had Ollama sent its whole stream by now?
    assert len(texts) == 8
    # Relayed as they come: the first token (of 8, 50 ms apart) reached the client while Ollama was
    # still generating, not in one burst at the end.
    assert upstream_done[0] == 0, upstream_done


@pytest.mark.parametrize("fmt", ["old", "new"])
def test_usage_chunk_only_when_asked(make_world, fmt):
    world = make_world(emulator={"stream_format": fmt})
    key = world.new_user("alice")
    client = world.client(key)
    plain = list(client.chat.completions.create(model="llama3.2:1b", messages=MSG, stream=True))
    assert all(c.usage is None for c in plain)
    assert all(c.choices for c in plain)
    asked = list(client.chat.completions.create(model="llama3.2:1b", messages=MSG, stream=True,
                                                stream_options={"include_usage": True}))
    assert asked[-1].choices == [] and asked[-1].usage.prompt_tokens == 26
    # proxyd asked Ollama for usage both times
    bodies = [r["body"] for r in world.emu.requests if r["path"] == "/v1/chat/completions"]
    assert all(b["stream_options"]["include_usage"] is True for b in bodies)


def test_completions_and_stream(world):
    key = world.new_user("alice")
    client = world.client(key)
    r = client.completions.create(model="llama3.2:1b", prompt="Once upon a time", max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    chunks = list(client.completions.create(model="llama3.2:1b", prompt="Once", stream=True, max_tokens=4))
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert all(getattr(c, "usage", None) is None for c in chunks)  # Ollama's zeroed usage objects stripped
    with_usage = list(client.completions.create(model="llama3.2:1b", prompt="Once", stream=True, max_tokens=4,
                                                stream_options={"include_usage": True}))
    assert with_usage[-1].usage.completion_tokens == 4


def test_embeddings_and_models(world):
    key = world.new_user("alice")
    client = world.client(key)
    e = client.embeddings.create(model="nomic-embed-text", input=["hello", "world"])
    assert len(e.data) == 2 and e.usage.prompt_tokens > 0
    ids = [m.id for m in client.models.list()]
    assert "llama3.2:1b" in ids
    assert client.models.retrieve("llama3.2:1b").id == "llama3.2:1b"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope:1b")


def test_async_client(world):
    key = world.new_user("alice")

    async def run():
        client = world.async_client(key)
        results = await asyncio.gather(*[
            client.chat.completions.create(model="llama3.2:1b", messages=MSG) for _ in range(20)])
        stream = await client.chat.completions.create(model="llama3.2:1b", messages=MSG, stream=True)
        parts = [c.choices[0].delta.content async for c in stream if c.choices]
        await client.close()
        return results, parts

    results, parts = asyncio.run(run())
    assert len({r.id for r in results}) == 20
    assert "".join(p or "" for p in parts)


def test_auth_errors(world):
    key = world.new_user("alice")
    with pytest.raises(openai.AuthenticationError) as e:
        world.client("sk-proxyd-wrong").chat.completions.create(model="llama3.2:1b", messages=MSG)
    assert e.value.body["code"] == "invalid_api_key"
    r = httpx.post(world.url + "/v1/chat/completions", json={"model": "llama3.2:1b", "messages": MSG})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    # a second key, then revoke it
    r = world.admin("POST", "/admin/users/alice/keys")
    assert r.status_code == 201
    key2, key2_id = r.json()["api_key"], r.json()["key_id"]
    world.client(key2).chat.completions.create(model="llama3.2:1b", messages=MSG)
    assert world.admin("DELETE", f"/admin/keys/{key2_id}").status_code == 204
    with pytest.raises(openai.AuthenticationError):
        world.client(key2).chat.completions.create(model="llama3.2:1b", messages=MSG)
    world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG)  # the first key still works
    # disabled user -> 403
    assert world.admin("PATCH", "/admin/users/alice", {"disabled": True}).status_code == 200
    with pytest.raises(openai.PermissionDeniedError):
        world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG)
    assert world.admin("PATCH", "/admin/users/alice", {"disabled": False}).status_code == 200
    world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG)


def test_admin_auth(world):
    key = world.new_user("alice")
    for token in ("", "wrong", key):
        for method, path in (("GET", "/admin/users"), ("POST", "/admin/users"), ("GET", "/admin/users/alice"),
                             ("GET", "/admin/usage"), ("DELETE", "/admin/keys/x"), ("GET", "/admin/invoices")):
            r = world.admin(method, path, {"user_id": "mallory"} if method == "POST" else None, token=token)
            assert r.status_code == 401, (method, path, r.text)
            assert "error" in r.json() and "alice" not in r.text
    assert world.admin("POST", "/admin/users", {"user_id": "alice"}).status_code == 409
    users = world.admin("GET", "/admin/users").json()["data"]
    assert [u["user_id"] for u in users] == ["alice"]
    assert key not in json.dumps(users)  # keys are shown only once


def test_upstream_errors_pass_through(world):
    key = world.new_user("alice")
    client = world.client(key)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope:1b", messages=MSG)
    assert "model 'nope:1b' not found" in e.value.message
    world.emu.add_fault("busy503")
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="llama3.2:1b", messages=MSG)
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"]


def test_bad_input_is_400_and_writes_nothing(world):
    key = world.new_user("alice")
    h = {"Authorization": f"Bearer {key}"}
    url = world.url + "/v1/chat/completions"
    cases = [
        b"{not json",
        b"[]",
        b"",
        json.dumps({"messages": MSG}).encode(),
        json.dumps({"model": "llama3.2:1b"}).encode(),
        json.dumps({"model": "llama3.2:1b", "messages": "hi"}).encode(),
        json.dumps({"model": "llama3.2:1b", "messages": MSG, "max_tokens": "10"}).encode(),
        json.dumps({"model": "llama3.2:1b", "messages": MSG, "stream": "yes"}).encode(),
        json.dumps({"model": 5, "messages": MSG}).encode(),
        json.dumps({"model": "llama3.2:1b", "messages": [{"role": "user", "content": [{"type": "video"}]}]}).encode(),
    ]
    for body in cases:
        r = httpx.post(url, content=body, headers=h)
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    world.settle_all()
    assert world.rows("SELECT COUNT(*) FROM requests") == [(0,)]
    assert not [r for r in world.emu.requests if r["path"].startswith("/v1/chat")]


def test_body_too_large_is_413(make_world):
    world = make_world(config={"server.max_body_bytes": 10_000})
    key = world.new_user("alice")
    big = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "x" * 20_000}]}
    r = httpx.post(world.url + "/v1/chat/completions", json=big, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    world.settle_all()
    assert world.rows("SELECT COUNT(*) FROM requests") == [(0,)]


def _send_headers(port: int, key: str | None, declared: int, body_start: bytes = b"{") -> socket.socket:
    """Opens a connection and sends a chat request's headers and the first bytes of its body only."""
    s = socket.create_connection(("127.0.0.1", port))
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\n"
              f"Content-Length: {declared}\r\n\r\n".encode() + body_start)
    return s


def _status_without_sending_the_rest(s: socket.socket) -> int:
    s.settimeout(5)  # a server that waits for the rest of the body times this out: the test fails
    head = s.recv(65536).split(b"\r\n", 1)[0]
    return int(head.split()[1])


def test_refusals_come_before_the_body_is_read(make_world):
    # A request proxyd will refuse is refused from its headers, without waiting for (or holding) its body:
    # no key, a declared body over the limit, a key at its cap on open requests.
    world = make_world(config={"server.max_connections_per_key": 1, "server.max_body_bytes": 100_000},
                       emulator={"token_delay_s": 0.2})
    key = world.new_user("alice")
    with _send_headers(world.port, None, 50_000) as s:
        assert _status_without_sending_the_rest(s) == 401
    with _send_headers(world.port, key, 500_000) as s:
        assert _status_without_sending_the_rest(s) == 413
    stream = world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG, stream=True)
    next(iter(stream))  # alice's one allowed request is open
    with _send_headers(world.port, key, 50_000) as s:
        assert _status_without_sending_the_rest(s) == 429
    stream.close()


def test_upstream_down_is_502_without_its_address(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    world = Harness(str(tmp_path / "p.db"), upstream_url=dead).start()
    try:
        key = world.new_user("alice")
        with pytest.raises(openai.APIStatusError) as e:
            world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG)
        assert e.value.status_code == 502 and "unreachable: Connection refused" in e.value.message
        assert dead.split("//")[1] not in e.value.message  # internal addresses are logged, not shown (#12)
        health = httpx.get(world.url + "/healthz").json()
        assert health["upstream"]["reachable"] is False and health["status"] == "degraded"
        world.settle_all()
        assert world.rows("SELECT status FROM requests") == [("voided",)]
        assert world.rows("SELECT COUNT(*) FROM usage_daily") == [(0,)]
    finally:
        world.close()


def test_what_reaches_upstream(world):
    key = world.new_user("alice")
    world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG, max_completion_tokens=3)
    req = [r for r in world.emu.requests if r["path"] == "/v1/chat/completions"][-1]
    headers = {k.lower(): v for k, v in req["headers"].items()}
    assert headers["host"].startswith("127.0.0.1:")  # a local Host: Ollama 403s anything else
    assert "authorization" not in headers
    assert key not in json.dumps(req)
    assert req["body"]["max_tokens"] == 3 and "max_completion_tokens" not in req["body"]


def test_max_completion_tokens_honoured(world):
    key = world.new_user("alice")
    r = world.client(key).chat.completions.create(
        model="llama3.2:1b", messages=[{"role": "user", "content": "[[emu:reply_tokens=50]] long"}],
        max_completion_tokens=7)
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"


def test_unknown_path_and_health(world):
    r = httpx.get(world.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    h = httpx.get(world.url + "/healthz").json()
    assert h["upstream"]["reachable"] is True and h["status"] == "ok"


def test_wrong_method_is_405_with_allow(world):
    key = world.new_user("alice")
    r = httpx.get(world.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 405 and r.headers["allow"] == "POST", r.headers
    assert r.json()["error"]["code"] == "method_not_allowed"
    r = httpx.delete(world.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 405 and r.headers["allow"] == "GET"


def test_body_that_is_not_utf8_is_a_clear_400(world):
    key = world.new_user("alice")
    for raw in (b'\xff{"model": "llama3.2:1b"}', b'{"model": "llama3.2:1b", "messages": [{"role": "user", "content": "\xe9"}]}'):
        r = httpx.post(world.url + "/v1/chat/completions", content=raw,
                       headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        assert r.status_code == 400 and "UTF-8" in r.json()["error"]["message"], r.text
