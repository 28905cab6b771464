"""Limit headers (issue #12, item 18): OpenAI's x-ratelimit-* mean per-minute windows only; day, month
and total limits are named in proxyd's own x-proxyd-limit-* headers."""

import calendar
import time

import openai
import pytest

MSG = [{"role": "user", "content": "[[emu:reply_tokens=60]] Hi"}]  # 34 prompt tokens, 60 completion
LEFT = str(100 - 34 - 60)  # of 100 tokens after one such request (reserved, then settled: the same)


def _next_utc_midnight(t: float) -> str:
    g = time.gmtime(t)
    end = calendar.timegm((g.tm_year, g.tm_mon, g.tm_mday, 0, 0, 0)) + 86400
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end))


def _ratelimit(headers) -> dict:
    return {k: v for k, v in headers.items() if k.lower().startswith("x-ratelimit-")}


def test_a_daily_quota_is_not_reported_as_a_per_minute_window(world):
    c = world.client(world.new_user("alice", limits={"tokens_per_day": 100}))
    ok = c.chat.completions.with_raw_response.create(model="llama3.2:1b", messages=MSG, max_tokens=60)
    assert ok.parse().usage.total_tokens == 94
    # Success: no per-minute limit, so no x-ratelimit-* at all (OpenAI's mean a minute); the day's
    # quota is named in proxyd's headers, after this request's reservation (34 + 60).
    assert _ratelimit(ok.headers) == {}, dict(ok.headers)
    assert ok.headers["x-proxyd-limit"] == "tokens_per_day"
    assert (ok.headers["x-proxyd-limit-quota"], ok.headers["x-proxyd-limit-remaining"]) == ("100", LEFT)
    assert ok.headers["x-proxyd-limit-reset"] == _next_utc_midnight(world.clock())
    assert "x-proxyd-limit-model" not in ok.headers
    world.settle_all()

    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=60)
    h = e.value.response.headers
    assert e.value.body["code"] == "insufficient_quota", e.value.body
    assert "tokens_per_day" in e.value.message and "Resets at" in e.value.message
    # Before: x-ratelimit-limit-tokens: 100 and x-ratelimit-reset-tokens: 2h34m-style, read by pacing
    # tools as "100 tokens a minute".
    assert _ratelimit(h) == {}, dict(h)
    assert (h["x-proxyd-limit"], h["x-proxyd-limit-quota"], h["x-proxyd-limit-remaining"]) == ("tokens_per_day", "100", LEFT)
    assert h["x-proxyd-limit-reset"] == _next_utc_midnight(world.clock())
    assert h["x-should-retry"] == "false" and int(h["retry-after"]) > 0


def test_with_a_per_minute_limit_too_x_ratelimit_describes_only_the_minute(world):
    key = world.new_user("bob", limits={"requests_per_minute": 5, "tokens_per_day": 100,
                                        "models": {"llama3.2:1b": {"cost_per_day_usd": 10}}})
    c = world.client(key)
    ok = c.chat.completions.with_raw_response.create(model="llama3.2:1b", messages=MSG, max_tokens=60)
    h = ok.headers
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("5", "4"), dict(h)
    assert h["x-ratelimit-reset-requests"] == "1m0s"
    # The tokens per day are not a per-minute token window: nothing about tokens in x-ratelimit-*.
    assert "x-ratelimit-limit-tokens" not in h and "x-ratelimit-remaining-tokens" not in h, dict(h)
    # The long-term limit closest to running out (6% left vs the cost limit's ~100%) is named.
    assert (h["x-proxyd-limit"], h["x-proxyd-limit-remaining"]) == ("tokens_per_day", LEFT), dict(h)
    world.settle_all()

    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=60)
    h = e.value.response.headers
    assert e.value.body["code"] == "insufficient_quota"
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("5", "4"), dict(h)
    assert "x-ratelimit-limit-tokens" not in h, dict(h)
    assert h["x-proxyd-limit"] == "tokens_per_day" and "x-proxyd-limit-model" not in h, dict(h)


def test_the_refusing_long_term_limit_is_named_with_its_model_and_unit(make_world):
    # A per-model cost limit refuses (94 tokens at $1,000 per million: $0.094 > $0.05); the looser
    # all-models token limit must not be named instead; a total limit (it never resets) has no reset.
    world = make_world(config={"pricing": {"default": {"input_per_million_usd": 1000, "output_per_million_usd": 1000}}})
    key = world.new_user("carol", limits={"total_tokens": 100_000, "models": {"llama3.2:1b": {"cost_per_day_usd": 0.05}}})
    with pytest.raises(openai.RateLimitError) as e:
        world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=60)
    h = e.value.response.headers
    assert "cost_per_day_usd for model llama3.2:1b" in e.value.message, e.value.message
    assert (h["x-proxyd-limit"], h["x-proxyd-limit-model"]) == ("cost_per_day_usd", "llama3.2:1b"), dict(h)
    assert (h["x-proxyd-limit-quota"], h["x-proxyd-limit-remaining"]) == ("0.050000000", "0.050000000"), dict(h)
    assert h["x-proxyd-limit-reset"] == _next_utc_midnight(world.clock())

    key = world.new_user("dave", limits={"total_tokens": 50})
    with pytest.raises(openai.RateLimitError) as e:
        world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=60)
    h = e.value.response.headers
    assert e.value.body["code"] == "request_too_large", e.value.body
    assert (h["x-proxyd-limit"], h["x-proxyd-limit-quota"]) == ("total_tokens", "50"), dict(h)
    assert "x-proxyd-limit-reset" not in h and _ratelimit(h) == {}, dict(h)


def test_a_per_minute_refusal_keeps_x_ratelimit(world):
    c = world.client(world.new_user("erin", limits={"tokens_per_minute": 100, "tokens_per_day": 10_000}))
    ok = c.chat.completions.with_raw_response.create(model="llama3.2:1b", messages=MSG, max_tokens=60)
    assert (ok.headers["x-ratelimit-limit-tokens"], ok.headers["x-ratelimit-remaining-tokens"]) == ("100", LEFT)
    assert ok.headers["x-ratelimit-reset-tokens"] == "1m0s"
    world.settle_all()
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=60)
    h = e.value.response.headers
    assert e.value.body["code"] == "rate_limit_exceeded" and e.value.body["type"] == "tokens", e.value.body
    assert (h["x-ratelimit-limit-tokens"], h["x-ratelimit-remaining-tokens"]) == ("100", LEFT), dict(h)
    reset = h["x-ratelimit-reset-tokens"]
    assert reset.endswith("s") and "h" not in reset and 0 < int(h["retry-after"]) <= 60, dict(h)
    assert h["x-proxyd-limit"] == "tokens_per_day"  # the state of the long-term limit, not the one refused
