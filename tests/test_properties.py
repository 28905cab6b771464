"""Property tests of the pure parts (issue #6): the SSE parser, the request validators, limit parsing and
the limiter's admission arithmetic. No network, no event loop except the token counter's own.

Deterministic (derandomized) and bounded: the whole file runs in well under 30 s on 2 cores.
"""

from __future__ import annotations

import asyncio
import calendar
import time
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from proxyd import validate
from proxyd.config import load_config
from proxyd.errors import InvalidRequest, QuotaExceeded, RateLimited
from proxyd.images import image_parts
from proxyd.limits import Limiter
from proxyd.limitspec import LIMIT_FIELDS, MAX_COUNT, MAX_USD, parse_limits, to_api
from proxyd.pricing import NANO, cost_nusd
from proxyd.sse import DONE, SSEParser, event
from proxyd.storage import from_iso_ms, iso_ms
from proxyd.tokens import TokenCounter


@pytest.fixture(autouse=True, scope="module")
def _readable_falsifying_examples():
    """schemathesis (its pytest plugin loads with the suite) swaps Hypothesis' example printer for one that
    prints nothing, which blanks every "Falsifying example"; put the real one back for this module."""
    import hypothesis.core
    from hypothesis.vendor import pretty

    patched = hypothesis.core.RepresentationPrinter
    hypothesis.core.RepresentationPrinter = pretty.RepresentationPrinter
    yield
    hypothesis.core.RepresentationPrinter = patched


FAST = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# =================================================================================================
# SSE
# =================================================================================================

# One line's text: anything but line ends (bytes, so UTF-8 sequences may be split by chunking).
line_text = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=12)


@st.composite
def sse_event(draw) -> tuple[list[str], bytes | None]:
    """(lines of one event block without line ends, the data payload the block carries or None)."""
    lines: list[str] = []
    data: list[str] = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["data", "data", "data_nospace", "comment", "event", "id", "retry"]))
        value = draw(line_text)
        if kind == "data":
            lines.append("data: " + value)
            data.append(value)
        elif kind == "data_nospace":
            value = value.lstrip(" ")
            lines.append("data:" + value)
            data.append(value)
        elif kind == "comment":
            lines.append(":" + value)
        elif kind == "event":
            lines.append("event: " + value.replace(":", ""))
        elif kind == "id":
            lines.append("id: " + value)
        else:
            lines.append("retry: " + str(draw(st.integers(0, 10_000))))
    payload = "\n".join(data).encode() if data else None
    return lines, payload


@st.composite
def sse_stream(draw) -> tuple[list[list[str]], list[bytes], list[str] | None]:
    """(blocks, the payloads they carry in order, the lines of a truncated last event or None)."""
    blocks = draw(st.lists(sse_event(), max_size=6))
    truncated = None
    if draw(st.booleans()):
        # An event the stream was cut in: at least one non-empty line, no terminating blank line.
        first = draw(st.sampled_from(["data: ", "data:", ": ", "event: "])) + draw(line_text)
        truncated = [first] + draw(st.lists(line_text.map(lambda v: "data: " + v), max_size=2))
    payloads = [p for _, p in blocks if p is not None]
    return [lines for lines, _ in blocks], payloads, truncated


def render(blocks: list[list[str]], truncated: list[str] | None, draw_end) -> bytes:
    """The stream as bytes; ``draw_end()`` picks each line end (one style, or mixed)."""
    out = []
    for lines in blocks:
        for line in lines:
            out.append(line + draw_end())
        out.append(draw_end())  # the blank line that dispatches the event
    if truncated is not None:
        for i, line in enumerate(truncated):
            out.append(line + (draw_end() if i < len(truncated) - 1 else ""))
    return "".join(out).encode()


