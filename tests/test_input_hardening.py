"""Issue #12, items 4-8: model names as Ollama parses them, every templated field in the estimate, no path
out of /v1/models, deep JSON, limit values. Each test failed before its fix."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import openai
import pytest

from proxyd import modelname
from proxyd.tokens import TokenCounter

MSG = [{"role": "user", "content": "Hi"}]
CODER = "qwen2.5-coder:0.5b"  # an emulated model whose template takes a suffix (fill-in-the-middle)
WITH_CODER = {"models": ("llama3.2:1b", "moondream", "nomic-embed-text", CODER), "insert_models": (CODER,)}


def post(world, path: str, body, key: str) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(world.url + path, content=data, timeout=60,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


# =================================================================================================
# Item 4: model names, ported from Ollama and checked against Ollama's own test vectors
# =================================================================================================

# From ollama/ollama, commit fb30760996871fa9460115c753afd2c60d4ab0f7 (v0.33.0-rc2, 2026-08-21),
# types/model/name_test.go.
PART80 = "8" * 80
PART350 = "3" * 350

# TestParseNameParts: ParseNameBare's parts, and the filepath of ParseName (defaults merged in).
NAME_PARTS = [
    ("registry.ollama.ai/library/dolphin-mistral:7b-v2.6-dpo-laser-q6_K",
     ("registry.ollama.ai", "library", "dolphin-mistral", "7b-v2.6-dpo-laser-q6_K", ""),
     ("registry.ollama.ai", "library", "dolphin-mistral", "7b-v2.6-dpo-laser-q6_K")),
    ("scheme://host:port/namespace/model:tag", ("host:port", "namespace", "model", "tag", "scheme"),
     ("host:port", "namespace", "model", "tag")),
    ("host/namespace/model:tag", ("host", "namespace", "model", "tag", ""), ("host", "namespace", "model", "tag")),
    ("host:port/namespace/model:tag", ("host:port", "namespace", "model", "tag", ""),
     ("host:port", "namespace", "model", "tag")),
    ("host/namespace/model", ("host", "namespace", "model", "", ""), ("host", "namespace", "model", "latest")),
    ("host:port/namespace/model", ("host:port", "namespace", "model", "", ""),
     ("host:port", "namespace", "model", "latest")),
    ("namespace/model", ("", "namespace", "model", "", ""), ("registry.ollama.ai", "namespace", "model", "latest")),
    ("model", ("", "", "model", "", ""), ("registry.ollama.ai", "library", "model", "latest")),
    ("h/nn/mm:t", ("h", "nn", "mm", "t", ""), ("h", "nn", "mm", "t")),
    (f"{PART80}/{PART80}/{PART80}:{PART80}", (PART80, PART80, PART80, PART80, ""), (PART80, PART80, PART80, PART80)),
    (f"{PART350}/{PART80}/{PART80}:{PART80}", (PART350, PART80, PART80, PART80, ""),
     (PART350, PART80, PART80, PART80)),
]

# testCases: name -> ParseNameBare(name).IsValid() (and, when valid, String() gives the name back).
NAME_VALID = {
    "": False,
    "_why/_the/_lucky:_stiff": True,
    "h/n/m:t": True,
    "host/namespace/model:tag": True,
    "host/namespace/model": False,
    "namespace/model": False,
    "model": False,
    f"{PART80}/{PART80}/{PART80}:{PART80}": True,
    f"{PART350}/{PART80}/{PART80}:{PART80}": True,
    "h/nn/mm:t": True,
    "m": False,
    "n/m:": False,
    "h/n/m": False,
    "@t": False,
    "m@d": False,
    "^": False,
    "mm:": False,
    "/nn/mm": False,
    "//": False,
    "//mm": False,
    "hh//": False,
    "//mm:@": False,
    "00@": False,
    "@": False,
    "-hh/nn/mm:tt": False,
    "hh/-nn/mm:tt": False,
    "hh/nn/-mm:tt": False,
    "hh/nn/mm:-tt": False,
    "host:https/namespace/model:tag": True,
    "host/name:space/model:tag": False,
}

# TestDisplayShortest
DISPLAY_SHORTEST = {
    "registry.ollama.ai/library/model:latest": "model:latest",
    "registry.ollama.ai/library/model:tag": "model:tag",
    "registry.ollama.ai/namespace/model:tag": "namespace/model:tag",
    "host/namespace/model:tag": "host/namespace/model:tag",
    "host/library/model:tag": "host/library/model:tag",
}

# From the same commit, internal/modelref/modelref_test.go: TestParseRef (input -> base, source or error)
# and TestNormalizePullName (input -> the name Ollama keeps the model under).
PARSE_REF = [
    ("gpt-oss:20b:cloud", "gpt-oss:20b", "cloud"),
    ("gpt-oss:20b-cloud", "gpt-oss:20b", "cloud"),
    ("qwen3:8b:local", "qwen3:8b", "local"),
    ("llama3.2", "llama3.2", ""),
    ("my-cloud-model", "my-cloud-model", ""),
    ("foo:bar-cloud/baz", "foo:bar-cloud/baz", ""),
    ("foo:cloud:local", None, None),  # ErrConflictingSourceSuffix
    ("   ", None, None),  # ErrModelRequired
]
PULL_NAME = {"gpt-oss:20b:local": "gpt-oss:20b", "gpt-oss:20b:cloud": "gpt-oss:20b-cloud",
             "gpt-oss:20b-cloud": "gpt-oss:20b-cloud", "qwen3:cloud": "qwen3:cloud"}


@pytest.mark.parametrize("text, bare, full", NAME_PARTS)
def test_ollama_name_parts(text, bare, full):
    n = modelname.parse_name_bare(text)
    assert (n.host, n.namespace, n.model, n.tag, n.scheme) == bare
    assert modelname.parse_name(text)[:4] == full


@pytest.mark.parametrize("text, valid", sorted(NAME_VALID.items()))
def test_ollama_name_validity(text, valid):
    n = modelname.parse_name_bare(text)
    assert modelname.is_valid(n) is valid
    if valid:
        assert modelname.name_string(n) == text


def test_ollama_name_defaults_parts_and_display():
    assert modelname.name_string(modelname.parse_name("xx")) == "registry.ollama.ai/library/xx:latest"  # TestNameparseNameDefault
    # TestNameIsValidPart, through a name whose other parts are valid
    for host, ok in (("a", True), ("a.", True), ("a.b", True), ("a:123", True)):
        assert modelname.is_valid(modelname.Name(host, "n", "m", "t")) is ok
    assert not modelname.is_valid(modelname.Name("", "n", "m", "t"))
    assert modelname.is_valid(modelname.Name("h", "bb", "m", "t")) and not modelname.is_valid(modelname.Name("h", "a.", "m", "t"))
    assert not modelname.is_valid(modelname.Name("h", "n", "-h", "t"))
    for text, want in DISPLAY_SHORTEST.items():
        assert modelname.display_shortest(modelname.parse_name_bare(text)) == want


@pytest.mark.parametrize("text, base, source", PARSE_REF)
def test_ollama_source_suffixes(text, base, source):
    if base is None:
        with pytest.raises(modelname.InvalidName):
            modelname.parse_ref(text)
        assert modelname.canonical(text) == ""
    else:
        assert modelname.parse_ref(text) == (base, source)


def test_canonical_is_ollamas_name_for_the_model():
    for text, want in PULL_NAME.items():
        assert modelname.canonical(text) == want
    same = ["moondream", "moondream:latest", "MoonDream", " moondream\n", "moondream:local", "moondream:LOCAL",
            "library/moondream", "registry.ollama.ai/library/moondream:latest",
            "https://registry.ollama.ai/library/moondream", "http://Registry.Ollama.AI/library/moondream:latest",
            "\u3000moondream"]  # an ideographic space is white space to Go's TrimSpace
    assert {modelname.canonical(s) for s in same} == {"moondream:latest"}
    assert modelname.canonical("moondream:cloud") == "moondream:cloud"  # runs elsewhere: not the local model
    # Ollama refuses these (400 "invalid model name"), so proxyd does too.
    for bad in ("moondream:", ":latest", "/moondream", "a//m", "m@sha256:abc", "-m", "a/b:c/d", "\x1cmoondream",
                "../../api/version", "..", "localhost:5000/m", "m" * 81, "moon dream"):
        assert modelname.canonical(bad) == "", bad


def test_every_spelling_ollama_serves_is_limited_and_priced_as_that_model_and_refusals_come_first(make_world):
    """The issue's example: a scheme in front of the full name escaped the per-model limit and was billed
    at `default`, while Ollama serves it as moondream:latest. A name Ollama refuses is a 400 naming
    `model`, before any reservation, and never reaches Ollama."""
    world = make_world(config={"pricing": {"moondream": {"input_per_million_usd": 1000, "output_per_million_usd": 1000},
                                           "default": {"input_per_million_usd": 1, "output_per_million_usd": 1}}})
    key = world.new_user("bob")
    r = world.admin("PUT", "/admin/users/bob/limits", {"models": {"moondream": {"requests_per_minute": 1}}})
    assert r.status_code == 200, r.text
    c = world.client(key)
    c.chat.completions.create(model="https://registry.ollama.ai/library/moondream", messages=MSG, max_tokens=3)
    for spelling in ("moondream:local", "http://registry.ollama.ai/library/MoonDream:latest"):
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model=spelling, messages=MSG, max_tokens=3)
        assert "moondream:latest" in e.value.message
    world.settle_all()
    assert world.rows("SELECT model, input_price_nusd_per_mtok FROM requests") == [("moondream:latest", 1_000_000_000_000)]
    seen = len(world.emu.requests)
    for bad in ("moondream:", "m@sha256:abc", "foo:cloud:local"):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=bad, messages=MSG)
        assert e.value.body["param"] == "model", e.value.body
    assert len(world.emu.requests) == seen  # refused before the upstream
    world.settle_all()
    assert world.rows("SELECT COUNT(*) FROM requests") == [(1,)]  # and before any reservation


# =================================================================================================
# Item 5: every field that reaches the template counts in the estimate
# =================================================================================================


def test_a_big_suffix_cannot_overshoot_a_hard_limit(make_world):
    """A 1-word prompt with a 1 MB suffix reserved ~30 tokens and was billed ~200k past the limit."""
    world = make_world(emulator=WITH_CODER)
    key = world.new_user("alice", limits={"total_tokens": 5000})
    c = world.client(key)
    with pytest.raises(openai.RateLimitError) as e:
        c.completions.create(model=CODER, prompt="def f():", suffix="    return 1\n" * 80_000, max_tokens=5)
    assert e.value.body["code"] == "request_too_large", e.value.body
    c.completions.create(model=CODER, prompt="def f():", suffix="    return 1\n" * 100, max_tokens=5)
    world.settle_all()
    [(reserved, reported)] = world.rows("SELECT reserved_prompt, prompt_tokens FROM requests WHERE status='settled'")
    assert reported > 300 and reserved >= reported, (reserved, reported)  # the emulator renders the suffix


def test_the_estimate_covers_a_1mb_suffix_as_ollama_renders_it(make_world):
    world = make_world(emulator=WITH_CODER)
    c = world.client(world.new_user("alice"))
    c.completions.create(model=CODER, prompt="x", suffix="alpha beta " * 100_000, max_tokens=3)  # ~1.1 MB
    world.settle_all()
    [(reserved, reported)] = world.rows("SELECT reserved_prompt, prompt_tokens FROM requests")
    assert reported > 200_000 and reserved >= reported, (reserved, reported)


def test_reasoning_in_messages_counts_in_the_estimate(make_world):
    """Ollama copies a message's `reasoning` into the template's .Thinking."""
    world = make_world()
    c = world.client(world.new_user("alice", limits={"total_tokens": 5000}))
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "reasoning": "hmm " * 20_000},
               {"role": "user", "content": "Go on"}]
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="llama3.2:1b", messages=history, max_tokens=5)
    assert e.value.body["code"] == "request_too_large", e.value.body
    c2 = world.client(world.new_user("bob"))
    c2.chat.completions.create(model="llama3.2:1b", messages=history, max_tokens=5)
    world.settle_all()
    [(reserved, reported)] = world.rows("SELECT reserved_prompt, prompt_tokens FROM requests WHERE user_id='bob'")
    assert reported > 20_000 and reserved >= reported, (reserved, reported)


def test_other_templated_message_fields_count():
    from proxyd.tokens import go_json

    tc = TokenCounter({"llama3.2:1b": {"tokenizer": "llama3", "template": "llama3"}}, {})
    est = lambda msgs: asyncio.run(tc.chat_prompt("llama3.2:1b", msgs))  # noqa: E731
    base = est([{"role": "user", "content": "Hi"}])
    big = "word " * 5000
    for extra in ({"name": big}, {"tool_call_id": big}, {"role": big}, {"reasoning": big}):
        assert est([{"role": "user", "content": "Hi", **extra}]) >= base + 5000, extra
    call = {"id": big, "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert est([{"role": "assistant", "content": None, "tool_calls": [call]}]) >= base + 5000
    # Arguments and tools are written back by Go's json.Marshal: "<" as \u003c, numbers as float64.
    lt = {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": json.dumps({"a": "<" * 3000})}}]}
    assert est([lt]) >= tc.count("llama3.2:1b", "\\u003c" * 3000)
    assert go_json({"a": "<&>", "n": [1e20, 1e-7, 5.0, 0.000025]}) == \
        '{"a":"\\u003c\\u0026\\u003e","n":[100000000000000000000,1e-7,5,0.000025]}'


@pytest.mark.parametrize("body, param", [
    ({"model": "llama3.2:1b", "prompt": "x", "suffix": 5}, "suffix"),
    ({"model": "llama3.2:1b", "prompt": "x", "suffix": ["a"]}, "suffix"),
])
def test_completion_fields_are_typed(world, body, param):
    r = post(world, "/v1/completions", body, world.new_user("alice"))
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("extra, param", [
    ({"reasoning": 5}, "messages[0].reasoning"),
    ({"name": {"a": 1}}, "messages[0].name"),
    ({"tool_call_id": 1}, "messages[0].tool_call_id"),
])
def test_message_fields_are_typed(world, extra, param):
    body = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "x", **extra}]}
    r = post(world, "/v1/chat/completions", body, world.new_user("alice"))
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("path, body", [
    # Go's encoding/json fills a field from a key in any case (and the later of two keys wins): proxyd
    # would meter one model, estimate one text, reserve one budget, and Ollama use the other.
    ("/v1/chat/completions", {"model": "llama3.2:1b", "MODEL": "moondream", "messages": MSG}),
    ("/v1/chat/completions", {"model": "llama3.2:1b", "messages": MSG, "max_tokens": 5, "Max_Tokens": 100000}),
    ("/v1/chat/completions", {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "x", "Content": "y" * 9}]}),
    ("/v1/chat/completions", {"model": "llama3.2:1b", "messages": [{"role": "user", "CONTENT": "y"}]}),
    ("/v1/completions", {"model": "llama3.2:1b", "prompt": "x", "\u017fuffix": "long s"}),  # ſ folds to S in Go
    ("/v1/completions", {"model": "llama3.2:1b", "prompt": "x", "PROMPT": "y"}),
    ("/v1/embeddings", {"model": "nomic-embed-text", "input": "x", "Input": "y"}),
])
def test_keys_go_would_read_as_another_field_are_refused(world, path, body):
    key = world.new_user("alice")
    r = post(world, path, body, key)
    assert r.status_code == 400 and "case-sensitive" in r.json()["error"]["message"], r.text
    assert not any(q["path"] == path for q in world.emu.requests)


# =================================================================================================
# Item 6: /v1/models/{model} cannot leave its route
# =================================================================================================


def raw_get(port: int, path: str, key: str) -> tuple[int, bytes]:
    """A GET sent byte for byte (an SDK or httpx would normalise the path first)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                  "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("path", [
    "/v1/models/..%2f..%2fapi%2fversion", "/v1/models/../../api/version", "/models/..%2F..%2Fapi%2Fversion",
    "/v1/models/..%2F..%2F..%2Fapi%2Fversion%3F", "/v1/models/%2e%2e%2f%2e%2e%2fapi%2fversion",
    "/v1/models/x%2f..%2f..%2f..%2fapi%2fversion",
])
def test_model_path_cannot_reach_other_upstream_routes(world, path):
    key = world.new_user("alice")
    status, body = raw_get(world.port, path, key)
    assert status in (400, 404), (status, body)
    assert "version" not in json.loads(body) and "error" in json.loads(body), body
    assert not any(q["path"] != "/v1/models" and not q["path"].startswith("/v1/models/") for q in world.emu.requests), \
        [q["path"] for q in world.emu.requests]


