"""All four dialects at once (issue #14): one user, one model, one limit, whatever API each request speaks.

Each dialect has its own tests (test_proxy.py, test_responses.py, test_anthropic.py, test_native.py); this
one checks what only mixing them shows: the reservations of every dialect count against the same limits,
so switching API cannot escape one, and the ledger's endpoint column adds up to what was billed.
"""

from __future__ import annotations

import asyncio

import anthropic
import ollama
import openai

MODEL = "llama3.2:1b"
# Every answer runs into its cap (the emulator would say 50 tokens): each request bills what it reserved.
CONTENT = "[[emu:reply_tokens=50]] Hi"
DIALECTS = ("chat", "chat.stream", "responses", "responses.stream", "messages", "messages.stream",
            "api.chat", "api.generate.stream")


def test_a_model_limit_holds_when_one_user_mixes_all_four_dialects_20_way(world):
    limit = 2000
    key = world.new_user("alice", limits={"models": {MODEL: {"total_tokens": limit}}})
    msgs = [{"role": "user", "content": CONTENT}]

    async def call(kind: str, oa, an, native) -> None:
        if kind == "chat":
            await oa.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20)
        elif kind == "chat.stream":
            async for _ in await oa.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20, stream=True):
                pass
        elif kind == "responses":
            await oa.responses.create(model=MODEL, input=CONTENT, max_output_tokens=20)
        elif kind == "responses.stream":
            async for _ in await oa.responses.create(model=MODEL, input=CONTENT, max_output_tokens=20, stream=True):
                pass
        elif kind == "messages":
            await an.messages.create(model=MODEL, messages=msgs, max_tokens=20)
        elif kind == "messages.stream":
            async for _ in await an.messages.create(model=MODEL, messages=msgs, max_tokens=20, stream=True):
                pass
        elif kind == "api.chat":
            await native.chat(model=MODEL, messages=msgs, options={"num_predict": 20})
        else:
            async for _ in await native.generate(model=MODEL, prompt=CONTENT, options={"num_predict": 20}, stream=True):
                pass

    async def run():
        oa = world.async_client(key)
        an = anthropic.AsyncAnthropic(base_url=world.url, api_key=key, max_retries=0)
        native = ollama.AsyncClient(host=world.url, headers={"Authorization": f"Bearer {key}"})
        sem = asyncio.Semaphore(20)
        outcomes: list[tuple[str, str]] = []

        async def one(i: int) -> None:
            kind = DIALECTS[i % len(DIALECTS)]
            async with sem:
                try:
                    await call(kind, oa, an, native)
                    outcomes.append((kind, "ok"))
                except (openai.RateLimitError, anthropic.RateLimitError):
                    outcomes.append((kind, "refused"))
                except ollama.ResponseError as e:
                    assert e.status_code == 429, e
                    outcomes.append((kind, "refused"))

        await asyncio.gather(*[one(i) for i in range(160)])
        await oa.close()
        await an.close()
        return outcomes

    outcomes = asyncio.run(run())
    world.settle_all()
    [(billed, settled)] = world.rows(
        "SELECT SUM(prompt_tokens + completion_tokens), COUNT(*) FROM requests WHERE status = 'settled'")
    assert billed <= limit  # no overshoot, whatever the mix
    assert billed > limit - 100  # and the limit was used up, not refused early (a request reserves < 100)
    ok = {k for k, o in outcomes if o == "ok"}
    refused = {k for k, o in outcomes if o == "refused"}
    assert ok == set(DIALECTS), outcomes  # every dialect got some of the budget...
    assert refused == set(DIALECTS), outcomes  # ...and every one was refused once it was spent
    assert settled == sum(1 for _, o in outcomes if o == "ok")
    assert world.ctx.meter.limiter.pending == 0  # nothing left reserved
    # The ledger's endpoint column: the usage API by endpoint adds up to what was billed.
    by_endpoint = world.get("/v1/usage", key, group_by="endpoint").json()
    assert {r["endpoint"] for r in by_endpoint["data"]} == {"chat.completions", "responses", "messages",
                                                            "api.chat", "api.generate"}
    assert by_endpoint["totals"]["total_tokens"] == billed
    limits = world.get("/v1/limits", key).json()
    [model_total] = [x for x in limits["limits"] if x["model"] == MODEL and x["name"] == "total_tokens"]
    assert model_total["used"] == billed and model_total["reserved"] == 0