def feed_all(chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    parser = SSEParser()
    events: list[bytes] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events, parser.tail()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


LINE_ENDS = {"lf": "\n", "crlf": "\r\n", "cr": "\r"}


@FAST
@given(sse_stream(), st.sampled_from(sorted(LINE_ENDS)), st.lists(st.integers(0, 10_000), max_size=12))
def test_sse_any_chunking_yields_the_same_events(stream, style, cuts):
    blocks, _payloads, truncated = stream
    end = LINE_ENDS[style]
    data = render(blocks, truncated, lambda: end)
    whole = feed_all([data])
    chunked = feed_all(split_at(data, cuts))
    bytewise = feed_all([data[i:i + 1] for i in range(len(data))])
    assert chunked == whole
    assert bytewise == whole


@FAST
@given(sse_stream(), st.sampled_from(sorted(LINE_ENDS)), st.lists(st.integers(0, 10_000), max_size=8))
def test_sse_events_and_tail_match_the_model(stream, style, cuts):
    """The payloads are exactly the data of the complete events (comments, event:, id:, retry: and
    data-less blocks carry nothing), and tail() is non-empty iff the stream ends inside an event."""
    blocks, payloads, truncated = stream
    end = LINE_ENDS[style]
    events, tail = feed_all(split_at(render(blocks, truncated, lambda: end), cuts))
    assert events == payloads
    assert bool(tail) == (truncated is not None)


@FAST
@given(sse_stream(), st.lists(st.sampled_from(["\n", "\r\n", "\r"]), min_size=1, max_size=8))
def test_sse_line_end_styles_are_equivalent(stream, mixed):
    """LF, CRLF, CR, and any mix of them line by line, parse to the same events and the same tail."""
    blocks, _, truncated = stream
    results = []
    for style in ("\n", "\r\n", "\r"):
        results.append(feed_all([render(blocks, truncated, lambda s=style: s)]))
    cycle, last = iter(mixed * 1000), [""]

    def mixed_end() -> str:
        end = next(cycle)
        if last[0] == "\r" and end == "\n":
            end = "\r\n"  # CR then LF would be one CRLF line end, not two
        last[0] = end
        return end

    results.append(feed_all([render(blocks, truncated, mixed_end)]))
    assert results[0][0] == results[1][0] == results[2][0] == results[3][0]
    assert bool(results[0][1]) == bool(results[1][1]) == bool(results[2][1]) == bool(results[3][1])


@FAST
@given(st.lists(st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b), max_size=6))
def test_sse_event_writer_round_trips(payloads):
    stream = b"".join(event(p) for p in payloads) + event(DONE)
    events, tail = feed_all([stream])
    assert events == payloads + [DONE] and tail == b""


def test_sse_examples():
    parser = SSEParser()
    assert parser.feed(b": ping\r\n\r\ndata: {\"a\":1}\r\n\r\ndata: [DO") == [b'{"a":1}']
    assert parser.tail() == b"data: [DO"
    assert parser.feed(b"NE]\r") == []
    assert parser.feed(b"\n\r\n") == [DONE]
    assert parser.tail() == b""
    # multi-line data joins with LF; "data:" without a space keeps the value as is
    assert SSEParser().feed(b"data:a\ndata:  b\n\n") == [b"a\n b"]


# =================================================================================================
# Validators
# =================================================================================================

json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8) | st.sampled_from(["", "user", "text", "image_url", "data:", "llama3.2:1b", "x" * 300])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["role", "content", "type", "text", "image_url", "url", "tool_calls", "function",
                         "name", "arguments", "include_usage"]) | st.text(max_size=4), inner, max_size=4),
    max_leaves=20,
)
BODY_KEYS = ["model", "messages", "prompt", "input", "stream", "stream_options", "n", "max_tokens",
             "max_completion_tokens", "temperature", "tools"]


def mostly(valid, rarely=json_values):
    """``valid`` about seven times out of eight, arbitrary JSON otherwise."""
    return st.integers(0, 7).flatmap(lambda i: rarely if i == 0 else valid)


@st.composite
def near_valid_chat(draw) -> dict[str, Any]:
    """A valid chat body with some parts replaced by arbitrary JSON: reaches the deep checks and what
    runs after validation."""
    part = mostly(st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}),
        st.fixed_dictionaries({"type": st.just("image_url"),
                               "image_url": mostly(st.one_of(st.just("data:image/png;base64,AAAA"),
                                                             st.fixed_dictionaries({"url": st.just("data:,x")})))}),
    ))
    tool_call = mostly(st.fixed_dictionaries(
        {"type": st.just("function"),
         "function": mostly(st.fixed_dictionaries({"name": mostly(st.text(max_size=5)),
                                                   "arguments": mostly(st.just("{}"))}))}))
    message = st.fixed_dictionaries(
        {"role": mostly(st.sampled_from(["user", "assistant", "system", "tool"])),
         "content": mostly(st.text(max_size=10) | st.lists(part, max_size=3), st.none() | json_values)},
        optional={"tool_calls": st.lists(tool_call, max_size=2) | json_values, "name": json_values},
    )
    return draw(st.fixed_dictionaries(
        {"model": mostly(st.just("llama3.2:1b")), "messages": st.lists(message, min_size=1, max_size=3)},
        optional={"stream": mostly(st.booleans()), "stream_options": mostly(st.none()), "n": mostly(st.just(1)),
                  "max_tokens": mostly(st.integers(1, 2**64)), "max_completion_tokens": mostly(st.integers(1, 2**64))},
    ))