def test_model_retrieve_still_works_and_refuses_what_ollama_refuses(world):
    key = world.new_user("alice")
    assert world.client(key).models.retrieve("moondream").id == "moondream"
    assert world.client(key).models.retrieve("MoonDream:latest").id == "MoonDream:latest"
    status, body = raw_get(world.port, "/v1/models/moondream%3A", key)  # "moondream:": Ollama's 400
    assert status == 400 and json.loads(body)["error"]["param"] == "model", body
    status, body = raw_get(world.port, "/v1/models/hf.co%2Forg%2Fm%3Aq4", key)  # one segment in Ollama: no route
    assert status == 404, body
    assert [q["path"] for q in world.emu.requests if q["path"].startswith("/v1/models/")] == [
        "/v1/models/moondream", "/v1/models/MoonDream:latest"]


# =================================================================================================
# Item 7: deep JSON is a 400 at parse time
# =================================================================================================


@pytest.mark.parametrize("depth", [200, 1000, 1023, 5000])
def test_deeply_nested_bodies_are_refused_when_read(world, depth):
    key = world.new_user("alice")
    raw = b'{"model":"llama3.2:1b","messages":[{"role":"user","content":"Hi"}],"x":' + b"[" * depth + b"]" * depth + b"}"
    r = post(world, "/v1/chat/completions", raw, key)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"], r.text
    world.settle_all()
    assert world.rows("SELECT COUNT(*) FROM requests") == [(0,)]


