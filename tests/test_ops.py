"""Configuration, timeouts, observability, CORS and per-key caps (issues #2, #6)."""

import os
import socket
import subprocess
import sys

import httpx
import openai
import pytest

from proxyd.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MSG = [{"role": "user", "content": "Hi"}]


def test_config_rejects_unknown_keys_and_wrong_types(tmp_path):
    bad = tmp_path / "bad.yaml"
    for text, needle in (("upstream:\n  urll: x\n", "upstream.urll"), ("server:\n  port: eighty\n", "server.port"),
                         ("limits:\n  default:\n    requests_per_hour: 5\n", "requests_per_hour"),
                         ("pricing:\n  m: {input_per_million_usd: -1}\n", "pricing.m"),
                         # a price left out is not a price of 0: output would be billed as free
                         ("pricing:\n  m: {input_per_million_usd: 1}\n", "'pricing.m' has no 'output_per_million_usd'"),
                         ("pricing:\n  default: {output_per_million_usd: 1}\n", "'pricing.default' has no 'input_per_million_usd'"),
                         ("logging:\n  level: LOUD\n", "logging.level"),
                         ("pricing:\n  moondream: {}\n  MoonDream: {}\n", "names the same model"),
                         ("limits:\n  models:\n    a: {}\n    A: {}\n", "names the same model")):
        bad.write_text(text)
        out = subprocess.run([sys.executable, "app.py", "--config", str(bad)], cwd=ROOT, capture_output=True,
                             text=True, timeout=30, env={**os.environ, "PROXYD_DB": str(tmp_path / "x.db")})
        assert out.returncode == 2 and needle in out.stderr, (text, out.stderr)
    good = tmp_path / "good.yaml"
    good.write_text("server:\n  port: 9001\nupstream:\n  url: http://127.0.0.1:1\n")
    cfg = load_config(str(good), env={"PROXYD_UPSTREAM": "http://127.0.0.1:2", "PROXYD_DB": "/tmp/d.db"})
    assert cfg["server.port"] == 9001 and cfg["upstream.url"] == "http://127.0.0.1:2"
    assert cfg["database.path"] == "/tmp/d.db" and cfg["upstream.first_byte_timeout_s"] == 300.0
    with pytest.raises(ConfigError):
        load_config(None, {"no.such": 1}, env={})
    # the shipped config.yaml is valid
    assert load_config(os.path.join(ROOT, "config.yaml"), env={})["server.port"] == 8000


def test_check_ledger_on_a_wrong_path_says_so_and_creates_nothing(tmp_path):
    missing = tmp_path / "typo.db"
    out = subprocess.run([sys.executable, "app.py", "--check-ledger"], cwd=ROOT, capture_output=True, text=True,
                         timeout=30, env={**os.environ, "PROXYD_DB": str(missing)})
    assert out.returncode == 2 and "cannot check the ledger at" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not missing.exists()


@pytest.mark.parametrize("setting, fault", [
    ("upstream.first_byte_timeout_s", "slow_first_byte:3"),  # no headers in time
    # Headers (with the full Content-Length) and a few bytes, then silence: the body read times out.
    ("upstream.idle_timeout_s", "stall_after:10"),
], ids=["first-byte", "stalled-after-headers"])
def test_upstream_timeout_is_504_and_voided(make_world, setting, fault):
    world = make_world(config={setting: 0.3})
    key = world.new_user("alice")
    world.emu.add_fault(fault)
    with pytest.raises(openai.APIStatusError) as e:  # a client timeout (no timeout upstream) fails this
        world.client(key, timeout=5).chat.completions.create(model="llama3.2:1b", messages=MSG)
    assert e.value.status_code == 504 and e.value.body["code"] == "upstream_timeout"
    world.settle_all()
    assert world.rows("SELECT status, http_status FROM requests") == [("voided", 504)]


def test_stalled_stream_ends_with_error_event_and_bills_relayed(make_world):
    world = make_world(config={"upstream.idle_timeout_s": 0.3})
    key = world.new_user("alice")
    world.emu.add_fault("stall_after:3")
    got = []
    with pytest.raises(openai.APIError) as e:
        for ch in world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG, stream=True):
            if ch.choices and ch.choices[0].delta.content:
                got.append(ch.choices[0].delta.content)
    assert "silent" in str(e.value)
    assert len(got) == 3
    world.settle_all()
    assert world.rows("SELECT status, completion_tokens, usage_source FROM requests") == [("settled", 3, "counted")]