bodies = st.dictionaries(st.sampled_from(BODY_KEYS) | st.text(max_size=5), json_values, max_size=6)


def returns_or_refuses(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except InvalidRequest as exc:
        assert exc.status in (400, 413) and isinstance(exc.message, str) and exc.message
        assert exc.param is None or isinstance(exc.param, str)
        return None


_TOKENS: TokenCounter | None = None


def token_counter() -> TokenCounter:
    global _TOKENS
    if _TOKENS is None:
        config = load_config(None, {}, env={})
        _TOKENS = TokenCounter(config["models"], config["model_defaults"])
    return _TOKENS


@settings(FAST, max_examples=400)
@given(bodies | near_valid_chat() | near_valid_chat())
def test_chat_validator_and_what_relies_on_it(body):
    """validate.chat returns or raises InvalidRequest; whatever it accepts, the code behind it (image
    part discovery, prompt token estimate, completion cap) handles without another exception."""
    out = returns_or_refuses(validate.chat, body)
    if out is None:
        return
    model, stream, include_usage = out
    assert isinstance(model, str) and 0 < len(model) <= 256
    assert isinstance(stream, bool) and isinstance(include_usage, bool)
    assert stream or not include_usage
    cap = validate.max_tokens(body)
    assert cap is None or (isinstance(cap, int) and cap >= 1)
    returns_or_refuses(image_parts, body["messages"])
    prompt = asyncio.run(token_counter().chat_prompt(model, body["messages"]))
    assert isinstance(prompt, int) and prompt >= 0


@FAST
@given(bodies)
def test_completions_and_embeddings_validators(body):
    out = returns_or_refuses(validate.completions, body)
    if out is not None:
        model, stream, include_usage = out
        assert isinstance(body["prompt"], str) and isinstance(model, str)
        assert stream or not include_usage
    out = returns_or_refuses(validate.embeddings, body)
    if out is not None:
        model, inputs = out
        assert inputs and all(isinstance(x, str) for x in inputs)
    returns_or_refuses(validate.max_tokens, body)


# =================================================================================================
# Limits: parsing and the API form
# =================================================================================================

COUNT_FIELDS = sorted(n for n in LIMIT_FIELDS if not n.endswith("_usd"))
USD_FIELDS = sorted(n for n in LIMIT_FIELDS if n.endswith("_usd"))

# Well-formed amounts; those past the maximum (MAX_USD, MAX_COUNT) must be refused, saying so.
usd_values = st.one_of(
    st.integers(0, 10**13),
    st.integers(0, 10**15).map(lambda n: n / NANO),  # a JSON number with at most 9 decimals
    st.decimals(0, Decimal(10**13), allow_nan=False, allow_infinity=False, places=9).map(lambda d: format(d, "f")),
    st.from_regex(r"\A[0-9]{1,14}(\.[0-9]{1,9})?\Z"),
)
count_values = st.integers(0, 2**64) | st.integers(0, 2**55).map(float) | st.sampled_from([1e300, 1e23])


def _past_max(value: Any, param: str) -> bool:
    if param.endswith("_usd"):
        return Decimal(repr(value) if isinstance(value, float) else value) > MAX_USD
    return value > MAX_COUNT


def valid_limits(allow_models: bool = True):
    fields = {n: st.none() | count_values for n in COUNT_FIELDS}
    fields.update({n: st.none() | usd_values for n in USD_FIELDS})
    base = st.fixed_dictionaries({}, optional=fields)
    if not allow_models:
        return base
    models = st.dictionaries(st.sampled_from(["llama3.2:1b", "moondream", "x"]), valid_limits(False), max_size=2)
    return st.tuples(base, st.none() | models).map(lambda t: {**t[0], **({"models": t[1]} if t[1] is not None else {})})


def _at(raw: dict[str, Any], param: str) -> Any:
    """The value a param such as ``limits.models.llama3.2:1b.total_cost_usd`` names in ``raw``."""
    parts = param.split(".")
    if parts[1] == "models":
        return raw["models"][".".join(parts[2:-1])][parts[-1]]
    return raw[parts[1]]


@FAST
@given(valid_limits())
def test_parse_limits_round_trips_through_the_api_form(raw):
    """Well-formed limits are accepted (one past the documented maximum is refused, saying so) and survive
    the API form: parse(to_api(parse(x))) == parse(x), USD shown exactly to the nano-dollar, counts exact."""
    try:
        parsed = parse_limits(raw, "limits")
    except InvalidRequest as exc:
        assert exc.param and _past_max(_at(raw, exc.param), exc.param), (exc.message, raw)
        assert "at most" in exc.message, exc.message
        return
    for name, value in raw.items():
        if name != "models" and not name.endswith("_usd") and value is not None:
            assert parsed[name] == value and parsed[name] <= MAX_COUNT  # exact: no float went between
    shown = to_api(parsed)
    for name, value in shown.items():
        if name.endswith("_usd") and value is not None:
            assert isinstance(value, str) and Decimal(value) * NANO == parsed[name], (name, value)
    assert parse_limits(shown, "limits") == parsed
    for name, value in parsed.items():
        if name != "models":
            assert value is None or (isinstance(value, int) and value >= 0)


bad_amounts = st.one_of(
    st.integers(max_value=-1), st.floats(max_value=-1e-9, allow_nan=False), st.booleans(),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


@FAST
@given(st.data())
def test_parse_limits_refuses_invalid_documents(data):
    kind = data.draw(st.sampled_from(["not_object", "unknown", "bad_amount", "bad_count", "nested_models", "bad_usd"]))
    if kind == "not_object":
        raw = data.draw(st.lists(st.integers(), max_size=2) | st.text(max_size=3) | st.integers() | st.booleans())
    elif kind == "unknown":
        raw = {data.draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in LIMIT_FIELDS and k != "models")): 1}
    elif kind == "bad_amount":
        raw = {data.draw(st.sampled_from(sorted(LIMIT_FIELDS))): data.draw(bad_amounts)}
    elif kind == "bad_count":
        raw = {data.draw(st.sampled_from(COUNT_FIELDS)): data.draw(
            st.floats(0.001, 1e6).filter(lambda f: not f.is_integer()) | st.text(max_size=4) | st.just(float("nan"))
            | st.integers(MAX_COUNT + 1, 2**64) | st.floats(2.0**53, 1e308))}
    elif kind == "nested_models":
        raw = {"models": {"m": {"models": {}}}}
    else:
        # One strict format: no spaces, signs, exponents, "_", non-ASCII digits, sub-nano precision.
        raw = {data.draw(st.sampled_from(USD_FIELDS)): data.draw(
            st.sampled_from(["abc", "-1", "NaN", "sNaN", "Infinity", "-Infinity", "1e999999", "1e-9999999999", "",
                             "  5 ", "1_000", "+5", "5.", ".5", "1e3", "0x10", "\u0665", "0.0000000001", "1,5"])
            | st.floats(1e-12, 1e-10) | st.floats(1e13, 1e308))}
    with pytest.raises(InvalidRequest):
        parse_limits(raw, "limits")


