"""Estimate, reserve, settle; the ledger; limits and refusals; usage, limits and invoice APIs (issue #3)."""

import asyncio
import threading
import time

import httpx
import openai
import pytest

from proxyd.tokens import TokenCounter

MSG = [{"role": "user", "content": "Hi"}]
LLAMA = {"llama3.2:1b": {"tokenizer": "llama3", "template": "llama3"}}


@pytest.mark.parametrize("messages, expected", [
    ([{"role": "user", "content": "Hi"}], 26),
    ([{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi"}], 32),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
      {"role": "user", "content": "How are you?"}], 42),
])
def test_llama32_prompt_vectors(messages, expected):
    tc = TokenCounter(LLAMA, {})
    assert asyncio.run(tc.chat_prompt("llama3.2:1b", messages)) == expected


def test_large_prompt_counts_off_the_loop(monkeypatch):
    tc = TokenCounter(LLAMA, {})
    text = "word " * 100_000
    encoding = tc.for_model("llama3.2:1b").encoding
    encode = encoding.encode_ordinary
    ticked = threading.Event()

    def encode_once_the_loop_ticked(s):
        # Encodes only after the event loop has turned over meanwhile: run on the loop itself, this
        # would wait for turns that cannot come.
        assert ticked.wait(10), "the event loop did not run while the prompt was encoded"
        return encode(s)

    monkeypatch.setattr(encoding, "encode_ordinary", encode_once_the_loop_ticked)

    async def run():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while ticks <= 3:
                ticks += 1
                await asyncio.sleep(0)
            ticked.set()

        t = asyncio.create_task(ticker())
        n = await tc.chat_prompt("llama3.2:1b", [{"role": "user", "content": text}])
        t.cancel()
        return n, ticks

    n, ticks = asyncio.run(run())
    assert n > 100_000
    assert ticks > 3  # the loop kept running while 100k tokens were encoded


def ledger_totals(world, user):
    return world.rows("SELECT model, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens) FROM usage_daily"
                      " WHERE user_id=? GROUP BY model ORDER BY model", (user,))


def test_billed_usage_equals_reported(make_world):
    # The emulator reports prompt_tokens 3 above the template count, so a ledger equal to what the
    # client saw proves the reported numbers were billed, not proxyd's estimate.
    world = make_world(emulator={"prompt_token_skew": 3})
    key = world.new_user("alice")
    c = world.client(key)
    seen = {"llama3.2:1b": [0, 0, 0], "nomic-embed-text": [0, 0, 0]}

    def add(model, usage):
        seen[model][0] += 1
        seen[model][1] += usage.prompt_tokens
        seen[model][2] += usage.completion_tokens

    add("llama3.2:1b", c.chat.completions.create(model="llama3.2:1b", messages=MSG).usage)
    chunks = list(c.chat.completions.create(model="llama3.2:1b", messages=MSG, stream=True,
                                            stream_options={"include_usage": True}))
    add("llama3.2:1b", chunks[-1].usage)
    add("llama3.2:1b", c.completions.create(model="llama3.2:1b", prompt="Hello", max_tokens=6).usage)
    chunks = list(c.completions.create(model="llama3.2:1b", prompt="Hello", stream=True, max_tokens=6,
                                       stream_options={"include_usage": True}))
    add("llama3.2:1b", chunks[-1].usage)
    e = c.embeddings.create(model="nomic-embed-text", input=["a b c", "d"])
    seen["nomic-embed-text"][0] += 1
    seen["nomic-embed-text"][1] += e.usage.prompt_tokens
    # A stream without include_usage: the client sees no usage, proxyd still bills Ollama's report.
    text = "".join(ch.choices[0].delta.content or "" for ch in
                   c.chat.completions.create(model="llama3.2:1b", messages=MSG, stream=True) if ch.choices)
    seen["llama3.2:1b"][0] += 1
    seen["llama3.2:1b"][1] += 26 + 3
    seen["llama3.2:1b"][2] += len(text.split()) + 1  # one token per word, plus Ollama's counted EOS
    world.settle_all()
    assert ledger_totals(world, "alice") == [
        ("llama3.2:1b", *seen["llama3.2:1b"]), ("nomic-embed-text:latest", *seen["nomic-embed-text"])]  # recorded with its tag
    assert set(world.rows("SELECT usage_source FROM requests")) == {("reported",)}
    u = world.get("/v1/usage", key).json()
    assert u["totals"]["requests"] == 6
    assert {r["model"] for r in u["data"]} == {"llama3.2:1b", "nomic-embed-text:latest"}
    # Each row names its endpoint, the upstream that served it (the one upstream is "default") and the attempts.
    assert sorted(set(world.rows("SELECT endpoint, upstream, attempts FROM requests"))) == [
        ("chat.completions", "default", 1), ("completions", "default", 1), ("embeddings", "default", 1)]
    by_endpoint = world.get("/v1/usage", key, group_by="endpoint").json()["data"]
    assert [(r["endpoint"], r["requests"]) for r in by_endpoint] == [
        ("chat.completions", 3), ("completions", 2), ("embeddings", 1)]
    assert world.get("/v1/usage", key, group_by="upstream").status_code == 400  # the operator's view only


def test_counted_usage_when_upstream_reports_none(make_world):
    world = make_world(emulator={"send_usage": False})
    key = world.new_user("alice")
    chunks = list(world.client(key).chat.completions.create(
        model="llama3.2:1b", messages=[{"role": "user", "content": "[[emu:reply_tokens=9]] x"}], stream=True,
        stream_options={"include_usage": True}))
    world.settle_all()
    # Counted: the prompt is proxyd's estimate, the completion the tokens of the relayed text.
    [(prompt, estimate, completion, source)] = world.rows(
        "SELECT prompt_tokens, reserved_prompt, completion_tokens, usage_source FROM requests")
    assert (prompt, completion, source) == (estimate, 9, "counted")
    # The client asked for usage and the upstream sent none: proxyd's own usage chunk, as OpenAI sends
    # it (last, no choices), with what was billed.
    assert all(ch.usage is None for ch in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.object == "chat.completion.chunk" and last.id == chunks[0].id, last
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (prompt, 9, prompt + 9)
    assert last.model == chunks[0].model
    # The same on /v1/completions, in its own chunk shape.
    chunks = list(world.client(key).completions.create(model="llama3.2:1b", prompt="[[emu:reply_tokens=4]] x",
                                                       stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.object == "text_completion" and last.choices == [] and last.usage.completion_tokens == 4, last
    assert all(ch.usage is None for ch in chunks[:-1])


def test_an_empty_prompt_stream_bills_the_reported_zero_and_shows_no_stray_chunk(world):
    """Ollama answers an empty completions prompt by loading the model: one chunk, finish_reason "load",
    then a usage chunk reporting 0 tokens. A reported zero is a report (billed as such, the same as the
    non-stream answer), and the usage chunk the client did not ask for is not relayed."""
    key = world.new_user("alice")
    c = world.client(key)
    chunks = list(c.completions.create(model="llama3.2:1b", prompt="", stream=True))
    assert all(ch.choices for ch in chunks), chunks  # no choices-less chunk reaches a client that did not ask
    c.completions.create(model="llama3.2:1b", prompt="")
    world.settle_all()
    assert world.rows("SELECT stream, prompt_tokens, completion_tokens, usage_source FROM requests ORDER BY stream") == [
        (0, 0, 0, "reported"), (1, 0, 0, "reported")]


def test_tool_definitions_are_part_of_the_prompt_estimate(world):
    """Ollama's template writes every tool's JSON into the prompt. An estimate without them (26 tokens
    for "Hi" with ten long tools) let a user with a small allowance in, to be billed thousands of
    tokens past the limit."""
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather. " * 100,
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    key = world.new_user("alice")
    world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG, tools=[tool] * 10, max_tokens=3)
    world.settle_all()
    [(estimate,)] = world.rows("SELECT reserved_prompt FROM requests")
    assert estimate > 3000, estimate
    small = world.client(world.new_user("bob", limits={"tokens_per_day": 1000}))
    small.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=3)
    with pytest.raises(openai.RateLimitError) as e:
        small.chat.completions.create(model="llama3.2:1b", messages=MSG, tools=[tool] * 10, max_tokens=3)
    assert e.value.body["code"] == "request_too_large", e.value.body


def test_an_empty_prompt_is_counted_as_nothing_when_the_upstream_reports_no_usage(make_world):
    world = make_world(emulator={"send_usage": False})
    key = world.new_user("alice")
    list(world.client(key).completions.create(model="llama3.2:1b", prompt="", stream=True))
    world.settle_all()
    assert world.rows("SELECT prompt_tokens, completion_tokens, usage_source FROM requests") == [(0, 0, "counted")]


def test_user_isolation(world):
    a = world.new_user("alice")
    b = world.new_user("bob")
    world.client(a).chat.completions.create(model="llama3.2:1b", messages=MSG)
    world.settle_all()
    ub = world.get("/v1/usage", b).json()
    assert ub["totals"]["requests"] == 0 and ub["user_id"] == "bob"
    # No parameter lets bob read alice's data.
    assert world.get("/v1/usage", b, user_id="alice").json()["totals"]["requests"] == 0
    assert "alice" not in world.get("/v1/limits", b).text
    assert world.get("/v1/billing/invoices", b, period=time.strftime("%Y-%m")).json()["lines"] == []
    assert world.get("/admin/users/alice/usage", b).status_code == 401
    assert world.admin("GET", "/admin/users/alice/usage").json()["totals"]["requests"] == 1


def test_upstream_failure_is_voided(world):
    key = world.new_user("alice")
    world.emu.add_fault("error500")
    with pytest.raises(openai.InternalServerError):
        world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG)
    world.settle_all()
    assert world.rows("SELECT status, http_status FROM requests") == [("voided", 500)]
    assert world.rows("SELECT COUNT(*) FROM usage_daily") == [(0,)]


def test_cut_stream_bills_what_was_relayed(world):
    key = world.new_user("alice")
    world.emu.add_fault("cut_after:4")
    got = []
    with pytest.raises(openai.APIError):
        for ch in world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG, stream=True):
            if ch.choices and ch.choices[0].delta.content:
                got.append(ch.choices[0].delta.content)
    assert len(got) == 4
    world.settle_all()
    assert world.rows("SELECT status, prompt_tokens, completion_tokens, usage_source FROM requests") == [
        ("settled", 26, 4, "counted")]