def test_upstream_invalid_json_is_502(world):
    key = world.new_user("alice")
    world.emu.add_fault("bad_json")
    with pytest.raises(openai.APIStatusError) as e:
        world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG)
    assert e.value.status_code == 502
    world.settle_all()
    assert world.rows("SELECT status FROM requests") == [("voided",)]


def test_metrics(world):
    key = world.new_user("alice")
    world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG)
    text = httpx.get(world.url + "/metrics").text
    assert 'proxyd_requests_total{model="llama3.2:1b",route="ChatCompletionsHandler",status="200"} 1.0' in text
    assert 'proxyd_tokens_total{kind="prompt",model="llama3.2:1b"} 26.0' in text
    assert "proxyd_reservations_in_flight 0.0" in text
    assert "proxyd_prompt_estimate_error_tokens_bucket" in text


def test_cors_off_by_default_and_on_when_configured(make_world):
    world = make_world()
    r = httpx.options(world.url + "/v1/chat/completions", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in r.headers
    world2 = make_world(config={"server.cors_origins": ["https://app.example"]})
    r = httpx.options(world2.url + "/v1/chat/completions", headers={"Origin": "https://app.example"})
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.options(world2.url + "/v1/chat/completions", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_open_requests_per_key_are_capped(make_world):
    import asyncio

    world = make_world(config={"server.max_connections_per_key": 2}, emulator={"token_delay_s": 0.05})
    key = world.new_user("alice")

    async def run():
        client = world.async_client(key)
        res = await asyncio.gather(*[client.chat.completions.create(model="llama3.2:1b", messages=MSG)
                                     for _ in range(4)], return_exceptions=True)
        await client.close()
        return res

    res = asyncio.run(run())
    assert sum(isinstance(r, openai.RateLimitError) for r in res) == 2
    assert world.ctx.open_per_key == {}
    world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG)


def test_keys_hashed_at_rest_and_never_logged(make_world, caplog, tmp_path):
    import logging
    import sqlite3

    world = make_world(config={"logging.access_log": True})
    with caplog.at_level(logging.INFO, logger="proxyd.access"):
        key = world.new_user("alice")
        world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG)
        httpx.get(world.url + "/v1/models", headers={"Authorization": "Bearer sk-proxyd-guess"})
    lines = [r.getMessage() for r in caplog.records if r.name == "proxyd.access"]
    assert any('"key_id":"key_' in line and '"user_id":"alice"' in line for line in lines)
    assert not any(key in line or "sk-proxyd-guess" in line for line in lines)
    world.settle_all()
    dump = "\n".join(sqlite3.connect(world.db_path).iterdump())
    assert key not in dump and key[len("sk-proxyd-"):] not in dump
def test_openapi_document_is_served(world):
    r = httpx.get(world.url + "/openapi.yaml")
    assert r.status_code == 200 and b"openapi" in r.content


def test_huge_upstream_answer_is_502_and_voided(make_world):
    # max_tokens caps what Ollama sends, so allow a big default budget for this one
    world = make_world(config={"upstream.max_response_bytes": 100_000, "estimate.default_max_tokens": 100_000})
    key = world.new_user("alice")
    world.emu.add_fault("huge:300000")
    with pytest.raises(openai.APIStatusError) as e:
        world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG)
    assert e.value.status_code == 502 and "larger than" in e.value.message
    world.settle_all()
    assert world.rows("SELECT status FROM requests") == [("voided",)]
    world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG)  # still serving
    assert "proxyd_upstream_first_byte_seconds_bucket" in httpx.get(world.url + "/metrics").text