@FAST
@given(json_values, st.booleans())
def test_parse_limits_on_any_json(raw, allow_models):
    parsed = returns_or_refuses(parse_limits, raw, "limits", allow_models=allow_models)
    if parsed is not None:
        to_api(parsed)


# =================================================================================================
# The limiter: reserve / settle / void / time, against a model of what must hold
# =================================================================================================

MODELS = ("m1", "m2")
USERS = ("u1", "u2")
# 23:58 UTC on the last day of a month: a few advances cross the day and the month.
START = calendar.timegm((2026, 1, 31, 23, 58, 0))
WINDOW_PREFIX = {"day": "d", "month": "m", "total": "total"}


@st.composite
def scope_limits(draw) -> dict[str, Any]:
    """Parsed limits (nano-USD) small enough that refusals and shrinking happen often."""
    ranges = {
        "requests_per_minute": (1, 6), "tokens_per_minute": (30, 600), "requests_per_day": (1, 12),
        "tokens_per_day": (50, 3000), "tokens_per_month": (100, 6000), "total_tokens": (100, 10_000),
        "cost_per_day_usd": (0, 200_000), "cost_per_month_usd": (0, 400_000), "total_cost_usd": (0, 1_000_000),
        "max_concurrent_requests": (0, 3),
    }
    out = {}
    for name in draw(st.sets(st.sampled_from(sorted(ranges)), max_size=4)):
        lo, hi = ranges[name]
        out[name] = draw(st.none() | st.integers(lo, hi))
    return out