def test_client_disconnect_bills_relayed_and_cancels_upstream(make_world):
    world = make_world(emulator={"token_delay_s": 0.05})
    key = world.new_user("alice")
    body = {"model": "llama3.2:1b", "stream": True,
            "messages": [{"role": "user", "content": "[[emu:reply_tokens=200]] long"}]}
    with httpx.stream("POST", world.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key}"}) as r:
        lines = 0
        for line in r.iter_lines():
            lines += line.startswith("data:")
            if lines == 3:
                break
    deadline = time.time() + 5
    while time.time() < deadline and (world.emu.cancelled_streams == 0 or world.ctx.meter.admission.pending):
        time.sleep(0.02)
    assert world.emu.cancelled_streams == 1  # Ollama was told to stop generating
    world.settle_all()
    [(status, http, prompt, estimate, completion)] = world.rows(
        "SELECT status, http_status, prompt_tokens, reserved_prompt, completion_tokens FROM requests")
    assert (status, http, prompt) == ("settled", 499, estimate)
    assert 3 <= completion < 200


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_client_gone_before_the_first_byte_cancels_upstream(make_world, stream):
    """A client that gives up before Ollama's first byte (an SDK timeout: a non-stream answer's headers
    come only after the whole generation) must stop Ollama there, not let it generate on for nobody.
    Nothing was delivered and whether Ollama got to the prompt is unknown: voided. Without the cancel,
    Ollama generates the full 3 s: its answer completes."""
    world = make_world(emulator={"token_delay_s": 0.05, "first_byte_delay_s": 2.0 if stream else 0.0})
    key = world.new_user("alice")
    with pytest.raises(openai.APITimeoutError):
        world.client(key, timeout=0.5).chat.completions.create(
            model="llama3.2:1b", stream=stream, messages=[{"role": "user", "content": "[[emu:reply_tokens=60]] go"}])
    deadline = time.time() + 5
    state = world.emu
    while time.time() < deadline and not (state.cancelled_answers or state.cancelled_streams):
        time.sleep(0.02)
    assert (state.cancelled_streams, state.cancelled_answers) == ((1, 0) if stream else (0, 1))
    assert state.completed == 0, "Ollama was stopped only when it had finished"
    world.settle_all()
    [(status, http, prompt)] = world.rows("SELECT status, http_status, prompt_tokens FROM requests")
    assert (status, http, prompt) == ("voided", 499, None)


