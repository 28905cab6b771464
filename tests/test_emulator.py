"""The Ollama emulator speaks Ollama's /v1 wire format, as Ollama's own code writes it (ollama/ollama's
openai/openai.go and middleware/openai.go, read at v0.33.0-rc2, commit fb30760).

Every test starts its own emulator on a free port in-process and talks real HTTP to it: raw
aiohttp where the exact bytes matter, the ``openai`` SDK where a real client's view matters.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import time
from typing import Any, AsyncIterator

import aiohttp
import openai
import pytest

from ollama_emulator import EmulatorState, names, parse_fault, start_emulator
from ollama_emulator.replies import VOCAB
from ollama_emulator.templates import chat_prompt, template_for

HI = [{"role": "user", "content": "Hi"}]
PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def emulator(**options: Any) -> AsyncIterator[tuple[str, EmulatorState]]:
    """A running emulator for one test: (base URL, state)."""
    server, port, state = await start_emulator(**options)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.stop()
        await server.close_all_connections()
        state.tokens.close()


def sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)


async def post(url: str, path: str, body: Any = None, *, raw: bytes | None = None, headers=None):
    """(status, content-type, body bytes) of one POST."""
    async with aiohttp.ClientSession() as s:
        data = raw if raw is not None else json.dumps(body).encode()
        async with s.post(url + path, data=data, headers=headers) as r:
            return r.status, r.headers.get("Content-Type"), await r.read()


def sse_events(raw: bytes) -> list[Any]:
    """Parsed `data:` events; "[DONE]" stays a string."""
    out = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: "):
            payload = block[len(b"data: "):].decode()
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def chat(content: str = "Hi", model: str = "llama3.2:1b", **extra: Any) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def error_of(body: bytes) -> dict:
    return json.loads(body)["error"]


def usage_of(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def llama_prompt_tokens(state: EmulatorState, content: str) -> int:
    """One user message through Ollama's llama3.2 template: 25 tokens + the content's own."""
    return 25 + state.tokens.count("llama3.2:1b", content)


# -- non-stream chat ---------------------------------------------------------------------------


def test_chat_non_stream_shape_and_usage_via_sdk() -> None:
    async def go() -> None:
        async with emulator() as (url, state):
            async with sdk(url) as client:
                res = await client.chat.completions.create(model="llama3.2:1b", messages=HI)
            assert re.fullmatch(r"chatcmpl-\d{1,3}", res.id) and int(res.id.split("-")[1]) < 999
            assert res.object == "chat.completion" and res.model == "llama3.2:1b"
            assert res.system_fingerprint == "fp_ollama"
            choice = res.choices[0]
            assert choice.finish_reason == "stop" and choice.message.role == "assistant"
            assert choice.message.content == "alpha beta gamma delta epsilon eta theta lambda mu nu xi pi"
            # 26 = Ollama's llama3.2 template around "Hi"; 12 visible tokens + the counted EOS.
            usage = res.usage
            assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (26, 13, 39)
            assert state.completed == 1

    run(go())


def test_chat_raw_body_is_go_json_with_newline() -> None:
    async def go() -> None:
        async with emulator() as (url, _):
            status, ctype, body = await post(url, "/v1/chat/completions", chat("Hi [[emu:reply_tokens=2]]"))
            assert status == 200 and ctype == "application/json" and body.endswith(b"}\n")
            keys = list(json.loads(body))
            assert keys == ["id", "object", "created", "model", "system_fingerprint", "choices", "usage"]
            assert json.loads(body)["choices"][0]["message"]["content"] == "alpha beta"

    run(go())


def test_max_tokens_cuts_with_length_and_max_completion_tokens_is_ignored() -> None:
    async def go() -> None:
        async with emulator() as (url, _):
            _, _, body = await post(url, "/v1/chat/completions", chat(max_tokens=3))
            res = json.loads(body)
            assert res["choices"][0]["finish_reason"] == "length"
            assert res["usage"]["completion_tokens"] == 3
            assert res["choices"][0]["message"]["content"] == "alpha beta gamma"
            # Ollama drops max_completion_tokens (issue #7125): the natural reply comes back.
            _, _, body = await post(url, "/v1/chat/completions", chat(max_completion_tokens=3))
            res = json.loads(body)
            assert res["choices"][0]["finish_reason"] == "stop"
            assert res["usage"]["completion_tokens"] == 13

    run(go())


def test_reply_tokens_directive_and_prompt_skew() -> None:
    async def go() -> None:
        async with emulator(prompt_token_skew=5) as (url, _):
            _, _, body = await post(url, "/v1/chat/completions", chat("[[emu:reply_tokens=0]]"))
            res = json.loads(body)
            assert res["choices"][0]["message"]["content"] == ""
            assert res["usage"]["completion_tokens"] == 1  # an empty reply still counts its EOS
            _, _, body = await post(url, "/v1/chat/completions", chat("Hi"))
            assert json.loads(body)["usage"]["prompt_tokens"] == 31

    run(go())


# -- streams -----------------------------------------------------------------------------------


def test_old_stream_format() -> None:
    async def go() -> None:
        async with emulator(stream_format="old") as (url, _):
            status, ctype, raw = await post(
                url, "/v1/chat/completions", chat("Hi [[emu:reply_tokens=3]]", stream=True)
            )
            assert status == 200 and ctype == "text/event-stream"
            events = sse_events(raw)
            assert events[-1] == "[DONE]" and raw.endswith(b"data: [DONE]\n\n")
            chunks = events[:-1]
            assert len(chunks) == 4  # 3 tokens + the done message; no usage without include_usage
            for c in chunks:
                assert c["object"] == "chat.completion.chunk" and "usage" not in c
                assert c["choices"][0]["delta"]["role"] == "assistant"
            assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]
            assert chunks[-1]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "alpha beta gamma"

    run(go())


def test_new_stream_format_with_usage() -> None:
    async def go() -> None:
        async with emulator(stream_format="new") as (url, state):
            body = chat("Hi [[emu:reply_tokens=3]]", stream=True, stream_options={"include_usage": True})
            _, _, raw = await post(url, "/v1/chat/completions", body)
            events = sse_events(raw)
            assert events[-1] == "[DONE]"
            chunks, usage_chunk = events[:-2], events[-2]
            assert [c["choices"][0]["delta"] for c in chunks] == [
                {"role": "assistant", "content": "alpha"},
                {"content": " beta"},
                {"content": " gamma"},
                {},
            ]
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
            assert len({c["created"] for c in events[:-1]}) == 1
            assert usage_chunk["choices"] == []
            prompt = llama_prompt_tokens(state, "Hi [[emu:reply_tokens=3]]")  # directives are prompt text too
            assert usage_chunk["usage"] == usage_of(prompt, 4)

    run(go())


def test_stream_usage_only_with_include_usage_and_send_usage() -> None:
    async def go() -> None:
        async with emulator() as (url, _):
            body = chat(stream=True, max_tokens=2, stream_options={"include_usage": True})
            events = sse_events((await post(url, "/v1/chat/completions", body))[2])
            assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 2
            assert all("usage" not in e for e in events[:-2])
            assert events[-3]["choices"][0]["finish_reason"] == "length"
            events = sse_events((await post(url, "/v1/chat/completions", chat(stream=True)))[2])
            assert all("usage" not in e for e in events[:-1])
        async with emulator(send_usage=False) as (url, _):
            body = chat(stream=True, stream_options={"include_usage": True})
            events = sse_events((await post(url, "/v1/chat/completions", body))[2])
            assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])

    run(go())


@pytest.mark.parametrize("fmt", ["old", "new"])
def test_stream_via_openai_sdk(fmt: str) -> None:
    async def go() -> None:
        async with emulator(stream_format=fmt) as (url, state):
            text, finish, usage = "", None, None
            async with sdk(url) as client:
                stream = await client.chat.completions.create(
                    model="llama3.2:1b",
                    messages=[{"role": "user", "content": "Hi [[emu:reply_tokens=5]]"}],
                    stream=True,
                    stream_options={"include_usage": True},
                )
                async for chunk in stream:
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
                        finish = chunk.choices[0].finish_reason or finish
                    if chunk.usage:
                        usage = chunk.usage
            assert text == "alpha beta gamma delta epsilon" and finish == "stop"
            prompt = llama_prompt_tokens(state, "Hi [[emu:reply_tokens=5]]")
            assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (prompt, 6)

    run(go())


# -- /v1/completions ---------------------------------------------------------------------------


def test_completions_non_stream_and_zeroed_usage_stream_quirk() -> None:
    async def go() -> None:
        async with emulator() as (url, _):
            body = {"model": "llama3.2:1b", "prompt": "Hi [[emu:reply_tokens=2]]"}
            res = json.loads((await post(url, "/v1/completions", body))[2])
            assert re.fullmatch(r"cmpl-\d{1,3}", res["id"]) and res["object"] == "text_completion"
            assert res["choices"] == [{"text": "alpha beta", "index": 0, "finish_reason": "stop"}]
            prompt = res["usage"]["prompt_tokens"]
            assert res["usage"]["completion_tokens"] == 3

            body.update(stream=True, stream_options={"include_usage": True})
            events = sse_events((await post(url, "/v1/completions", body))[2])
            chunks, usage_chunk = events[:-2], events[-2]
            zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            assert all(c["usage"] == zero for c in chunks)  # Ollama's quirk: zeroed usage on every chunk
            assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop"]
            assert usage_chunk["choices"] == []
            assert usage_chunk["usage"] == usage_of(prompt, 3)

            status, _, raw = await post(url, "/v1/completions", {"model": "llama3.2:1b", "prompt": ["a"]})
            assert status == 400 and "CompletionRequest.prompt of type string" in error_of(raw)["message"]

    run(go())


# -- embeddings --------------------------------------------------------------------------------


def test_embeddings_float_base64_and_errors() -> None:
    async def go() -> None:
        async with emulator(embedding_dims=16) as (url, _):
            body = {"model": "nomic-embed-text", "input": ["hello world", "hello world", "other"]}
            res = json.loads((await post(url, "/v1/embeddings", body))[2])
            vecs = [d["embedding"] for d in res["data"]]
            assert [d["index"] for d in res["data"]] == [0, 1, 2] and res["object"] == "list"
            assert len(vecs[0]) == 16 and vecs[0] == vecs[1] != vecs[2]
            assert math.isclose(sum(x * x for x in vecs[0]), 1.0, rel_tol=1e-5)
            assert res["usage"] == {"prompt_tokens": 5, "total_tokens": 5}  # 2 + 2 + 1 tokens

            res = json.loads((await post(url, "/v1/embeddings", {**body, "encoding_format": "base64"}))[2])
            decoded = struct.unpack("<16f", base64.b64decode(res["data"][0]["embedding"]))
            assert list(decoded) == vecs[0]

            async with sdk(url) as client:  # the SDK asks for base64 and decodes it
                sdk_res = await client.embeddings.create(model="nomic-embed-text", input="hello world")
            assert sdk_res.data[0].embedding == vecs[0]

            status, _, raw = await post(url, "/v1/embeddings", {"model": "nomic-embed-text", "input": []})
            assert (status, error_of(raw)["message"]) == (400, "invalid input")
            status, _, raw = await post(url, "/v1/embeddings", {"model": "nope", "input": "x"})
            assert status == 404
            assert error_of(raw) == {
                "message": 'model "nope" not found, try pulling it first',
                "type": "not_found_error",
                "param": None,
                "code": None,
            }

    run(go())


# -- models ------------------------------------------------------------------------------------


def test_lone_surrogate_escapes_become_replacement_characters_as_in_go() -> None:
    # Go's JSON decoder maps an escaped lone UTF-16 surrogate to U+FFFD; the emulator used to keep it and
    # answer 500 when it later encoded the text.
    async def go() -> None:
        async with emulator(embedding_dims=8) as (url, _):
            lone = b'{"model": "nomic-embed-text", "input": "hi \\ud800 there"}'
            fixed = '{"model": "nomic-embed-text", "input": "hi \ufffd there"}'.encode()
            status, _, got = await post(url, "/v1/embeddings", raw=lone)
            assert status == 200, got
            assert json.loads(got)["data"] == json.loads((await post(url, "/v1/embeddings", raw=fixed))[2])["data"]
            status, _, got = await post(url, "/v1/chat/completions", raw=b'{"model": "llama3.2:1b", "stream": true,'
                                        b' "messages": [{"role": "user", "content": "\\udfff"}]}')
            assert status == 200 and sse_events(got)[-1] == "[DONE]", got

    run(go())


def test_models_list_retrieve_and_404() -> None:
    async def go() -> None:
        async with emulator() as (url, _):
            async with sdk(url) as client:
                page = await client.models.list()
                m = await client.models.retrieve("moondream")
                with pytest.raises(openai.NotFoundError) as exc:
                    await client.models.retrieve("nope")
            # Ollama lists local names with their tag: "moondream" shows as "moondream:latest".
            assert [m.id for m in page.data] == ["llama3.2:1b", "moondream:latest", "nomic-embed-text:latest"]
            assert all(m.owned_by == "library" and m.object == "model" for m in page.data)
            assert m.id == "moondream" and m.created == page.data[1].created
            assert exc.value.body["message"] == "model 'nope' not found"

    run(go())


# -- errors ------------------------------------------------------------------------------------


def test_error_catalogue() -> None:
    async def go() -> None:
        async with emulator() as (url, _):
            cases = [
                (chat(model="nope"), 404, "model 'nope' not found", "not_found_error"),
                ({"model": "llama3.2:1b", "messages": []}, 400, "[] is too short - 'messages'", None),
                ({"model": "llama3.2:1b"}, 400, "[] is too short - 'messages'", None),
                ({"messages": HI}, 400, "model is required", None),
                (chat(model="nomic-embed-text"), 400, '"nomic-embed-text" does not support chat', None),
            ]
            for body, status, message, etype in cases:
                got_status, _, raw = await post(url, "/v1/chat/completions", body)
                err = error_of(raw)
                assert (got_status, err["message"]) == (status, message)
                assert err["type"] == (etype or "invalid_request_error")
                assert err["param"] is None and err["code"] is None

            status, ctype, raw = await post(url, "/v1/chat/completions", raw=b'{"model": x}')
            assert status == 400 and ctype == "application/json; charset=utf-8"
            assert error_of(raw)["message"] == "invalid character 'x' looking for beginning of value"
            status, _, raw = await post(url, "/v1/chat/completions", raw=b"")
            assert error_of(raw)["message"] == "EOF"

            async with aiohttp.ClientSession() as s:
                async with s.get(url + "/v1/nothing") as r:
                    assert (r.status, await r.text()) == (404, "404 page not found")
                async with s.get(url + "/v1/chat/completions") as r:
                    assert (r.status, await r.text()) == (405, "405 method not allowed")
                async with s.get(url + "/") as r:
                    assert await r.text() == "Ollama is running"

    run(go())


def _image_message(url_value: Any, model: str = "moondream") -> dict:
    parts = [{"type": "image_url", "image_url": url_value}, {"type": "text", "text": "Hi"}]
    return {"model": model, "messages": [{"role": "user", "content": parts}]}


def test_images() -> None:
    async def go() -> None:
        async with emulator() as (url, _):
            png = "data:image/png;base64," + base64.b64encode(PNG_1PX).decode()
            status, _, raw = await post(url, "/v1/chat/completions", _image_message({"url": png}))
            _, _, raw_plain = await post(url, "/v1/chat/completions", chat(model="moondream"))
            no_image = json.loads(raw_plain)
            assert status == 200
            assert json.loads(raw)["usage"]["prompt_tokens"] == no_image["usage"]["prompt_tokens"] + 729
            status, _, _ = await post(url, "/v1/chat/completions", _image_message(png))  # string shorthand
            assert status == 200

            cases = [
                ("https://example.com/cat.png", "moondream", 400,
                 "image URLs are not currently supported, please use base64 encoded data instead"),
                ("data:image/gif;base64,R0lGODlh", "moondream", 400, "invalid image input"),
                ("data:image/png;base64,@@@", "moondream", 400, "invalid image input"),
                (png, "llama3.2:1b", 500, "this model is missing data required for image input"),
            ]  # fmt: skip
            for value, model, status, message in cases:
                got, _, raw = await post(url, "/v1/chat/completions", _image_message({"url": value}, model))
                assert (got, error_of(raw)["message"]) == (status, message)
            text_b64 = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
            got, _, raw = await post(url, "/v1/chat/completions", _image_message({"url": text_b64}))
            assert got == 500 and error_of(raw)["type"] == "api_error"

    run(go())


def test_host_check() -> None:
    async def go() -> None:
        async with emulator() as (url, state):
            port = url.rsplit(":", 1)[1]
            evil = {"Host": "evil.example"}
            status, ctype, raw = await post(url, "/v1/chat/completions", chat(), headers=evil)
            assert (status, raw, ctype) == (403, b"", None)
            assert state.requests[-1]["headers"]["Host"] == "evil.example"
            for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", "box.internal", "10.1.2.3:11434"):
                status, _, _ = await post(url, "/v1/chat/completions", chat(), headers={"Host": host})
                assert status == 200, host
        async with emulator(check_host=False) as (url, _):
            status, _, _ = await post(url, "/v1/chat/completions", chat(), headers={"Host": "evil.example"})
            assert status == 200

    run(go())


# -- faults ------------------------------------------------------------------------------------


def test_fault_cut_after_ends_stream_without_done() -> None:
    async def go() -> None:
        async with emulator() as (url, state):
            state.add_fault("cut_after:2")
            got = b""
            async with aiohttp.ClientSession() as s:
                async with s.post(url + "/v1/chat/completions", json=chat(stream=True)) as r:
                    assert r.status == 200
                    with pytest.raises(aiohttp.ClientPayloadError):
                        async for line in r.content:
                            got += line
            events = sse_events(got)
            assert len(events) == 2 and "[DONE]" not in events
            assert all(e["choices"][0]["finish_reason"] is None for e in events)
            # Non-stream: the connection closes without any response.
            state.add_fault("cut_after:0")
            with pytest.raises(aiohttp.ClientError):
                await post(url, "/v1/chat/completions", chat())
            # The fault was one-shot: the next request is normal.
            assert (await post(url, "/v1/chat/completions", chat()))[0] == 200

    run(go())


def test_faults_busy503_error500_and_directive() -> None:
    async def go() -> None:
        async with emulator() as (url, state):
            state.add_fault("busy503")
            status, _, raw = await post(url, "/v1/chat/completions", chat())
            assert status == 503
            assert error_of(raw) == {
                "message": "server busy, please try again.  maximum pending requests exceeded",
                "type": "api_error",
                "param": None,
                "code": None,
            }
            status, _, raw = await post(url, "/v1/chat/completions", chat("Hi [[emu:fault=error500]]"))
            assert status == 500
            assert error_of(raw)["message"] == "llama runner process has terminated: exit status 2"
            async with sdk(url) as client:
                with pytest.raises(openai.InternalServerError):
                    await client.chat.completions.create(
                        model="llama3.2:1b", messages=[{"role": "user", "content": "[[emu:fault=error500]]"}]
                    )
            with pytest.raises(ValueError):
                state.add_fault("no_such_fault")

    run(go())


def test_fault_no_usage_and_bad_json() -> None:
    async def go() -> None:
        async with emulator() as (url, state):
            state.add_fault("no_usage")
            body = chat(stream=True, stream_options={"include_usage": True})
            events = sse_events((await post(url, "/v1/chat/completions", body))[2])
            assert events[-1] == "[DONE]" and all(e["choices"] for e in events[:-1])
            state.add_fault("bad_json")
            status, _, raw = await post(url, "/v1/chat/completions", chat())
            assert status == 200
            with pytest.raises(ValueError):
                json.loads(raw)
            state.add_fault("bad_json")
            _, _, raw = await post(url, "/v1/chat/completions", body)
            assert raw.startswith(b"data: {not json\n\n") and raw.endswith(b"data: [DONE]\n\n")

    run(go())


def test_fault_huge() -> None:
    async def go() -> None:
        async with emulator() as (url, _):
            _, _, raw = await post(url, "/v1/chat/completions", chat("[[emu:fault=huge:200000]]"))
            res = json.loads(raw)
            assert 150_000 < len(res["choices"][0]["message"]["content"]) < 250_000

    run(go())


def test_token_delay_spreads_chunks_and_disconnect_is_counted() -> None:
    async def go() -> None:
        async with emulator(token_delay_s=0.05) as (url, state):
            stamps = []
            async with aiohttp.ClientSession() as s:
                body = chat("Hi [[emu:reply_tokens=4]]", stream=True)
                async with s.post(url + "/v1/chat/completions", json=body) as r:
                    async for line in r.content:
                        if line.startswith(b"data: "):
                            stamps.append(time.monotonic())
            assert len(stamps) == 6  # 4 tokens, the done chunk, [DONE]
            assert stamps[-1] - stamps[0] >= 0.18  # four 50 ms gaps (some timer slack)

            # stall_after: the stream hangs until the client leaves; leaving is counted.
            state.add_fault("stall_after:1")
            async with aiohttp.ClientSession() as s:
                async with s.post(url + "/v1/chat/completions", json=chat(stream=True)) as r:
                    await r.content.readline()
                    assert state.active_streams == 1
            for _ in range(100):
                if state.cancelled_streams:
                    break
                await asyncio.sleep(0.01)
            assert (state.cancelled_streams, state.active_streams) == (1, 0)

    run(go())


def test_requests_are_recorded() -> None:
    async def go() -> None:
        async with emulator() as (url, state):
            await post(url, "/v1/chat/completions", chat(), headers={"Authorization": "Bearer k"})
            await post(url, "/v1/chat/completions", raw=b"{oops")
            first, second = list(state.requests)
            assert first["method"] == "POST" and first["path"] == "/v1/chat/completions"
            assert first["headers"]["Authorization"] == "Bearer k" and first["body"] == chat()
            assert second["body"] is None

    run(go())


def test_parse_fault() -> None:
    assert parse_fault("slow_first_byte:0.5").arg == 0.5
    assert parse_fault("cut_after:3").arg == 3
    with pytest.raises(ValueError):
        parse_fault("cut_after")


def test_command_line_serves_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ollama_emulator", "--port", "0", "--stream-format", "new"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stderr.readline()  # type: ignore[union-attr]
        found = re.search(r"ollama emulator listening on (http://127\.0\.0\.1:\d+)", line)
        assert found, line

        async def ping() -> str:
            async with aiohttp.ClientSession() as s:
                async with s.get(found.group(1) + "/") as r:
                    return await r.text()

        assert run(ping()) == "Ollama is running"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]


# -- the emulator's own model-name rules, tokenizer and templates ------------------------------


@pytest.mark.parametrize("spelling", [
    "moondream", "MoonDream", " moondream\t", "moondream:latest", "moondream:LATEST", "moondream:local",
    "library/moondream", "registry.ollama.ai/library/moondream:latest", "https://registry.ollama.ai/library/moondream",
])
def test_names_ollama_serves_as_one_model(spelling: str) -> None:
    # ollama/ollama types/model/name.go ParseName + internal/modelref ParseRef, matched part by part
    # with EqualFold (server/routes.go getExistingName).
    assert names.find(spelling, ("llama3.2:1b", "moondream")) == "moondream"


@pytest.mark.parametrize("spelling", [
    "", "   ", "moondream:", ":latest", "/moondream", "a//moondream", "m@sha256:abc", "foo:cloud:local",
    "a/b:c/d", "ns.with.dot/m", "-m", "m" * 81, "mo\u00f6ndream", "h/ns/m:" + "t" * 81,
])
def test_names_ollama_refuses(spelling: str) -> None:
    assert names.resolve(spelling) is None and names.find(spelling, ("moondream",)) is None


def test_name_parts_and_cloud_models() -> None:
    assert names.parse_name("scheme://host:port/namespace/model:tag") == ("host:port", "namespace", "model", "tag")
    assert names.parse_name("hf.co/Org/M") == ("hf.co", "Org", "M", "latest")
    assert names.resolve("h" * 350 + "/n/m:t") is not None and names.resolve("h" * 351 + "/n/m:t") is None
    # A cloud model is another model than the local one of the same name (modelref.NormalizePullName).
    assert names.resolve("qwen3:cloud") == ("registry.ollama.ai", "library", "qwen3", "cloud")
    assert names.resolve("gpt-oss:20b-cloud") == names.resolve("gpt-oss:20b:cloud")
    assert names.find("moondream:cloud", ("moondream",)) is None
    assert names.owner("hf.co/org/m:q4") == "org" and names.listed_name("hf.co/org/m") == "hf.co/org/m:latest"


def test_model_route_tells_invalid_names_from_unknown_ones() -> None:
    async def go() -> None:
        async with emulator() as (url, _):
            async with aiohttp.ClientSession() as s:
                for name, status in (("MoonDream:latest", 200), ("moondream:", 400), ("nope", 404)):
                    async with s.get(f"{url}/v1/models/{name}") as r:
                        assert r.status == status, (name, r.status)

    run(go())


def test_reply_words_are_one_llama3_token_each() -> None:
    # What lets a proxy's count of relayed text equal the reported completion_tokens (minus the EOS).
    vocab = template_for("llama3.2:1b").vocab
    for word in VOCAB:
        assert vocab.count_text(word) == vocab.count_text(" " + word) == 1, word


@pytest.mark.parametrize("messages, expected", [
    # Ollama's llama3.2 template (ollama/ollama fb30760) with the Llama 3 vocabulary.
    ([{"role": "user", "content": "Hi"}], 26),
    ([{"role": "user", "content": "Hello, how are you?"}], 31),
    ([{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi"}], 32),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
      {"role": "user", "content": "How are you?"}], 42),
    # collate: consecutive messages of one role are one turn, joined by "\n\n" (1 token, not a 5-token turn)
    ([{"role": "user", "content": "Hi"}, {"role": "user", "content": "again"}], 28),
    # a text-part array is the same turn as the parts joined by "\n\n"
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], 28),
    # the template has no branch for a "developer" message: it is not in the prompt
    ([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}], 26),
    # a special token typed by a user is one token: the runner splits them out of the prompt
    ([{"role": "user", "content": "<|eot_id|>"}], 26),
])
def test_llama32_prompt_tokens(messages: list, expected: int) -> None:
    template, text, images = chat_prompt("llama3.2:1b", messages, None)
    assert (template.vocab.count_prompt(text), images) == (expected, 0)


def test_llama32_template_text() -> None:
    _, text, _ = chat_prompt("llama3.2:1b", [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}], None)
    assert text == ("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\nS<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"b": {"type": "string", "x-extra": 1}, "a": {"type": ["string", "null"]}}}}}
    call = {"type": "function", "function": {"name": "f", "arguments": '{"z": 1.0, "a": "<"}'}}
    _, text, _ = chat_prompt("llama3.2:1b", [{"role": "assistant", "content": None, "tool_calls": [call]},
                                            {"role": "user", "content": "Hi"}], [tool])
    # Tools go into the system block and the last user turn, as Ollama's structs marshal them: struct
    # field order, unknown keys dropped, the properties map sorted; arguments sorted, numbers as float64.
    assert "You are a helpful assistant with tool calling capabilities.<|eot_id|>" in text
    assert ('{"type":"function","function":{"name":"f","description":"","parameters":{"type":"object",'
            '"properties":{"a":{"type":["string","null"]},"b":{"type":"string"}}}}}\n\nHi<|eot_id|>') in text
    assert '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "f", "parameters": {"a":"\\u003c","z":1}}<|eot_id|>' in text


def test_moondream_template_and_image_positions() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    _, text, _ = chat_prompt("moondream", [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Q2"}], None)
    assert text == " Question: Hi\n\n Answer: Yo\n\n Question: Q2\n\n Answer: "  # no .System in this template
    template, plain, _ = chat_prompt("moondream", [{"role": "user", "content": "Hi"}], None)
    _, with_image, images = chat_prompt("moondream", [{"role": "user", "content": [image, {"type": "text", "text": "Hi"}]}], None)
    assert images == 1 and template.vocab.count_prompt(with_image) == template.vocab.count_prompt(plain)
    # An image-only message: the [img-0] tag is the prompt, the text around it tokenized on each side.
    _, only_image, images = chat_prompt("moondream", [{"role": "user", "content": [image]}], None)
    assert images == 1 and template.vocab.count_prompt(only_image) == 8  # BOS, " Question: ", "\n\n Answer: "