def test_nesting_within_the_limit_is_forwarded(world):
    key = world.new_user("alice")
    raw = b'{"model":"llama3.2:1b","messages":[{"role":"user","content":"Hi"}],"x":' + b"[" * 120 + b"]" * 120 + b"}"
    r = post(world, "/v1/chat/completions", raw, key)
    assert r.status_code == 200, r.text
    # many brackets, little depth (the exact walk): a 300-message conversation
    body = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "Hi"}] * 300, "max_tokens": 3}
    assert post(world, "/v1/chat/completions", body, key).status_code == 200


# =================================================================================================
# Item 8: limit values, through the admin API
# =================================================================================================


def put_limits(world, raw: bytes) -> httpx.Response:
    return httpx.put(world.url + "/admin/users/alice/limits", content=raw, timeout=30,
                     headers={"Authorization": "Bearer test-admin-token", "Content-Type": "application/json"})


@pytest.mark.parametrize("raw, words", [
    (b'{"total_tokens": 1e300}', "at most 9007199254740991"),
    (b'{"total_tokens": 99999999999999999999999}', "at most 9007199254740991"),
    (b'{"total_tokens": 9007199254740992}', "at most 9007199254740991"),
    (b'{"total_tokens": 1.5}', "whole number"),
    (b'{"total_tokens": "100"}', "whole number"),
    (b'{"total_cost_usd": "  5 "}', "decimal amount of USD"),
    (b'{"total_cost_usd": "1_000"}', "decimal amount of USD"),
    (b'{"total_cost_usd": "NaN"}', "decimal amount of USD"),
    (b'{"total_cost_usd": "1e3"}', "decimal amount of USD"),
    (b'{"total_cost_usd": "-1"}', "decimal amount of USD"),
    (b'{"total_cost_usd": "0.0000000001"}', "decimal amount of USD"),
    (b'{"total_cost_usd": 1e-10}', "more than 9 decimals"),
    (b'{"total_cost_usd": 1e300}', "at most 1000000000000 USD"),
    (b'{"models": {"moondream": {"tokens_per_day": 1e300}}}', "at most 9007199254740991"),
])
def test_bad_limit_values_are_refused_saying_why(world, raw, words):
    world.new_user("alice")
    r = put_limits(world, raw)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"].startswith("limits."), r.text