def test_nothing_reserved_after_mixed_faults(make_world):
    world = make_world(emulator={"token_delay_s": 0.002})
    key = world.new_user("alice")
    faults = ["error500", "busy503", "cut_after:2", "no_usage", "bad_json", None, None]

    async def one(client, i):
        fault = faults[i % len(faults)]
        content = f"[[emu:fault={fault}]] hi" if fault else "hi"
        try:
            if i % 2:
                stream = await client.chat.completions.create(
                    model="llama3.2:1b", messages=[{"role": "user", "content": content}], stream=True)
                async for _ in stream:
                    pass
            else:
                await client.chat.completions.create(model="llama3.2:1b", messages=[{"role": "user", "content": content}])
        except openai.APIError:
            pass

    async def run():
        client = world.async_client(key)
        await asyncio.gather(*[one(client, i) for i in range(70)])
        await client.close()

    asyncio.run(run())
    world.settle_all()
    assert world.ctx.meter.limiter.pending == 0
    assert all(b.reserved == [0, 0, 0] for b in world.ctx.meter.limiter.buckets.values())
    assert all(v == 0 for v in world.ctx.meter.limiter.concurrent.values())
    check = world.admin("GET", "/admin/ledger/check").json()
    assert check["ok"], check
    assert "pending" not in check["requests_by_status"]
    today = time.strftime("%Y-%m-%d", time.gmtime())
    day = world.admin("GET", f"/admin/ledger/check?start={today}").json()  # end defaults to today
    assert day["ok"] and (day["start"], day["end"]) == (today, today), day
    assert day["requests_by_status"] == check["requests_by_status"]
    assert world.admin("GET", "/admin/ledger/check?start=2000-01-01&end=2000-01-31").json()["requests_by_status"] == {}
    for query, param in (("end=2026-01-01", "end"), ("start=yesterday", "start"), ("start=2026-02-01&end=2026-01-01", "start")):
        r = world.admin("GET", f"/admin/ledger/check?{query}")
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_concurrent_requests_never_bill_past_a_total_limit(world):
    key = world.new_user("alice", limits={"total_tokens": 1000})
    # Every answer runs into max_tokens, so each request bills exactly what it reserved and the number
    # admitted does not depend on how admissions and settles interleave.
    msgs = [{"role": "user", "content": "[[emu:reply_tokens=50]] Hi"}]

    async def run():
        client = world.async_client(key)
        ok = refused = 0

        async def one():
            nonlocal ok, refused
            try:
                await client.chat.completions.create(model="llama3.2:1b", messages=msgs, max_tokens=20)
                ok += 1
            except openai.RateLimitError as e:
                if e.body["code"] == "rate_limit_exceeded":  # room held by requests in flight: retry soon
                    assert e.response.headers["retry-after"] == "1" and "in flight" in e.message, e.message
                else:  # room used up: not retryable
                    assert e.body["code"] == "insufficient_quota", e.body
                    assert e.response.headers["x-should-retry"] == "false"
                refused += 1

        await asyncio.gather(*[one() for _ in range(120)])
        await client.close()
        return ok, refused

    ok, refused = asyncio.run(run())
    world.settle_all()
    [(billed, per_request)] = world.rows(
        "SELECT SUM(prompt_tokens + completion_tokens), MAX(prompt_tokens + completion_tokens) FROM requests"
        " WHERE status='settled'")
    assert billed <= 1000
    assert ok == 1000 // per_request and refused == 120 - ok