def test_a_ledger_in_a_missing_directory_or_a_taken_port_is_one_clear_line(tmp_path):
    import socket

    env = {**os.environ, "PROXYD_UPSTREAM": "http://127.0.0.1:9", "PROXYD_CONFIG": ""}
    missing = tmp_path / "no" / "such" / "dir" / "ledger.db"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for db, needle in ((missing, f"cannot open the ledger at {missing}"),
                           (tmp_path / "ok.db", f"cannot listen on 127.0.0.1:{port}")):
            out = subprocess.run([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, capture_output=True,
                                 text=True, timeout=30, env={**env, "PROXYD_DB": str(db)})
            lines = out.stderr.strip().splitlines()
            problem = [line for line in lines if line.startswith("proxyd: ")]
            assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
            assert len(problem) == 1 and needle in problem[0] and problem[0] == lines[-1], out.stderr
    assert not missing.parent.exists()


def test_healthz_is_503_when_degraded_and_shows_internals_only_to_the_admin(tmp_path, world):
    from tests.harness import ADMIN_TOKEN, Harness

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    down = Harness(str(tmp_path / "down.db"), upstream_url=dead).start()
    try:
        r = httpx.get(down.url + "/healthz")
        # Probes read the status code; anyone may ask, but the upstream's address and error are not theirs.
        assert r.status_code == 503 and r.json() == {"status": "degraded", "upstream": {"reachable": False}}, r.text
        assert dead.split("//")[1] not in r.text and "refused" not in r.text.lower()
        r = httpx.get(down.url + "/healthz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        doc = r.json()
        assert r.status_code == 503 and doc["status"] == "degraded" and doc["upstream"]["url"] == dead, doc
        assert doc["upstream"]["reachable"] is False and doc["upstream"]["detail"] and doc["upstream"]["kind"] == "ollama"
        assert doc["reservations_in_flight"] == 0 and doc["ledger_queue_depth"] == 0
        assert doc["ledger_unavailable"] is False
        r = httpx.get(down.url + "/healthz", headers={"Authorization": "Bearer not-the-token"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error", r.text
    finally:
        down.close()
    r = httpx.get(world.url + "/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "upstream": {"reachable": True}}, r.text


def test_a_model_billed_at_0_for_want_of_a_price_is_said_at_start_in_the_log_and_on_healthz(make_world, caplog):
    import logging

    from tests.harness import ADMIN_TOKEN

    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    priced = {"llama3.2:1b": {"input_per_million_usd": 1, "output_per_million_usd": 2}}
    with caplog.at_level(logging.WARNING, logger="proxyd"):
        world = make_world(config={"pricing": priced})
    assert any("pricing has no 'default' entry" in r.getMessage() and "moondream" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    key = world.new_user("alice")
    c = world.client(key)
    c.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=3)
    with caplog.at_level(logging.WARNING, logger="proxyd"):
        for _ in range(2):
            c.chat.completions.create(model="moondream", messages=MSG, max_tokens=3)
    world.settle_all()
    said = [r.getMessage() for r in caplog.records if "moondream:latest has no price" in r.getMessage()]
    assert len(said) == 1, said  # once, not per request
    warnings = httpx.get(world.url + "/healthz", headers=admin).json()["warnings"]
    assert warnings[0].startswith("pricing has no 'default' entry")
    assert warnings[1:] == ["model moondream:latest was billed at 0: no pricing entry covers it"], warnings
    assert "warnings" not in httpx.get(world.url + "/healthz").json()
    assert world.rows("SELECT model, cost_nusd > 0 FROM requests ORDER BY model") == [
        ("llama3.2:1b", 1), ("moondream:latest", 0), ("moondream:latest", 0)]
    # A default price, or explicit prices of 0, leave nothing to warn about.
    world = make_world(config={"pricing": {**priced, "moondream": {"input_per_million_usd": 0, "output_per_million_usd": 0},
                                           "default": {"input_per_million_usd": 1, "output_per_million_usd": 1}}})
    world.client(world.new_user("bob")).chat.completions.create(model="moondream", messages=MSG, max_tokens=3)
    world.settle_all()
    assert httpx.get(world.url + "/healthz", headers=admin).json()["warnings"] == []
    # No pricing at all (the tests' and a bare demo's config): one warning, not one per model.
    world = make_world()
    world.client(world.new_user("carol")).chat.completions.create(model="moondream", messages=MSG, max_tokens=3)
    world.settle_all()
    assert [w.split(":")[0] for w in httpx.get(world.url + "/healthz", headers=admin).json()["warnings"]] == [
        "pricing is empty"]