def test_limit_values_are_stored_exactly(world):
    world.new_user("alice")
    r = put_limits(world, b'{"total_tokens": 9007199254740991, "tokens_per_day": 1e3, "total_cost_usd": "12.5",'
                          b' "cost_per_day_usd": 0.1, "cost_per_month_usd": 1000000000000}')
    assert r.status_code == 200, r.text
    assert r.json()["overrides"] == {"total_tokens": 9007199254740991, "tokens_per_day": 1000,
                                     "total_cost_usd": "12.500000000", "cost_per_day_usd": "0.100000000",
                                     "cost_per_month_usd": "1000000000000.000000000"}
    world.restart()
    assert world.admin("GET", "/admin/users/alice/limits").json()["overrides"] == r.json()["overrides"]


def test_values_an_older_version_stored_do_not_stop_the_start(world, caplog):
    world.new_user("alice")
    legacy = json.dumps({"total_tokens": 1e300, "total_cost_usd": "  5 "})

    async def write():
        await world.ctx.ledger.submit_sql("UPDATE users SET limits_json=? WHERE user_id='alice'", (legacy,))

    world.call(write())
    world.restart()
    shown = world.admin("GET", "/admin/users/alice/limits").json()["overrides"]
    assert shown == {"total_tokens": 9007199254740991, "total_cost_usd": "5.000000000"}, shown
    assert "set the limit again" in caplog.text