def test_short_term_limits_and_rollover(world):
    key = world.new_user("alice", limits={"requests_per_minute": 2})
    c = world.client(key)
    raw = c.chat.completions.with_raw_response.create(model="llama3.2:1b", messages=MSG)
    assert raw.headers["x-ratelimit-limit-requests"] == "2"
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    c.chat.completions.create(model="llama3.2:1b", messages=MSG)
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="llama3.2:1b", messages=MSG)
    assert e.value.body["code"] == "rate_limit_exceeded"
    assert "requests_per_minute" in e.value.message and "used 2" in e.value.message
    assert 0 < int(e.value.response.headers["retry-after"]) <= 60
    assert float(e.value.response.headers["retry-after-ms"]) > 0
    # OpenAI's x-ratelimit-* headers come with the 429 too: the state that refused it.
    h = e.value.response.headers
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("2", "0"), dict(h)
    assert h["x-ratelimit-reset-requests"].endswith("s"), dict(h)
    world.clock.advance(61)
    c.chat.completions.create(model="llama3.2:1b", messages=MSG)


def test_a_prompt_that_fills_the_context_still_gets_a_real_budget(world):
    """moondream's context window is 2048 (config). A longer prompt without max_tokens used to be
    forwarded with max_tokens 1: a one-token answer. Ollama truncates such a prompt itself and answers
    normally, so proxyd forwards at least estimate.min_completion_tokens (16)."""
    key = world.new_user("alice")
    r = world.client(key).chat.completions.create(
        model="moondream", messages=[{"role": "user", "content": "[[emu:reply_tokens=8]] " + "hello " * 2100}])
    sent = [q["body"] for q in world.emu.requests if q["path"] == "/v1/chat/completions"][-1]
    assert sent["max_tokens"] == 16, sent["max_tokens"]
    assert r.usage.completion_tokens > 1 and r.choices[0].finish_reason == "stop", r


def test_failed_requests_count_against_requests_per_minute(world):
    """A request Ollama fails on is not billed, but it is an attempt: free failures would let a client
    hammer Ollama with a request that crashes its runner, or with unknown model names."""
    key = world.new_user("bob", limits={"requests_per_minute": 3})
    c = world.client(key)
    world.emu.add_fault("error500")
    with pytest.raises(openai.InternalServerError):
        c.chat.completions.create(model="llama3.2:1b", messages=MSG)
    for _ in range(2):
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model="no-such-model", messages=MSG)
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="llama3.2:1b", messages=MSG)
    assert e.value.body["code"] == "rate_limit_exceeded" and "used 3" in e.value.message, e.value.message
    world.settle_all()
    assert world.rows("SELECT status, COUNT(*), SUM(COALESCE(prompt_tokens, 0)) FROM requests GROUP BY 1") == [("voided", 3, 0)]
    world.clock.advance(61)
    c.chat.completions.create(model="llama3.2:1b", messages=MSG)


def test_tokens_per_minute_and_concurrency(make_world):
    world = make_world(emulator={"token_delay_s": 0.05})
    key = world.new_user("alice", limits={"tokens_per_minute": 100, "max_concurrent_requests": 1})
    c = world.client(key)
    c.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=5)   # 26 + <=5
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=60)  # 86 does not fit
    with pytest.raises(openai.RateLimitError) as e:  # never fits: not retryable
        c.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=500)
    assert e.value.body["code"] == "request_too_large"

    async def two():
        client = world.async_client(key)
        res = await asyncio.gather(
            client.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=5),
            client.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=5),
            return_exceptions=True)
        await client.close()
        return res

    res = asyncio.run(two())
    assert sum(isinstance(r, openai.RateLimitError) for r in res) == 1