class LimiterMachine(RuleBasedStateMachine):
    holds = Bundle("holds")

    @initialize(user_limits=scope_limits(), model_limits=st.tuples(scope_limits(), scope_limits()),
                price=st.tuples(st.integers(0, 2 * 10**9), st.integers(0, 4 * 10**9)),
                min_completion=st.integers(1, 32))
    def setup(self, user_limits, model_limits, price, min_completion):
        self.now = float(START)
        self.limiter = Limiter(clock=lambda: self.now)
        self.user_limits = user_limits
        self.model_limits = dict(zip(MODELS, model_limits))
        self.price = price
        self.min_completion = min_completion
        self.open: dict[int, Any] = {}  # id(hold) -> hold
        self.used: dict[int, list[int]] = {}  # id(bucket) -> what was settled into it
        self.seen_buckets: list[Any] = []  # keeps every bucket alive, so no id() is ever reused
        self.admitted = self.refused = 0

    # -- rules -------------------------------------------------------------------------------------

    @rule(target=holds, user=st.sampled_from(USERS), model=st.sampled_from(MODELS), prompt=st.integers(0, 250),
          completion=st.integers(1, 400), is_default=st.booleans())
    def reserve(self, user, model, prompt, completion, is_default):
        before = self._snapshot()
        try:
            hold = self.limiter.reserve(
                user_id=user, model=model, user_limits=self.user_limits, model_limits=self.model_limits[model],
                prompt_tokens=prompt, completion_tokens=completion, completion_is_default=is_default,
                min_completion_tokens=self.min_completion, price=self.price,
            )
        except (RateLimited, QuotaExceeded) as exc:
            self.refused += 1
            assert exc.status == 429 and exc.message
            assert self._snapshot() == before, "a refusal changed the admission state"
            return None
        self.admitted += 1
        assert hold.prompt_tokens == prompt
        if is_default:
            assert hold.completion_tokens == completion or self.min_completion <= hold.completion_tokens < completion
        else:
            assert hold.completion_tokens == completion
        assert hold.cost_nusd == cost_nusd(prompt, hold.completion_tokens, self.price)
        self.open[id(hold)] = hold
        return hold

    @rule(hold=consumes(holds), prompt_share=st.sampled_from([1.0, 0.5]) | st.floats(0, 1),
          completion_share=st.sampled_from([1.0, 0.0]) | st.floats(0, 1))
    def settle(self, hold, prompt_share, completion_share):
        """Actual usage never exceeds the reservation (the completion cap is forwarded as max_tokens)."""
        if hold is None or id(hold) not in self.open:  # refused, or ended by end_everything
            return
        prompt = int(hold.prompt_tokens * prompt_share)
        completion = int(hold.completion_tokens * completion_share)
        cost = cost_nusd(prompt, completion, self.price)
        self.limiter.settle(hold, prompt, completion, cost)
        del self.open[id(hold)]
        self.seen_buckets.extend(hold.buckets)
        for b in hold.buckets:
            u = self.used.setdefault(id(b), [0, 0, 0])
            u[0] += 1
            u[1] += prompt + completion
            u[2] += cost
        with pytest.raises(RuntimeError):
            self.limiter.void(hold)  # exactly once

    @rule(hold=consumes(holds))
    def void(self, hold):
        if hold is None or id(hold) not in self.open:
            return
        self.limiter.void(hold)
        del self.open[id(hold)]
        with pytest.raises(RuntimeError):
            self.limiter.settle(hold, 0, 0, 0)

    @rule(seconds=st.sampled_from([0.5, 7.0, 30.0, 59.9, 60.0, 61.0, 600.0, 3600.0, 86_400.0, 40 * 86_400.0]))
    def advance(self, seconds):
        self.now += seconds

    @rule()
    def end_everything(self):
        for hold in list(self.open.values()):
            self.limiter.void(hold)
        self.open.clear()
        self._assert_idle()

    # -- invariants ----------------------------------------------------------------------------------------

    @invariant()
    def pending_counts_open_holds(self):
        assert self.limiter.pending == len(self.open)

    @invariant()
    def reserved_is_the_sum_of_open_holds(self):
        expected: dict[int, list[int]] = {}
        for hold in self.open.values():
            for b in hold.buckets:
                e = expected.setdefault(id(b), [0, 0, 0])
                e[0] += 1
                e[1] += hold.tokens
                e[2] += hold.cost_nusd
        for key, b in self.limiter.buckets.items():
            assert b.reserved == expected.get(id(b), [0, 0, 0]), key
            assert b.used == self.used.get(id(b), [0, 0, 0]), key
        conc: dict[tuple[str, str], int] = {}
        for hold in self.open.values():
            for key in hold.concurrency_keys:
                conc[key] = conc.get(key, 0) + 1
        for key, n in self.limiter.concurrent.items():
            assert n == conc.get(key, 0), key

    @invariant()
    def no_limit_is_exceeded(self):
        """Settled actuals never exceed what was reserved, so used + reserved stays within every limit of
        every period, and the live minute window within the per-minute limits."""
        for (user, scope, period), b in self.limiter.buckets.items():
            limits = self.user_limits if scope == "*" else self.model_limits[scope]
            for name, value in limits.items():
                if value is None:
                    continue
                metric, window = LIMIT_FIELDS[name]
                if window in WINDOW_PREFIX and period.startswith(WINDOW_PREFIX[window]):
                    assert b.used[metric] + b.reserved[metric] <= value, (user, scope, period, name, b)
        horizon = self.now - 60.0
        for (user, scope), w in self.limiter.minutes.items():
            assert w.requests == sum(e[1] for e in w.entries) and w.tokens == sum(e[2] for e in w.entries)
            limits = self.user_limits if scope == "*" else self.model_limits[scope]
            live = [e for e in w.entries if e[0] > horizon]
            if limits.get("requests_per_minute") is not None:
                assert sum(e[1] for e in live) <= limits["requests_per_minute"], (user, scope)
            if limits.get("tokens_per_minute") is not None:
                assert sum(e[2] for e in live) <= limits["tokens_per_minute"], (user, scope)
        for (user, scope), n in self.limiter.concurrent.items():
            limits = self.user_limits if scope == "*" else self.model_limits[scope]
            cap = limits.get("max_concurrent_requests")
            assert cap is None or n <= cap, (user, scope, n)

    def teardown(self):
        if hasattr(self, "limiter"):
            for hold in list(self.open.values()):
                self.limiter.settle(hold, hold.prompt_tokens, hold.completion_tokens, hold.cost_nusd)
            self.open.clear()
            self._assert_idle()

    # -- helpers -------------------------------------------------------------------------------------------

    def _snapshot(self):
        """What a refusal must leave as it was (expiry of old minute entries and dropping idle past
        periods are housekeeping, so only reservations, concurrency and live window sums count)."""
        horizon = self.now - 60.0
        live = {}
        for k, w in self.limiter.minutes.items():
            sums = (sum(e[1] for e in w.entries if e[0] > horizon), sum(e[2] for e in w.entries if e[0] > horizon))
            if sums != (0, 0):
                live[k] = sums
        return (
            {k: list(b.reserved) for k, b in self.limiter.buckets.items() if any(b.reserved)},
            {k: v for k, v in self.limiter.concurrent.items() if v},
            live,
            self.limiter.pending,
        )

    def _assert_idle(self):
        assert self.limiter.pending == 0
        assert all(b.reserved == [0, 0, 0] for b in self.limiter.buckets.values())
        assert all(n == 0 for n in self.limiter.concurrent.values())


LimiterMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=40, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_limiter_state_machine = LimiterMachine.TestCase


# -- ledger timestamps ------------------------------------------------------------------------------


@given(st.floats(0, 4_102_444_800, allow_nan=False), st.floats(0, 3, allow_nan=False))
def test_ledger_timestamps_match_strftime_and_round_trip(t, later):
    # iso_ms caches each second's text: it must agree with the plain formatting whatever came before.
    for x in (t, t + later, t):
        plain = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(x)) + f".{int((x % 1) * 1000):03d}Z"
        assert iso_ms(x) == plain
        assert abs(from_iso_ms(iso_ms(x)) - x) < 0.001