def test_a_used_up_limit_is_a_quota_refusal_even_with_the_default_budget(world):
    """Without max_tokens proxyd reserves its default budget (4096) but shrinks it to what is left; once
    less than the smallest budget is left, the refusal is about the allowance running out (retry later
    or not at all), not "request too large", which only a request that could never fit may get."""
    day = world.client(world.new_user("alice", limits={"tokens_per_day": 200}))
    for _ in range(20):
        try:
            day.chat.completions.create(model="llama3.2:1b", messages=MSG)
        except openai.RateLimitError as e:
            refusal = e
            break
    else:
        pytest.fail("20 requests fitted a 200 tokens/day limit")
    assert refusal.body["code"] == "insufficient_quota", refusal.body
    assert "Resets at" in refusal.message and int(refusal.response.headers["retry-after"]) > 0
    assert refusal.response.headers["x-should-retry"] == "false"

    minute = world.client(world.new_user("bob", limits={"tokens_per_minute": 50}))
    minute.chat.completions.create(model="llama3.2:1b", messages=MSG)  # 26 + a budget shrunk to 24
    with pytest.raises(openai.RateLimitError) as e:
        minute.chat.completions.create(model="llama3.2:1b", messages=MSG)
    assert e.value.body["code"] == "rate_limit_exceeded", e.value.body  # retryable: it fits in a minute
    assert e.value.body["type"] == "tokens", e.value.body  # what ran out, as OpenAI names it
    assert 0 < int(e.value.response.headers["retry-after"]) <= 60
    world.clock.advance(61)
    minute.chat.completions.create(model="llama3.2:1b", messages=MSG)

    # What can never fit is still said so, in the limit's unit, with what to change.
    tiny = world.client(world.new_user("carol", limits={"tokens_per_day": 30}))
    with pytest.raises(openai.RateLimitError) as e:
        tiny.chat.completions.create(model="llama3.2:1b", messages=MSG)
    assert e.value.body["code"] == "request_too_large" and "needs 42 tokens" in e.value.message, e.value.message
    assert "Shorten the prompt" in e.value.message and "max_tokens" not in e.value.message
    shut = world.client(world.new_user("erin", limits={"max_concurrent_requests": 0}))
    with pytest.raises(openai.RateLimitError) as e:
        shut.chat.completions.create(model="llama3.2:1b", messages=MSG)
    assert e.value.body["code"] == "insufficient_quota" and "no request can be admitted" in e.value.message
    assert "retry-after" not in e.value.response.headers
    world.settle_all()
    check = world.admin("GET", "/admin/ledger/check").json()
    assert check["ok"] and check["reserved_in_flight"] == 0, check


def test_room_held_by_a_request_in_flight_is_a_short_wait_not_a_spent_quota(make_world):
    """A request without max_tokens reserves all that is left of a small allowance (its default budget
    shrunk to fit). A request meanwhile must hear "try again in a moment", not "quota exceeded,
    resets tomorrow" with x-should-retry false: the room frees when the first one settles."""
    world = make_world(emulator={"token_delay_s": 0.05})
    key = world.new_user("alice", limits={"tokens_per_day": 1000})

    async def run():
        client = world.async_client(key)
        first = asyncio.create_task(client.chat.completions.create(
            model="llama3.2:1b", messages=[{"role": "user", "content": "[[emu:reply_tokens=20]] hi"}]))
        while world.ctx.meter.admission.pending == 0:
            await asyncio.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as e:
            await client.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=10)
        await first
        again = await client.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=10)
        await client.close()
        return e.value, again

    refusal, again = asyncio.run(run())
    assert refusal.body["code"] == "rate_limit_exceeded" and refusal.body["type"] == "tokens", refusal.body
    assert refusal.response.headers["retry-after"] == "1" and "x-should-retry" not in refusal.response.headers
    assert "in flight" in refusal.message, refusal.message
    assert again.usage.total_tokens > 0


def test_long_term_limits_roll_over_by_calendar(world):
    key = world.new_user("alice", limits={"requests_per_day": 1, "total_cost_usd": 100})
    c = world.client(key)
    c.chat.completions.create(model="llama3.2:1b", messages=MSG)
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="llama3.2:1b", messages=MSG)
    assert e.value.body["type"] == "insufficient_quota"
    assert e.value.response.headers["x-should-retry"] == "false"
    assert "requests_per_day" in e.value.message and "Resets at" in e.value.message
    world.clock.advance(86400)
    c.chat.completions.create(model="llama3.2:1b", messages=MSG)


def test_cost_limits_and_total(make_world):
    world = make_world(config={"pricing": {"llama3.2:1b": {"input_per_million_usd": 1000,
                                                            "output_per_million_usd": 2000}}})
    # 26 prompt tokens at $1000/M = $0.026; + 10 completion at $2000/M = $0.02 -> reserve $0.046
    key = world.new_user("alice", limits={"total_cost_usd": 0.1})
    c = world.client(key)
    c.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=10)
    c.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=10)
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=10)
    assert "total_cost_usd" in e.value.message and "does not reset" in e.value.message
    world.settle_all()
    [(cost,)] = world.rows("SELECT SUM(cost_nusd) FROM requests WHERE status='settled'")
    assert cost <= 100_000_000
    # Without max_tokens the default budget is shrunk to what is left instead of refusing outright.
    world.admin("PUT", "/admin/users/alice/limits", {"total_cost_usd": 1})
    r = c.chat.completions.create(model="llama3.2:1b", messages=[{"role": "user", "content": "[[emu:reply_tokens=500]] go"}])
    world.settle_all()
    assert r.choices[0].finish_reason == "length"
    [(cost,)] = world.rows("SELECT SUM(cost_nusd) FROM requests WHERE status='settled'")
    assert cost <= 1_000_000_000
    # A cost limit below what the prompt alone costs can never be met: said so, in dollars, not "exceeded".
    cheap = world.client(world.new_user("dave", limits={"cost_per_day_usd": 0.01}))
    with pytest.raises(openai.RateLimitError) as e:
        cheap.chat.completions.create(model="llama3.2:1b", messages=MSG)
    assert e.value.body["code"] == "request_too_large", e.value.body
    assert "needs at least $0.058000000" in e.value.message and "limit is $0.010000000" in e.value.message, e.value.message


def test_per_model_and_config_limits_and_overrides_survive_restart(make_world):
    world = make_world(config={"limits": {
        "default": {"requests_per_day": 100},
        "models": {"moondream": {"requests_per_day": 1}},
        "users": {"carol": {"requests_per_day": 2}},
    }})
    a = world.new_user("alice")
    carol = world.new_user("carol")
    img = [{"role": "user", "content": "Hi"}]
    world.client(a).chat.completions.create(model="moondream", messages=img)
    with pytest.raises(openai.RateLimitError) as e:
        world.client(a).chat.completions.create(model="moondream", messages=img)
    assert "for model moondream" in e.value.message
    world.client(a).chat.completions.create(model="llama3.2:1b", messages=MSG)  # other models unaffected
    for _ in range(2):
        world.client(carol).chat.completions.create(model="llama3.2:1b", messages=MSG)
    with pytest.raises(openai.RateLimitError):
        world.client(carol).chat.completions.create(model="llama3.2:1b", messages=MSG)
    # Admin override wins over config, null = unlimited; and it survives a restart, as does usage.
    r = world.admin("PUT", "/admin/users/carol/limits", {"requests_per_day": None, "tokens_per_day": 10_000})
    assert r.status_code == 200 and r.json()["effective"]["requests_per_day"] is None
    world.restart()
    world.client(carol).chat.completions.create(model="llama3.2:1b", messages=MSG)
    status = {x["name"]: x for x in world.get("/v1/limits", carol).json()["limits"]}
    assert status["tokens_per_day"]["used"] > 0 and status["tokens_per_day"]["limit"] == 10_000
    with pytest.raises(openai.RateLimitError):  # alice's moondream day is still used up after the restart
        world.client(a).chat.completions.create(model="moondream", messages=img)
    assert world.admin("DELETE", "/admin/users/carol/limits").json()["effective"]["requests_per_day"] == 2


def test_bad_limits_are_400(world):
    world.new_user("alice")
    for body in ({"requests_per_hour": 5}, {"requests_per_day": -1}, {"requests_per_day": "x"},
                 {"requests_per_day": 1.5}, {"models": {"m": {"models": {}}}}, [1]):
        r = world.admin("PUT", "/admin/users/alice/limits", body)
        assert r.status_code == 400, body
    assert world.admin("POST", "/admin/users", {"user_id": "bob", "limits": {"nope": 1}}).status_code == 400
    assert world.admin("GET", "/admin/users/bob").status_code == 404


def test_bad_usage_ranges_are_400(world):
    key = world.new_user("alice")
    for params, param in (({"start": "2026-02-30"}, "start"), ({"end": "0000-00-00"}, "end"),
                          ({"start": "2026-1-01"}, "start"), ({"start": "2026-03-02", "end": "2026-03-01"}, "start"),
                          ({"start": "\uff12026-01-01"}, "start")):  # a full-width digit is a digit to \d
        r = world.get("/v1/usage", key, **params)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (params, r.text)
    r = world.get("/v1/billing/invoices", key, period="\uff12026-11")
    assert r.status_code == 400 and r.json()["error"]["param"] == "period", r.text
    r = world.get("/v1/usage", key, start="2024-02-29", end="2024-03-01")  # a leap day is a day
    assert r.status_code == 200 and (r.json()["start"], r.json()["end"]) == ("2024-02-29", "2024-03-01"), r.text


def test_invoice_with_mid_month_price_change(make_world):
    world = make_world(config={"pricing": {"llama3.2:1b": {"input_per_million_usd": 1, "output_per_million_usd": 2}}})
    key = world.new_user("alice")
    world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=4)
    world.settle_all()
    # The price changes (config edit + restart): past rows keep the price in force when they settled.
    world.config_overrides["pricing"] = {"llama3.2:1b": {"input_per_million_usd": 10, "output_per_million_usd": 20}}
    world.restart()
    world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=4)
    world.settle_all()
    period = time.strftime("%Y-%m", time.gmtime())
    inv = world.get("/v1/billing/invoices", key, period=period).json()
    assert inv["status"] == "open" and len(inv["lines"]) == 2
    # Each request: 26 prompt + 4 completion tokens (cut by max_tokens).
    costs = sorted(line["cost_usd"] for line in inv["lines"])
    assert costs == ["0.000034000", "0.000340000"]  # 26*1+4*2 = 34 micro-USD; then 340
    assert inv["total_usd"] == "0.000374000"
    admin = world.admin("GET", f"/admin/invoices?period={period}").json()
    assert admin["data"][0]["total_usd"] == "0.000374000"
    past = world.get("/v1/billing/invoices", key, period="2020-01").json()
    assert past["status"] == "closed" and past["lines"] == []


def test_limiter_forgets_past_periods():
    from proxyd.limits import Limiter

    now = [1_780_000_000.0]
    lim = Limiter(clock=lambda: now[0])
    args = dict(user_id="u", model="m", user_limits={}, model_limits={}, prompt_tokens=1, completion_tokens=1,
                completion_is_default=False, min_completion_tokens=1, price=(0, 0))
    lim.settle(lim.reserve(**args), 1, 1, 0)
    open_hold = lim.reserve(**args)  # still running at midnight: its bucket must survive the sweep
    now[0] += 40 * 86400
    lim.settle(lim.reserve(**args), 1, 1, 0)
    periods = {k[2] for k in lim.buckets}
    assert len(periods) == 5  # the old day and month (still reserved) + the new day, month, total
    lim.settle(open_hold, 1, 1, 0)
    now[0] += 86400
    lim.settle(lim.reserve(**args), 1, 1, 0)
    assert len({k[2] for k in lim.buckets}) == 3


def test_a_limit_the_request_can_never_fit_is_the_refusal_whichever_is_tightest_now():
    """The tightest limit now may be one that frees up in a minute; if another limit is smaller than
    the request itself, waiting cannot help: request_too_large (not retried), not "try again in 60s"."""
    from proxyd.errors import QuotaExceeded
    from proxyd.limits import Limiter

    lim = Limiter(clock=lambda: 1_780_000_000.0)
    args = dict(user_id="u", model="m", user_limits={"tokens_per_minute": 10_000}, model_limits={"tokens_per_day": 100},
                completion_is_default=False, min_completion_tokens=16, price=(0, 0))
    # 9,990 tokens this minute, on another model: model m's day is untouched
    lim.settle(lim.reserve(**{**args, "model": "other", "model_limits": {}}, prompt_tokens=9_900, completion_tokens=90),
               9_900, 90, 0)
    with pytest.raises(QuotaExceeded) as e:  # 10 tokens left this minute; the day's limit is 100 and it needs 250
        lim.reserve(**args, prompt_tokens=200, completion_tokens=50)
    assert e.value.code == "request_too_large" and "tokens_per_day for model m" in e.value.message, e.value.message
    # Of two limits it can never fit, the one it exceeds most: shortening the prompt to fit that one fits both.
    with pytest.raises(QuotaExceeded) as e:
        lim.reserve(**{**args, "user_id": "w", "user_limits": {"tokens_per_day": 150, "total_tokens": 100},
                       "model_limits": {}}, prompt_tokens=156, completion_tokens=10)
    assert "total_tokens" in e.value.message and "limit is 100" in e.value.message, e.value.message
    # A cost limit the request exceeds by less than half a nano-dollar can never be met either: its need
    # is rounded up (1.3 nano-USD against a limit of 1), not to the nearest (1, which would "fit later").
    with pytest.raises(QuotaExceeded) as e:
        lim.reserve(**{**args, "user_limits": {"cost_per_day_usd": 1}, "model_limits": {}, "user_id": "v",
                       "price": (0, 1_300_000)}, prompt_tokens=0, completion_tokens=1)
    assert e.value.code == "request_too_large", e.value.message


def test_long_request_has_a_pending_row_until_it_ends(make_world):
    world = make_world(config={"database.pending_row_after_s": 0.1}, emulator={"token_delay_s": 0.05})
    key = world.new_user("alice")
    stream = world.client(key).chat.completions.create(
        model="llama3.2:1b", messages=[{"role": "user", "content": "[[emu:reply_tokens=12]] go"}], stream=True)
    next(iter(stream))
    # The row is written once the request has run pending_row_after_s, while the stream goes on
    # (12 tokens 50 ms apart): wait for it to appear rather than for a fixed time.
    rows, deadline = [], time.time() + 5
    while not rows and time.time() < deadline:
        time.sleep(0.01)
        rows = world.rows("SELECT status FROM requests")
    assert rows == [("pending",)]
    for _ in stream:
        pass
    world.settle_all()
    assert world.rows("SELECT status, completion_tokens FROM requests") == [("settled", 13)]
    # a quick request ends before its pending row is due: written once, settled
    world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG)
    world.settle_all()
    assert world.rows("SELECT COUNT(*) FROM requests WHERE status='settled'") == [(2,)]


def test_made_up_model_names_leave_no_state_behind(world):
    """Model names come from clients. Requests for models Ollama does not have are voided (404), and
    their per-model limiter state is dropped with them, so made-up names cannot grow memory; a model
    that was served keeps its state, and so does the user's all-models scope."""
    import openai

    key = world.new_user("alice")
    client = world.client(key)
    client.chat.completions.create(model="llama3.2:1b", messages=MSG)
    for i in range(30):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=f"made-up-{i}", messages=MSG)
    lim = world.ctx.meter.limiter
    scopes = {k[1] for k in lim.buckets} | {k[1] for k in lim.minutes} | {k[1] for k in lim.concurrent}
    assert scopes == {"*", "llama3.2:1b"}, scopes
    world.settle_all()
    assert world.rows("SELECT status, COUNT(*) FROM requests GROUP BY status ORDER BY status") == [("settled", 1), ("voided", 30)]


def test_every_spelling_ollama_serves_as_one_model_is_metered_as_that_model(make_world):
    """Ollama matches names case-insensitively, with registry.ollama.ai/, library/ and :latest optional.
    A per-model limit, a price and the ledger must see those spellings as the one model they are:
    copying the id /v1/models lists (moondream:latest) must not escape a limit set for moondream."""
    world = make_world(config={"pricing": {"moondream": {"input_per_million_usd": 1000, "output_per_million_usd": 1000},
                                           "default": {"input_per_million_usd": 1, "output_per_million_usd": 1}}})
    key = world.new_user("bob")
    r = world.admin("PUT", "/admin/users/bob/limits", {"models": {"MoonDream:latest": {"requests_per_minute": 2}}})
    assert r.status_code == 200, r.text
    c = world.client(key)
    listed = [m.id for m in c.models.list().data]
    assert "moondream:latest" in listed, listed
    c.chat.completions.create(model="moondream:latest", messages=MSG, max_tokens=3)
    c.chat.completions.create(model="registry.ollama.ai/library/MoonDream", messages=MSG, max_tokens=3)
    for spelling in ("moondream", "MOONDREAM", "library/moondream:latest"):
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model=spelling, messages=MSG, max_tokens=3)
        assert "for model moondream:latest" in e.value.message, e.value.message
    c.chat.completions.create(model="Llama3.2:1B", messages=MSG, max_tokens=3)  # another model: not limited
    world.settle_all()
    assert world.rows("SELECT model, input_price_nusd_per_mtok, COUNT(*) FROM requests WHERE status = 'settled'"
                      " GROUP BY 1, 2 ORDER BY 1") == [("llama3.2:1b", 1_000_000_000, 1), ("moondream:latest", 1_000_000_000_000, 2)]
    usage = world.get("/v1/usage", key, model="moondream:latest").json()
    assert usage["totals"]["requests"] == 2, usage
    status = [x for x in world.get("/v1/limits", key).json()["limits"] if x["model"]]
    assert [(x["model"], x["name"], x["used"]) for x in status] == [("moondream:latest", "requests_per_minute", 2)], status
    # Two keys for one model in one mapping: which was meant? Refused, naming them.
    for same in ("library/MoonDream", "moondream:latest"):
        r = world.admin("PUT", "/admin/users/bob/limits", {"models": {"moondream": {"requests_per_day": 1},
                                                                     same: {"requests_per_day": 2}}})
        assert r.status_code == 400 and "names the same model" in r.json()["error"]["message"], r.text
    for nothing in ("", ":latest", "moondream:"):
        r = world.admin("PUT", "/admin/users/bob/limits", {"models": {nothing: {"requests_per_day": 1}}})
        assert r.status_code == 400 and "not a model name" in r.json()["error"]["message"], r.text
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=":latest", messages=MSG)


def test_untagged_config_keys_cover_a_family_and_tagged_keys_one_model():
    from proxyd.config import ConfigError
    from proxyd.modelname import canonical, canonical_keys
    from proxyd.pricing import PriceTable

    prices = PriceTable({"llama3.2:latest": {"input_per_million_usd": 5, "output_per_million_usd": 0},
                         "MoonDream": {"input_per_million_usd": 7, "output_per_million_usd": 0},
                         "default": {"input_per_million_usd": 1, "output_per_million_usd": 0}})
    assert prices.price(canonical("llama3.2")) == (5 * 10**9, 0)  # llama3.2:latest exactly
    assert prices.price(canonical("llama3.2:1b")) == (1 * 10**9, 0)  # another tag: not that key's
    assert prices.price(canonical("moondream:latest")) == (7 * 10**9, 0)  # the family key covers every tag
    assert canonical("hf.co/Org/Model:Q4") == "hf.co/org/model:q4"
    assert canonical("localhost:5000/ns/m") == "localhost:5000/ns/m:latest"
    # Two parts are namespace/model in Ollama's grammar, and ':' is not a namespace character: refused.
    assert canonical("localhost:5000/m") == ""
    with pytest.raises(ConfigError, match="as 'default'"):
        PriceTable({"Default": {"input_per_million_usd": 1, "output_per_million_usd": 1}})
    # Overrides stored before names were folded must not stop a restart: the later key applies.
    assert canonical_keys({"a": 1, "A": 2}, "stored", keep_last=True) == {"a": 2}


def test_per_minute_window_survives_a_restart(make_world):
    """The minute's settled requests are read back at start: a restart does not hand out a fresh minute."""
    world = make_world(config={"limits": {"default": {"requests_per_minute": 2}}})
    key = world.new_user("alice")
    other = world.new_user("bob")
    for _ in range(2):
        world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG)
    world.client(other).chat.completions.create(model="llama3.2:1b", messages=MSG)
    failing = world.new_user("carol")
    for _ in range(2):  # failed attempts count against requests per minute, across a restart too
        with pytest.raises(openai.NotFoundError):
            world.client(failing).chat.completions.create(model="no-such-model", messages=MSG)
    world.restart()
    with pytest.raises(openai.RateLimitError):
        world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG)
    with pytest.raises(openai.RateLimitError):
        world.client(failing).chat.completions.create(model="llama3.2:1b", messages=MSG)
    world.client(other).chat.completions.create(model="llama3.2:1b", messages=MSG)  # bob used 1 of 2
    status = {x["name"]: x for x in world.get("/v1/limits", key).json()["limits"]}
    assert status["requests_per_minute"]["used"] == 2
    world.clock.advance(61)
    world.restart()
    world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG)
